"""The stage cache of `antidote run`: RUN_DIR/stages/<stage>-<key>, one folder per finished stage.

A stage's key hashes everything it depends on: its settings, the keys of the stages before it, and the
content of every file or folder its settings name (for a file: its size and the sha256 of its bytes; for a
folder, e.g. a model or the data folder: the relative name, size and sha256 of every file in it). A model
folder or data file changed in place therefore changes the key, and the stage and those after it are redone;
a data folder copied again or touched (new mtimes, same bytes) keeps its stages. Each file is read once per
process (per path, size, mtime and inode): about a second per GB, once, for a large local model.

A stage is built in a temporary sibling folder (`.<stage>-<key>.tmp-<pid>`); its record `stage.json` is
written inside that folder, and the folder is renamed into place last. So a folder named `<stage>-<key>`
holding `stage.json` is complete, whatever moment a kill came; anything else is removed at the next start.

`stage.json` is the one record of a stage's identity: its name, kind (align, finetune, defense, evaluate,
validate, judge, utility), defense and variant where it has them, its settings (`spec`), seconds and peak
memory. A finished entry is checked before it is reused: a record that does not parse or names another stage,
a missing output file, a non-finite number in a JSON output, or a folder replaced by a link, is said (with
the stage) and the stage rebuilt. `DryRunCache` walks a run without building anything (`compare --plan`).

Several processes may share one cache (`compare --cells` parts at once: `StageCache(shared=True)` under a
shared `locked`): each stage is then built under its own lock and the others reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError
from antidote.memory import read_peak_memory, release_memory, reset_peak_memory
from antidote.outputs import json_text, pid_alive, sha256_file

# Bump when a stage's code changes what it writes: old cache entries are then not reused.
# 3: one tokenization of a pair (BOS in training), each task's own answer length at evaluation.
STAGE_VERSION = 3
RECORD = "stage.json"


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) -> sha256, per process


def file_digest(path: Path, stat: os.stat_result) -> str:
    """The sha256 (hex) of a regular file's bytes, read once per process per (path, size, mtime, inode);
    a link (`stat` from lstat: a dangling one), a special file or an unreadable file gets a label instead."""
    import stat as stat_module

    if stat_module.S_ISLNK(stat.st_mode):
        return f"link to {os.readlink(path)}"
    if not stat_module.S_ISREG(stat.st_mode):
        return "not a regular file"
    memo = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if memo not in _DIGESTS:
        try:
            _DIGESTS[memo] = sha256_file(path)
        except OSError as err:
            return f"unreadable ({err.strerror})"
    return _DIGESTS[memo]


def _folder_fingerprint(folder: Path) -> list[Any]:
    """(relative name, size, sha256) of every file below `folder`, sorted; hidden entries left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            stat = path.stat() if path.exists() else path.lstat()  # a dangling link: the link itself
            out.append([str(path.relative_to(folder)), stat.st_size, file_digest(path, stat)])
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
            return [value, stat.st_size, file_digest(path, stat)]
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


def _no_constant(name: str) -> Any:
    raise ValueError(f"holds {name}")


def broken_reason(folder: Path, name: str, key: str, outputs: tuple[str, ...] = ()) -> str | None:
    """Why the finished-looking stage folder `folder` cannot be reused (None: it can). `outputs`: the files
    the stage must hold; those ending in .json must parse, without NaN or infinity."""
    if folder.is_symlink():
        return "its folder is a link, not a folder the cache wrote"
    try:
        record = json.loads((folder / RECORD).read_text(), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{RECORD} does not parse ({err})"
    if not isinstance(record, dict) or record.get("stage") != name or record.get("key") != key:
        return f"{RECORD} does not record stage {name} with key {key}"
    for output in outputs:
        path = folder / output
        if not path.is_file() or path.is_symlink():
            return f"its {output} is missing"
        if output.endswith(".json"):
            try:
                json.loads(path.read_text(), parse_constant=_no_constant)
            except (OSError, UnicodeDecodeError, ValueError) as err:
                return f"its {output} does not parse or is not finite ({err})"
    return None


def read_record(folder: Path) -> dict[str, Any] | None:
    """A stage folder's record, None where it does not parse."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _built_by_a_live_process(entry: Path) -> bool:
    """True for `.<stage>.tmp-<pid>` (or a temporary folder a stage's own writer made beside it,
    `.<stage>.tmp-<pid>.tmp-...`) of another process that is still running (a part beside this one)."""
    found = re.search(r"\.tmp-(\d+)", entry.name)
    return found is not None and int(found.group(1)) != os.getpid() and pid_alive(int(found.group(1)))


class StageCache:
    """Finished stages under `run_dir/stages`; unfinished leftovers are removed when it opens.

    shared: other processes may use the same folder at once (`compare --cells` parts, which hold the run
    folder's lock shared): each stage is then built under a lock of its own (`run_dir/.stage-locks/`), so
    one process builds it and the others wait and reuse it, and another live process's unfinished stage is
    left alone."""

    dry_run = False

    def __init__(self, run_dir: Path, say: Callable[[str], None], shared: bool = False) -> None:
        self.root = run_dir / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.say = say
        self.locks = run_dir / ".stage-locks" if shared else None
        if self.locks is not None:
            self.locks.mkdir(exist_ok=True)
        self.cached: list[str] = []
        self.built: list[str] = []
        self.seconds: dict[str, float] = {}
        self.peak_memory: dict[str, dict[str, float | None]] = {}  # stage folder -> read_peak_memory()
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink():  # never followed: only the link goes
                say(f"removing {entry.name}: a link where a stage folder should be")
                entry.unlink()
            elif entry.name.startswith("."):
                if shared and _built_by_a_live_process(entry):
                    continue
                say(f"removing an unfinished stage from an interrupted run: {entry.name}")
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and not (entry / RECORD).is_file():
                say(f"removing a stage without its record (an older or interrupted run): {entry.name}")
                shutil.rmtree(entry, ignore_errors=True)

    def folder(self, name: str, spec: dict[str, Any]) -> tuple[Path, str]:
        key = stage_key({"stage": name, **spec}, skip=self.root.resolve())
        return self.root / f"{name}-{key}", key

    def run(
        self,
        name: str,
        spec: dict[str, Any],
        build: Callable[[Path], Any],
        about: dict[str, Any] | None = None,
        outputs: tuple[str, ...] = (),
    ) -> tuple[Path, str]:
        """The stage's folder, built by `build(folder)` unless a finished one exists; and its key.

        `build` must create `folder` (it does not exist when called) and write the stage's files into it.
        `about`: the stage's identity for its record (kind, defense, variant); `outputs`: files it must hold.
        """
        folder, key = self.folder(name, spec)
        with self._stage_lock(name, folder):
            if self._reuse(name, folder, key, outputs):
                return folder, key
            return self._build(name, spec, build, about, folder, key)

    @contextlib.contextmanager
    def _stage_lock(self, name: str, folder: Path) -> Iterator[None]:
        """In a shared folder, hold this stage's lock (waiting, with a word, while another process has it)."""
        if self.locks is None:
            yield
            return
        import fcntl

        fd = os.open(self.locks / folder.name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"[{name}] another process is building it; waiting to reuse it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _reuse(self, name: str, folder: Path, key: str, outputs: tuple[str, ...]) -> bool:
        """True when a finished, sound `folder` is there (counted as cached); a broken one is removed."""
        if not (folder.exists() or folder.is_symlink()):
            return False
        why = broken_reason(folder, name, key, outputs)
        if why is None:
            self.say(f"[{name}] done before, reusing {folder.name}")
            self.cached.append(folder.name)
            record = json.loads((folder / RECORD).read_text())
            self.seconds[folder.name] = record.get("seconds", 0.0)
            self.peak_memory[folder.name] = record.get("peak_memory", {})  # {} from before it was kept
            return True
        self.say(f"[{name}] the cached stage {folder.name} is broken: {why}; rebuilding it")
        if folder.is_symlink():
            folder.unlink()
        else:
            shutil.rmtree(folder, ignore_errors=True)  # a part starting beside this one may remove it too
        return False

    def _build(
        self,
        name: str,
        spec: dict[str, Any],
        build: Callable[[Path], Any],
        about: dict[str, Any] | None,
        folder: Path,
        key: str,
    ) -> tuple[Path, str]:
        self.say(f"[{name}] running -> {folder.name}")
        tmp = self.root / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        reset = reset_peak_memory()
        start = time.perf_counter()
        try:
            build(tmp)
            seconds = round(time.perf_counter() - start, 1)
            peak = read_peak_memory(reset)
            record = {
                "stage": name,
                **(about or {}),
                "key": key,
                "seconds": seconds,
                "peak_memory": peak,
                "spec": spec,
            }
            (tmp / RECORD).write_text(json_text(record, indent=2, default=str) + "\n")
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

    def pending(self, folder: Path) -> bool:
        """True for a stage that a dry run planned but did not build (it has no outputs to read)."""
        return False


class DryRunCache(StageCache):
    """A stage cache that builds nothing and writes nothing: it records each stage, its identity and whether
    it is done (finished and reusable before, or planned earlier in this walk), for `compare --plan`."""

    dry_run = True

    def __init__(self, run_dir: Path) -> None:  # no super(): it would create and clean stages/
        self.root = run_dir / "stages"
        self.say = lambda message: None
        self.cached, self.built = [], []
        self.seconds, self.peak_memory = {}, {}
        self.planned: list[dict[str, Any]] = []  # {name, folder, done, why, spec, **about}

    def run(
        self,
        name: str,
        spec: dict[str, Any],
        build: Callable[[Path], Any],
        about: dict[str, Any] | None = None,
        outputs: tuple[str, ...] = (),
    ) -> tuple[Path, str]:
        folder, key = self.folder(name, spec)
        why = broken_reason(folder, name, key, outputs) if folder.exists() or folder.is_symlink() else None
        finished = (folder.exists() or folder.is_symlink()) and why is None
        done = finished or folder.name in self.built
        if finished:
            self.cached.append(folder.name)
        elif folder.name not in self.built:
            self.built.append(folder.name)
        self.planned.append(
            {"name": name, "folder": folder.name, "done": done, "why": why, "spec": spec, **(about or {})}
        )
        return folder, key

    def pending(self, folder: Path) -> bool:
        return folder.name in self.built


@contextlib.contextmanager
def locked(run_dir: Path, shared: bool = False) -> Iterator[None]:
    """One run per run folder at a time (a second one would delete the first one's unfinished stages);
    `shared`: any number of shared holders at once (`compare --cells` parts, whose `StageCache(shared=True)`
    locks each stage), but never beside a whole run. The lock file is opened without following a link and
    without truncating anything."""
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
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise AntidoteError(
                f"another antidote run is using {run_dir}; wait for it or use another run_dir (parts run "
                "with compare --cells may share a folder with each other, not with a whole run)"
            ) from err
        yield
    finally:
        os.close(fd)
