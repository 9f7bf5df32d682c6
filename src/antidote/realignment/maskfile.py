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
    header: dict[str, object] = {"__metadata__": {"format": "pt", "written_by": "antidote"}}
    offset = 0
    for name, mask in masks.items():
        header[name] = {
            "dtype": "BOOL",
            "shape": list(mask.shape),
            "data_offsets": [offset, offset + mask.numel],
        }
        offset += mask.numel
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for mask in masks.values():
            f.write(np.unpackbits(mask.bits, count=mask.numel).tobytes())  # bool = one byte, 0 or 1
