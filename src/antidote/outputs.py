"""Writing output folders safely: build in a temporary sibling folder, move into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from antidote.errors import AntidoteError


def check_output_dir(output: str | os.PathLike[str], overwrite: bool, inputs: tuple[str, ...] = ()) -> Path:
    """Fail early (before any work) if `output` cannot be written. Returns the resolved path.

    An existing non-empty folder is refused unless `overwrite`; a folder that is (or holds) one of the
    `inputs` is always refused, since replacing it would destroy the input.
    """
    out = Path(output).expanduser().resolve()
    for given in inputs:
        src = Path(given).expanduser()
        if src.exists() and (out == src.resolve() or out in src.resolve().parents):
            raise AntidoteError(
                f"output folder {out} is (or contains) the input {given}; choose another --output"
            )
    if out.exists() and not out.is_dir():
        raise AntidoteError(f"output {out} exists and is a file; choose a folder path for --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AntidoteError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
    if not out.parent.exists():
        raise AntidoteError(f"the parent folder of {out} does not exist; create it first")
    return out


@contextlib.contextmanager
def atomic_output_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `output`; on success it replaces `output` in one rename.

    On any error the temporary folder is removed and `output` is left exactly as it was.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output.exists():
        if any(output.iterdir()) and not overwrite:  # appeared while we worked
            shutil.rmtree(tmp, ignore_errors=True)
            raise AntidoteError(
                f"output folder {output} appeared while working; pass --overwrite to replace it"
            )
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
