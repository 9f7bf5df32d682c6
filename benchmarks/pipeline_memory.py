"""Memory across stages: is a whole `antidote run` much bigger than its largest stage run alone?

1. Runs a config whole, in a fresh process (`antidote run CONFIG --run-dir A`), and records its peak RSS.
2. For each stage of that run: copies A's finished stages into a new folder without that one stage and reruns,
   so the new process builds that stage alone (the others are reused from the cache), and records its peak.
Prints each peak and the ratio whole / largest single stage (target <= 1.5).

Peaks are the child processes' own ru_maxrss (os.wait4), so this script's own memory does not count.
Usage: python benchmarks/pipeline_memory.py [CONFIG] (default: the packaged demo-quick config)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_mib(argv: list[str]) -> float:
    """Run argv to completion; return its peak resident memory in MiB."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default="demo-quick")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "antidote", "run", args.config]
    root = Path(tempfile.mkdtemp(prefix="pipeline-memory-"))
    try:
        whole = root / "whole"
        whole_peak = peak_mib([*cli, "--run-dir", str(whole)])
        print(f"whole run: peak RSS {whole_peak:.0f} MiB")
        stages = sorted(p.name for p in (whole / "stages").iterdir() if not p.name.startswith("."))
        alone: dict[str, float] = {}
        for stage in stages:
            run = root / f"alone-{stage}"
            shutil.copytree(whole, run, symlinks=True, ignore=shutil.ignore_patterns("models", ".lock"))
            shutil.rmtree(run / "stages" / stage)
            alone[stage] = peak_mib([*cli, "--run-dir", str(run)])
            print(f"  {stage} alone: peak RSS {alone[stage]:.0f} MiB")
            shutil.rmtree(run)
        largest = max(alone, key=lambda s: alone[s])
        ratio = whole_peak / alone[largest]
        print(f"largest stage alone: {largest} at {alone[largest]:.0f} MiB")
        print(f"ratio whole run / largest stage alone = {ratio:.2f} (target <= 1.5)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
