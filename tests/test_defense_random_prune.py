"""`random-prune`: Antidote's number of zeroed entries at the same ratio, per tensor by default (as the
Antidote authors' ablation draws them) or per row, at seeded random places that owe nothing to the weights'
size; it reads no data."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get


def run(tiny, out: Path, seed: int, *options: str) -> dict:
    argv = ["defend", "random-prune", str(tiny["model"]), "--adapter", str(tiny["adapter"]), *options]
    assert main([*argv, "--mask-ratio", "0.25", "--seed", str(seed), "--output", str(out)]) == 0
    return load_file(out / "antidote_mask.safetensors")


def test_registered_as_a_data_free_post_defense() -> None:
    defense = get("random-prune")
    assert defense.stage == "post" and "data" not in defense.options()


def test_by_default_the_count_is_per_tensor_not_per_row(tiny, tmp_path: Path) -> None:
    masks = run(tiny, tmp_path / "a", seed=0)
    assert get("random-prune").config(model="m").granularity == "layer"
    uneven = 0
    for name, mask in masks.items():
        n = mask.numel()
        assert int(mask.sum()) == n - int(n * 0.75), name  # Antidote's count, over the whole tensor
        uneven += int(mask.sum(dim=1).unique().numel() > 1)
    assert uneven > 0  # rows differ: the places are drawn over the tensor, not row by row


def test_per_row_same_count_in_every_row_seeded_places(tiny, tmp_path: Path) -> None:
    masks = run(tiny, tmp_path / "a", 0, "--granularity", "row")
    again = run(tiny, tmp_path / "b", 0, "--granularity", "row")
    other = run(tiny, tmp_path / "c", 1, "--granularity", "row")
    before = load_file(tiny["adapter"] / "adapter_model.safetensors")
    after = load_file(tmp_path / "a" / "adapter_model.safetensors")
    top_magnitude_hits, total = 0, 0
    for name, mask in masks.items():
        n = mask.shape[1]
        k = n - int(n * 0.75)
        assert (mask.sum(dim=1) == k).all(), name  # Antidote's count, in every row
        assert (after[name][mask] == 0).all() and (after[name][~mask] == before[name][~mask]).all()
        assert (again[name] == mask).all()
        top = before[name].abs().argsort(dim=1, descending=True)[:, :k]
        top_magnitude_hits += int(mask.gather(1, top).sum())
        total += int(mask.sum())
    assert any((other[name] != masks[name]).any() for name in masks)  # another seed, other places
    assert top_magnitude_hits < total  # not the magnitude mask in disguise
