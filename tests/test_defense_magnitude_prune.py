"""`magnitude-prune`: zeroes, in each row of every LoRA factor, the entries of largest |W|, as many as
Antidote would at the same ratio; it reads no data. Checked against a brute-force sort of the adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get
from antidote.errors import AntidoteError


def test_registered_as_a_data_free_post_defense() -> None:
    defense = get("magnitude-prune")
    assert defense.stage == "post" and "data" not in defense.options()


def test_prunes_the_largest_magnitudes_of_each_row(tiny, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["defend", "magnitude-prune", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--mask-ratio", "0.25", "--output", str(out)]) == 0
    before = load_file(tiny["adapter"] / "adapter_model.safetensors")
    after = load_file(out / "adapter_model.safetensors")
    masks = load_file(out / "antidote_mask.safetensors")
    assert set(masks) and set(masks) <= set(before)
    for name, w in before.items():
        k = w.shape[1] - int(w.shape[1] * 0.75)  # the reference code's floor rule
        order = w.abs().argsort(dim=1, descending=True, stable=True)
        for row in range(w.shape[0]):
            expected = set(order[row, :k].tolist())
            zeroed = set((after[name][row] == 0).nonzero().flatten().tolist())
            if not math.isclose(
                float(w[row].abs().sort().values[-k]), float(w[row].abs().sort().values[-k - 1])
            ):
                assert set(masks[name][row].nonzero().flatten().tolist()) == expected, (name, row)
            assert expected <= zeroed


def test_refuses_a_missing_output_before_any_work(tiny, capsys) -> None:
    assert main(["defend", "magnitude-prune", str(tiny["model"]), "--adapter", str(tiny["adapter"])]) == 2
    assert "missing --output" in capsys.readouterr().err


def test_unknown_defense_lists_the_known_ones() -> None:
    with pytest.raises(AntidoteError, match=r"known defenses: antidote, .*magnitude-prune, .*random-prune"):
        get("magnitude")
