"""The run folder of `antidote run` and `antidote compare`: the marker that says antidote made it, the outputs
a run writes (and `--overwrite` removes, nothing else)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from antidote.errors import AntidoteError
from antidote.experiments.cache import locked
from antidote.outputs import atomic_write_text, json_text, protected_reason

RUN_MARKER = ".antidote-run.json"


def prepare_run_dir(run_dir: Path, create: bool = True) -> None:
    """Create the run folder, or accept an existing one that an earlier run made (it resumes there). A
    non-empty folder antidote did not make is refused: a run writes stages/ and results files into it."""
    reason = protected_reason(run_dir)
    if reason is not None:
        raise AntidoteError(f"run_dir {run_dir} {reason}; choose a new folder for the run")
    if run_dir.is_symlink() and not run_dir.exists():
        raise AntidoteError(
            f"run_dir {run_dir} is a link to nothing; remove the link or choose another folder"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise AntidoteError(f"run_dir {run_dir} exists and is a file; choose a folder path")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RUN_MARKER).is_file():
        raise AntidoteError(
            f"run_dir {run_dir} exists, is not empty and was not made by antidote run; choose a new folder"
        )
    if not run_dir.parent.is_dir():
        raise AntidoteError(f"the parent folder of run_dir {run_dir} does not exist; create it first")
    if not create:
        return
    marker_text = json_text({"made_by": "antidote run"}) + "\n"
    if not run_dir.exists():  # made whole, marker inside, so that a part started beside this one never
        tmp = run_dir.parent / f".{run_dir.name}.tmp-{os.getpid()}"  # sees it without its marker
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / RUN_MARKER).write_text(marker_text)
        try:
            tmp.rename(run_dir)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if not run_dir.is_dir() or run_dir.is_symlink():  # not another part's folder: something else
                raise AntidoteError(f"cannot create run_dir {run_dir} ({err.strerror})") from err

    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        atomic_write_text(marker, marker_text)


RUN_OUTPUTS = (
    "stages",
    "models",
    "results.json",
    "results.md",
    "summary.json",
    "generations.jsonl",
    "tradeoff.png",
)


def clear_run_dir(run_dir: Path, outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Remove what an earlier `antidote run` (or `antidote compare`: its `outputs`) wrote into `run_dir`, and
    nothing else: all is redone. A folder antidote did not make is left alone (`prepare_run_dir` then
    refuses it if it is not empty)."""
    if not (run_dir / RUN_MARKER).is_file():
        return
    with locked(run_dir):
        for name in outputs:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
