"""Everything antidote writes goes through here: output folders and single files, written atomically.

Rules (the same for every command):
- An output folder is built in a hidden sibling `.<name>.tmp-<pid>-<token>` and moved into place only when
  complete, so `<name>` is always either the old output or the new one, complete.
- Every output folder holds a marker file, `.antidote-output.json`. `--overwrite` replaces only a folder that
  has it (a folder antidote wrote), and never one that is, holds or lies inside an input, nor the working
  folder, the home folder, a filesystem root or a folder above them. An empty folder needs no --overwrite.
- A run that is killed leaves at most hidden siblings of its output; the next start for the same output
  removes those of dead processes and, if the kill fell inside the swap of an overwrite, restores the old
  output. The swap itself is one atomic exchange where the system offers it (Linux renameat2), else two
  renames with the old output kept hidden in between.
- Output folders get the ordinary permissions (0o777 minus the umask), not 0700.

The steps of `atomic_output_dir` are listed in STEPS; each is a `_reached(step)` call that the
interruption tests hook to kill the process there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError

log = logging.getLogger(__name__)

MARKER = ".antidote-output.json"
STEPS = (
    "start",  # nothing done yet
    "recovered",  # hidden siblings of dead runs removed (an interrupted swap restored)
    "tmp-created",  # the empty temporary folder exists; the caller writes into it
    "body-done",  # the caller wrote everything into the temporary folder
    "marker-written",  # the marker file is in the temporary folder
    "old-moved-away",  # two-rename swap only: the old output is hidden, the new one not yet in place
    "swapped",  # the new output is in place; the old one (if any) is hidden
    "cleaned",  # the old output is deleted
)
_TMP = re.compile(r"tmp-(\d+)-[0-9a-f]+")  # the name after ".<output name>."
_OLD = re.compile(r"old-(\d+)-[0-9a-f]+")
PathLike = str | os.PathLike[str]


def _reached(step: str) -> None:
    """Test seam: interruption tests replace this to kill the process at `step` (see STEPS)."""


# ---- checks -----------------------------------------------------------------------------------------


def _resolve(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def protected_reason(out: Path) -> str | None:
    """Why `out` may never be an output folder, or None."""
    if out.parent == out or os.path.ismount(out):
        return "is a filesystem root"
    places = [("home folder", Path.home)]
    places.append(("working folder", Path.cwd))
    for name, where in places:
        try:
            place = where().resolve()
        except (OSError, RuntimeError):
            continue
        if out == place:
            return f"is the {name}"
        if out in place.parents:
            return f"contains the {name} {place}"
    return None


def _existing_inputs(inputs: Iterable[PathLike | None]) -> list[tuple[str, Path]]:
    """(as given, resolved) for each input that names an existing path; hub ids and names are skipped."""
    found = []
    for given in inputs:
        if not given:
            continue
        path = Path(given).expanduser()
        with contextlib.suppress(OSError):
            if path.exists():
                found.append((str(given), path.resolve()))
    return found


def check_not_input(out: Path, inputs: Iterable[PathLike | None], kind: str = "output") -> None:
    """Refuse an output path that is an input, holds one, or lies inside an input folder.

    out: the resolved output path (folder or file). inputs: paths as the user gave them; those that do not
    exist (hub ids, data set names, `builtin`) are ignored.
    """
    for given, src in _existing_inputs(inputs):
        if out == src:
            raise AntidoteError(f"{kind} {out} is the input {given}; choose another --output")
        if out in src.parents:
            raise AntidoteError(f"{kind} {out} contains the input {given}; choose another --output")
        if src.is_dir() and src in out.parents:
            raise AntidoteError(
                f"{kind} {out} is inside the input folder {given}; choose a --output outside it"
            )


def _check_parent_writable(out: Path, kind: str) -> None:
    parent = out.parent
    if not parent.exists():
        raise AntidoteError(f"the parent folder of {kind} {out} does not exist; create it first")
    if not parent.is_dir():
        raise AntidoteError(f"the parent of {kind} {out} is a file, not a folder; choose another --output")
    probe = parent / f".{out.name}.probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise AntidoteError(
            f"cannot write in {parent} ({err.strerror or err}); choose a --output in a writable folder"
        ) from err


def is_antidote_output(folder: Path) -> bool:
    """Whether `folder` is an output folder antidote wrote (it holds antidote's marker file)."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("tool") == "antidote")
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(output: PathLike, overwrite: bool, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Fail early (before any work) if the folder `output` may not be written. Returns the resolved path.

    inputs: every path the command reads (model folder, adapter, data files, --config, reference, ...).
    Refused: an input, a folder holding one or lying inside an input folder; the working folder, the home
    folder, a filesystem root or a folder above them; a file; a non-empty folder without `overwrite`; with
    `overwrite`, a non-empty folder that antidote did not write; a parent that is missing or not writable.
    """
    out = _resolve(output)
    reason = protected_reason(out)
    if reason:
        raise AntidoteError(f"output folder {out} {reason}; choose a new folder for --output")
    check_not_input(out, inputs, "output folder")
    if out.exists() and not out.is_dir():
        raise AntidoteError(f"output {out} exists and is a file; choose a folder path for --output")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise AntidoteError(
                f"output folder {out} exists and is not empty; pass --overwrite to replace it"
            )
        if not is_antidote_output(out):
            raise AntidoteError(
                f"output folder {out} was not written by antidote (it has no {MARKER}); --overwrite "
                "replaces only antidote's outputs: choose a new --output or empty it yourself"
            )
    _check_parent_writable(out, "output folder")
    return out


def check_output_file(
    output: PathLike,
    overwrite: bool,
    inputs: Iterable[PathLike | None] = (),
    *,
    written_by_antidote: Callable[[Path], bool],
    kind: str = "output file",
) -> Path:
    """Like `check_output_dir` for a single file: returns the resolved path or raises AntidoteError.

    written_by_antidote: recognises a file antidote wrote here; `overwrite` replaces only those.
    """
    out = _resolve(output)
    check_not_input(out, inputs, kind)
    if out.is_dir():
        raise AntidoteError(f"{kind} {out} is a folder; give a file path for --output")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise AntidoteError(f"{kind} {out} exists; pass --overwrite to replace it")
        if out.is_symlink() or not written_by_antidote(out):
            raise AntidoteError(
                f"{kind} {out} was not written by antidote; --overwrite replaces only antidote's "
                "files: choose another --output"
            )
    _check_parent_writable(out, kind)
    return out


# ---- recovery -----------------------------------------------------------------------------------------


def sha256_file(path: PathLike) -> str:
    """The sha256 (hex) of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False  # no such pid can exist
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _stale_siblings(output: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Hidden siblings `.<output name>.<pattern>` whose owning process is dead."""
    prefix = f".{output.name}."
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return []
    return [
        p
        for p in entries
        if p.name.startswith(prefix)
        and (m := pattern.fullmatch(p.name[len(prefix) :])) is not None
        and not pid_alive(int(m.group(1)))
    ]


def recover(output: Path) -> None:
    """Clean up after killed runs that wrote `output`: restore an output whose overwrite was cut between
    its two renames, then delete the hidden temporary and old siblings of dead processes."""
    olds = sorted(_stale_siblings(output, _OLD), key=lambda p: p.stat().st_mtime_ns)
    if olds and not output.exists() and not output.is_symlink():
        log.warning("restoring %s from %s (a run was killed while replacing it)", output, olds[-1].name)
        olds[-1].rename(output)
        olds = olds[:-1]
    for stale in [*olds, *_stale_siblings(output, _TMP)]:
        log.warning("removing %s, left by a killed run", stale)
        _remove(stale)


# ---- writing ----------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_text(value: Any, **kwargs: Any) -> str:
    """`json.dumps` for every JSON file antidote writes: always valid JSON (RFC 8259), so a NaN or an
    infinity (e.g. Cohen's kappa of a judge that agrees with no variation) is written as null, never as
    the bare `NaN` that strict readers (jq, JavaScript, most other languages) refuse."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to `path` in one step: a temporary sibling, fsync, then os.replace.

    A kill leaves either the old file or the new one, complete (and at worst a hidden
    `.<name>.tmp-<pid>-*` file that the next write of the same path removes). The file gets the
    ordinary permissions (0o666 minus the umask).
    """
    path = Path(path)
    recover(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE). False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # e.g. a file system without exchange support: use two renames
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG under a unique temporary name, close it, then rename it into place:
    parts of a plot written at once (two processes) never mix, and a reader never sees half a file."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_marker(folder: Path, what: str) -> None:
    """Mark `folder` as an antidote output: the tool, its version, what wrote it and when."""
    from antidote import __version__

    record = {"tool": "antidote", "version": __version__, "wrote": what, "time": time.strftime("%FT%T%z")}
    (folder / MARKER).write_text(json_text(record) + "\n")


@contextlib.contextmanager
def atomic_output_dir(output: Path, overwrite: bool, *, what: str = "antidote") -> Iterator[Path]:
    """Yield a new temporary folder beside `output`; on success it becomes `output` in one step.

    On any error the temporary folder is removed and `output` is left exactly as it was. An existing
    non-empty `output` is replaced only with `overwrite` and only if antidote wrote it; the marker
    (recording `what` wrote the folder) is added to the new one. First, what killed runs left beside
    `output` is cleaned up (see `recover`).
    """
    output = Path(output)
    _reached("start")
    recover(output)
    _reached("recovered")
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o777)  # the umask applies: ordinary permissions
    try:
        _reached("tmp-created")
        yield tmp
        _reached("body-done")
        write_marker(tmp, what)
        _reached("marker-written")
        _swap_in(tmp, output, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(tmp: Path, output: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `output`; an old output ends hidden and is then deleted."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise AntidoteError(f"output {output} appeared as a file while working; choose another --output")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise AntidoteError(
                f"output folder {output} appeared while working; pass --overwrite to replace it"
            )
        if not is_antidote_output(output):
            raise AntidoteError(f"output folder {output} was not written by antidote; not replacing it")
        if _exchange(tmp, output):  # tmp now holds the old output; if killed now, recover() removes it
            try:
                _reached("swapped")
                _fsync_dir(output.parent)
            finally:
                _remove(tmp)
            _reached("cleaned")
            return
        old = output.parent / f".{output.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        output.rename(old)
        try:  # if killed here, recover() renames old back
            _reached("old-moved-away")
            tmp.rename(output)
        except BaseException:
            if not output.exists():
                old.rename(output)
            raise
        try:
            _reached("swapped")
            _fsync_dir(output.parent)
        finally:
            _remove(old)
        _reached("cleaned")
        return
    try:
        tmp.rename(output)  # replaces an empty folder; fails if one with files appeared meanwhile
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise AntidoteError(
                f"output folder {output} appeared while working; pass --overwrite to replace it"
            ) from err
        raise
    _reached("swapped")
    _fsync_dir(output.parent)
    _reached("cleaned")


# ---- exported copies ------------------------------------------------------------------------------------

_FICLONE = 0x40049409  # Linux ioctl: share the blocks of a file (btrfs, XFS, bcachefs): a copy-on-write copy


def _copy_file(src: Path, dst: Path) -> None:
    """Copy `src`'s content to the new file `dst`: a copy-on-write clone where the file system offers it
    (no extra disk until either is changed), else an ordinary copy. Never a hard link: writing to `dst`
    must never change `src`."""
    import fcntl

    with open(src, "rb") as fin, open(dst, "xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass
        shutil.copyfileobj(fin, fout, 1 << 22)


def _copy_tree(source: Path, target: Path) -> None:
    """Copy the visible regular files under `source` (links followed to their files, dangling links and
    hidden entries left out) into the new folder `target`."""
    target.mkdir()
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            _copy_tree(entry, target / entry.name)
        elif entry.is_file():
            _copy_file(entry, target / entry.name)


def export_folders(
    root: Path,
    folders: dict[str, Path],
    finish: Callable[[str, Path], None] | None = None,
) -> list[str]:
    """Write `root/<name>` as a copy of each `folders[name]` (see `_copy_tree`); return warnings to show.

    Copies, not hard links: a file changed in an export (a user copying another model over
    `RUN/models/aligned/model.safetensors`) never changes the stage it came from. `finish(name, folder)`
    may add files to a copy before it is moved into place. The names written are recorded in the hidden
    sibling `.<root name>.export.json`; a later export replaces or removes only those, and leaves any other
    folder in `root` (a user's) as it is, skipping that name with a warning.
    """
    record = root.parent / f".{root.name}.export.json"
    try:
        written = set(json.loads(record.read_text()).get("written", []))
    except (OSError, ValueError, AttributeError, TypeError):
        written = set()
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        return [f"{root} is not a folder antidote made; models not exported"]
    root.mkdir(exist_ok=True)
    warnings = []
    for name, source in folders.items():
        target = root / name
        if (target.exists() or target.is_symlink()) and name not in written:
            warnings.append(f"{target} was not written by antidote: left as it is, {name} not exported")
            continue
        tmp = root / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            _copy_tree(source, tmp)
            if finish is not None:
                finish(name, tmp)
            _remove(target)
            tmp.rename(target)
        except BaseException:
            _remove(tmp)
            raise
        written.add(name)
        atomic_write_text(record, json_text({"written": sorted(written)}) + "\n")
    for name in sorted(written - set(folders)):  # exported by an earlier run, not by this one
        _remove(root / name)
        written.discard(name)
    atomic_write_text(record, json_text({"written": sorted(written)}) + "\n")
    return warnings
