"""The stage cache of `antidote run`: RUN_DIR/stages/<stage>-<key>, one folder per finished stage.

A stage's key hashes everything it depends on: its settings, the keys of the stages before it, and the content
of every file or folder its settings name (for a file: size and mtime; for a folder, e.g. a model or the data
folder: the relative name, size and mtime of every file in it). A model folder or data file changed in place
therefore changes the key, and the stage and those after it are redone.

A stage is built in a temporary sibling folder (`.<stage>-<key>.tmp-<pid>`); its record `stage.json` is
written inside that folder, and the folder is renamed into place last. So a folder named `<stage>-<key>`
holding `stage.json` is complete, whatever moment a kill came; anything else is removed at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError
from antidote.memory import read_peak_memory, release_memory, reset_peak_memory

STAGE_VERSION = 3  # bump when a stage's code changes what it writes: old cache entries are then not reused
RECORD = "stage.json"


def _folder_fingerprint(folder: Path) -> list[Any]:
    """(relative name, size, mtime) of every file below `folder`, sorted; hidden entries left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            stat = path.stat()
            out.append([str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    return out


def fingerprint(value: Any, skip: Path | None = None) -> Any:
    """`value` with every string that names an existing file or folder replaced by its content fingerprint.
    Paths under `skip` (the run's own stages, already covered by their keys) are made relative to it."""
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        if skip is not None and path.resolve().is_relative_to(skip):
            return str(path.resolve().relative_to(skip))  # relative: a run folder can be moved or copied
        if path.is_file():
            stat = path.stat()
            return [value, stat.st_size, stat.st_mtime_ns]
        if path.is_dir():
            return [value, _folder_fingerprint(path)]
        return value
    if isinstance(value, dict):
        return {k: fingerprint(v, skip) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v, skip) for v in value]
    return value


def stage_key(spec: dict[str, Any], skip: Path | None = None) -> str:
    text = json.dumps({"version": STAGE_VERSION, **fingerprint(spec, skip)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class StageCache:
    """Finished stages under `run_dir/stages`; unfinished leftovers are removed when it opens."""

    def __init__(self, run_dir: Path, say: Callable[[str], None]) -> None:
        self.root = run_dir / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.say = say
        self.cached: list[str] = []
        self.built: list[str] = []
        self.seconds: dict[str, float] = {}
        self.peak_memory: dict[str, dict[str, float | None]] = {}  # stage folder -> read_peak_memory()
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                say(f"removing an unfinished stage from an interrupted run: {entry.name}")
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and not (entry / RECORD).is_file():
                say(f"removing a stage without its record (an older or interrupted run): {entry.name}")
                shutil.rmtree(entry, ignore_errors=True)

    def run(self, name: str, spec: dict[str, Any], build: Callable[[Path], Any]) -> tuple[Path, str]:
        """The stage's folder, built by `build(folder)` unless a finished one exists; and its key.

        `build` must create `folder` (it does not exist when called) and write the stage's files into it.
        """
        key = stage_key({"stage": name, **spec}, skip=self.root.resolve())
        folder = self.root / f"{name}-{key}"
        if (folder / RECORD).is_file():
            self.say(f"[{name}] done before, reusing {folder.name}")
            self.cached.append(folder.name)
            record = json.loads((folder / RECORD).read_text())
            self.seconds[folder.name] = record.get("seconds", 0.0)
            self.peak_memory[folder.name] = record.get("peak_memory", {})  # {} from before it was recorded
            return folder, key
        self.say(f"[{name}] running -> {folder.name}")
        tmp = self.root / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        reset = reset_peak_memory()
        start = time.perf_counter()
        try:
            build(tmp)
            seconds = round(time.perf_counter() - start, 1)
            peak = read_peak_memory(reset)
            record = {"stage": name, "key": key, "seconds": seconds, "peak_memory": peak, "spec": spec}
            (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            release_memory()
        self.built.append(folder.name)
        self.seconds[folder.name] = seconds
        self.peak_memory[folder.name] = peak
        return folder, key


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """One run per run folder at a time (a second one would delete the first one's unfinished stages).
    The lock file is opened without following a link and without truncating anything."""
    import fcntl

    path = run_dir / ".lock"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise AntidoteError(
            f"cannot open the lock file {path} ({err.strerror}); remove it if it is a link"
        ) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise AntidoteError(
                f"another antidote run is using {run_dir}; wait for it or use another run_dir"
            ) from err
        yield
    finally:
        os.close(fd)
