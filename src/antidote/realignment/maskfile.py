"""Masks kept bit-packed in memory (1/8 of a bool tensor) and streamed to a safetensors file.

A bool mask over every decoder weight of even a 135M model is 106 MB; packed it is 13 MB. The file is
written tensor by tensor in the safetensors layout (8-byte header size, JSON header, raw bytes), so the
full bool masks never exist in memory at once. `safetensors.torch.load_file` reads it as usual.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class PackedMask:
    """A bool mask of `shape`, stored as packed bits; `pruned` counts the True entries."""

    shape: tuple[int, ...]
    bits: np.ndarray
    pruned: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def pack(mask: torch.Tensor) -> PackedMask:
        flat = mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
        return PackedMask(tuple(mask.shape), np.packbits(flat), int(flat.sum()))

    def unpack(self) -> torch.Tensor:
        flat = np.unpackbits(self.bits, count=self.numel).astype(np.bool_)
        return torch.from_numpy(flat).reshape(self.shape)


def write_mask_file(path: str | Path, masks: Mapping[str, PackedMask]) -> None:
    """Write {name: mask} as a safetensors file of BOOL tensors, one tensor in memory at a time."""
    with MaskFileWriter(path, {name: mask.shape for name, mask in masks.items()}) as writer:
        for name, mask in masks.items():
            writer.write(name, mask.unpack())


class MaskFileWriter:
    """Stream a mask file whose names and shapes are known up front: the header is written first, each
    mask lands at its offset whenever it is ready (any order). Every name must be written once."""

    def __init__(self, path: str | Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt", "written_by": "antidote"}}
        self._offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            header[name] = {"dtype": "BOOL", "shape": list(shape), "data_offsets": [offset, offset + numel]}
            self._offsets[name] = (offset, tuple(shape))
            offset += numel
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
        self._start = 8 + len(raw)
        self._missing = set(shapes)
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file.truncate(self._start + offset)

    def write(self, name: str, mask: torch.Tensor) -> None:
        offset, shape = self._offsets[name]
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask {name} has shape {tuple(mask.shape)}, expected {shape}")
        self._file.seek(self._start + offset)
        self._file.write(mask.detach().to("cpu", torch.bool).contiguous().numpy().tobytes())
        self._missing.discard(name)

    def close(self) -> None:
        self._file.close()
        if self._missing:
            raise ValueError(f"masks never written: {', '.join(sorted(self._missing)[:3])}")

    def __enter__(self) -> MaskFileWriter:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()
