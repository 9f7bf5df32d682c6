"""A model folder's safetensors files, read by key and copied tensor by tensor (for `--sequential`).

`Checkpoint` indexes the files (`model.safetensors`, or the shards named in
`model.safetensors.index.json`) from their headers and reads the tensors it is asked for, opening each
file only for the read, so that no more than those tensors stay mapped in memory. `CheckpointWriter`
writes a copy with the same file names, keys and key order: each file's header first, then every
tensor at its offset whenever it is ready, so a model is rewritten with one tensor (or block) in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from antidote.errors import AntidoteError
from antidote.outputs import json_text

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: its file (name inside the folder), dtype and shape."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, str], list[tuple[str, str, tuple[int, ...]]]]:
    """(metadata, [(key, safetensors dtype name, shape)] in the order of their data in the file).
    A file that is not safetensors (or is truncated before its header ends) is refused in one line."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < size <= min(path.stat().st_size - 8, 100 << 20):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None) or {}
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        return metadata, [(key, e["dtype"], tuple(e["shape"])) for key, e in entries]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as err:
        raise AntidoteError(
            f"{path} is truncated or not a safetensors file ({err}); copy or save the model again"
        ) from err
    except OSError as err:
        raise AntidoteError(f"cannot read {path}: {err.strerror or err}") from err


# Files antidote writes into a realigned model folder itself; a shard may not be named like them.
WRITTEN_HERE = ("antidote_mask.safetensors",)


def _shard_names(index: Path) -> list[str]:
    """The shard files an index names, in order, each checked to be a plain `*.safetensors` file name
    (the writer opens each name inside the output folder: `/abs/x` or `../x` would write outside it)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("weight_map is not a mapping of tensor name -> file")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise AntidoteError(
            f"{index} is not a valid safetensors index ({type(err).__name__}: {err}); save the model again "
            "with save_pretrained"
        ) from err
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        plain = (
            isinstance(name, str)
            and name == Path(name).name
            and "\\" not in name
            and not name.startswith(".")
            and name.endswith(".safetensors")
        )
        if not plain:
            raise AntidoteError(
                f"{index} names the shard {name!r}: a shard must be a plain *.safetensors file name inside "
                "the model folder (no folders, no ..); fix the index"
            )
        if name in WRITTEN_HERE:
            raise AntidoteError(
                f"{index} names the shard {name!r}, the name of the file antidote writes beside the "
                "weights; rename that shard"
            )
        if not (index.parent / name).is_file():
            raise AntidoteError(f"{index} names the shard {name}, which is not in {index.parent}")
    return files


class Checkpoint:
    """The safetensors files of a model folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            self.files = _shard_names(index)
        elif (self.folder / SINGLE_FILE).is_file():
            self.files = [SINGLE_FILE]
        else:
            raise AntidoteError(
                f"--sequential reads safetensors weights, and {self.folder} has no {SINGLE_FILE} or "
                f"{INDEX_FILE}; re-save the model with save_pretrained or drop --sequential"
            )
        self.metadata: dict[str, dict[str, str]] = {}
        self.tensors: dict[str, TensorInfo] = {}  # every file's keys, file by file, in data order
        for file in self.files:
            metadata, entries = read_header(self.folder / file)
            self.metadata[file] = metadata
            for key, dtype, shape in entries:
                if dtype not in DTYPES:
                    raise AntidoteError(f"{file} stores {key} as {dtype}, which --sequential cannot copy")
                self.tensors[key] = TensorInfo(file, DTYPES[dtype], shape)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of `keys`, each file opened once and closed after."""
        return dict(self.iter(keys, file_at_a_time=True))

    def iter(
        self, keys: Iterable[str], *, file_at_a_time: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor). By default each tensor is read with its file opened for that read alone
        (nothing else stays mapped); `file_at_a_time` groups the reads per file."""
        from safetensors import safe_open

        keys = list(keys)
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        groups = list(by_file.items()) if file_at_a_time else [(self.tensors[k].file, [k]) for k in keys]
        for file, group in groups:
            with safe_open(str(self.folder / file), framework="pt") as f:
                for key in group:
                    yield key, f.get_tensor(key)


class CheckpointWriter:
    """Write a copy of `source`'s safetensors files (same file names, keys and key order) into `folder`.

    dtypes: the output dtype of keys stored in another dtype than the source's (e.g. a bfloat16
    checkpoint realigned with --dtype float32). `write` may come in any order; `copy_rest` copies every
    key not written yet from the source; `close` checks that every key was written and writes the index.
    """

    def __init__(self, source: Checkpoint, folder: Path, dtypes: Mapping[str, torch.dtype] | None = None):
        self.source = source
        self.folder = folder
        self.dtypes = {key: (dtypes or {}).get(key, info.dtype) for key, info in source.tensors.items()}
        self._where: dict[str, tuple[Any, int, int]] = {}  # key -> (open file, offset, size in bytes)
        self._files = []
        self.total_size = 0
        for file in source.files:
            keys = [k for k, info in source.tensors.items() if info.file == file]
            header: dict[str, Any] = {"__metadata__": {**source.metadata[file], "format": "pt"}}
            offset = 0
            sizes = {}
            for key in keys:
                info = source.tensors[key]
                size = info.numel * self.dtypes[key].itemsize
                header[key] = {
                    "dtype": DTYPE_NAMES[self.dtypes[key]],
                    "shape": list(info.shape),
                    "data_offsets": [offset, offset + size],
                }
                sizes[key] = (offset, size)
                offset += size
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            handle = open(folder / file, "wb")  # noqa: SIM115 (closed in close())
            handle.write(struct.pack("<Q", len(raw)) + raw)
            handle.truncate(8 + len(raw) + offset)
            self._files.append(handle)
            for key, (start, size) in sizes.items():
                self._where[key] = (handle, 8 + len(raw) + start, size)
            self.total_size += offset
        self._missing = set(source.tensors)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one tensor (cast to its output dtype) at its place."""
        info = self.source.tensors.get(key)
        if info is None:
            raise AntidoteError(f"{key} is not in the model's safetensors files")
        if tuple(tensor.shape) != info.shape:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the file says {info.shape}")
        handle, offset, size = self._where[key]
        data = tensor.detach().to("cpu", self.dtypes[key]).contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != size:
            raise ValueError(f"{key}: {data.numel()} bytes for a slot of {size}")
        handle.seek(offset)
        handle.write(data.numpy().data)
        self._missing.discard(key)

    def copy_rest(self) -> None:
        """Copy every key not written yet from the source, one tensor at a time."""
        for key, tensor in self.source.iter([k for k in self.source.tensors if k in self._missing]):
            self.write(key, tensor)

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        if self._missing:
            raise RuntimeError(f"tensors never written: {', '.join(sorted(self._missing)[:3])}")
        if len(self.source.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {key: info.file for key, info in self.source.tensors.items()},
            }
            (self.folder / INDEX_FILE).write_text(json_text(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        for handle in self._files:
            handle.close()
