"""Bit-packed masks and the streaming mask writer, read back by safetensors itself."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from antidote.realignment.maskfile import PackedMask, write_mask_file


def test_pack_round_trip_and_count() -> None:
    for shape in [(1,), (7,), (3, 5), (8, 8), (2, 3, 13)]:
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.3
        packed = PackedMask.pack(mask)
        assert torch.equal(packed.unpack(), mask)
        assert packed.pruned == int(mask.sum()) and packed.numel == mask.numel()
        assert packed.bits.nbytes == (mask.numel() + 7) // 8


def test_written_file_loads_with_safetensors(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    masks = {
        f"layer.{i}.weight": torch.rand(shape, generator=gen) < 0.5
        for i, shape in enumerate([(3, 5), (1, 1), (17, 9), (4,)])
    }
    write_mask_file(tmp_path / "m.safetensors", {k: PackedMask.pack(v) for k, v in masks.items()})
    loaded = load_file(tmp_path / "m.safetensors")
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
