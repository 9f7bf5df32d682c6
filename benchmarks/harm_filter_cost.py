"""harm-filter's cost against Antidote's on the same fine-tuned model, in one run (issue 20 asks for at most
twice Antidote's cost, or training-free).

Each method runs as its own `antidote defend` process (so peak memory is its own), alternating, `--repeats`
times: Antidote as the comparison runs it (Wanda on 64 harmful pairs, one mask ratio) and harm-filter (64
harmful pairs and 64 of the user's task pairs, one strength). Prints the median wall seconds and peak RSS of
each, and their ratio.

Usage: python benchmarks/harm_filter_cost.py ALIGNED ADAPTER --data-dir DATA [--task sst2]
       [--task-data sst2:train-fit] [--repeats 2]
ALIGNED: the aligned model folder; ADAPTER: the fine-tuning LoRA adapter on it (a comparison's `align-*`
and `finetune-*` stages).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# runs `antidote ARGV` in this child and prints its own peak RSS (KiB on Linux) last on stderr
CHILD = (
    "import resource, runpy, sys\n"
    "sys.argv = ['antidote', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('antidote', run_name='__main__')\n"
    "except SystemExit as e:\n    assert not e.code, e.code\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process running `antidote ARGV`."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("aligned")
    parser.add_argument("adapter")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--data", default="beavertails:calibrate")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--task-data", default="sst2:train-fit")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    common = [args.aligned, "--adapter", args.adapter, "--data", args.data, "--data-dir", args.data_dir]
    common += ["--template", "chat", "--max-samples", "64"]
    runs: dict[str, list[tuple[float, float]]] = {"antidote": [], "harm-filter": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, extra in (
                ("antidote", ["--mask-ratio", "0.2"]),
                ("harm-filter", ["--task", args.task, "--task-data", args.task_data, "--strength", "100"]),
            ):
                out = Path(tmp) / f"{name}-{i}"
                runs[name].append(timed(["defend", name, *common, *extra, "--output", str(out)]))
                print(f"{name} run {i + 1}: {runs[name][-1][0]:.1f} s", flush=True)
    wall = {n: statistics.median(s for s, _ in r) for n, r in runs.items()}
    print(
        f"antidote {wall['antidote']:.1f} s, harm-filter {wall['harm-filter']:.1f} s",
        f"(medians of {args.repeats})",
    )
    print(f"harm-filter / antidote wall time: {wall['harm-filter'] / wall['antidote']:.2f}x")
    peak = {n: max(p for _, p in r) for n, r in runs.items()}
    print(f"peak RSS: antidote {peak['antidote']:.0f} MiB, harm-filter {peak['harm-filter']:.0f} MiB")


if __name__ == "__main__":
    main()
