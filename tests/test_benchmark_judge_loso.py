"""benchmarks/judge_loso.py on a tiny model and a tiny labelled folder: the cached features it builds
(response and prompt blocks) against `hidden_features` computed here, and a whole leave-one-source-out
table of one recipe, so the benchmark cannot silently break again (it once called a function that had
moved)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from test_judge_install import labelled_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import judge_loso


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model has 2 blocks: read layers 1-2 instead of 3-24."""
    monkeypatch.setattr(judge_loso, "LAYERS", (1, 2))
    monkeypatch.setattr(judge_loso, "PROMPT_LAYERS", (1, 2))
    spec = judge_loso.HP(((2, "mean"), (1, "prompt")), keyword_gate=True, l2s=(0.1,))
    monkeypatch.setitem(judge_loso.RECIPES, "tiny", ("tiny", judge_loso._spec_fitter(spec)))


def test_cached_features_are_the_models_own_and_the_table_is_written(
    tiny: dict[str, Path], tmp_path: Path, small: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from antidote.evaluation.judge_sources import load_source
    from antidote.evaluation.judges.learned_features import hidden_features
    from antidote.models.loading import load_model
    from conftest import make_tokenizer

    data = labelled_folder(tmp_path / "data")
    args = ["--data-dir", str(data), "--model", str(tiny["model"]), "--dtype", "float32", "--prompt"]
    args += ["--cache", str(tmp_path / "cache"), "--per-source", "6", "--chunk", "4"]
    assert judge_loso.main([*args, "--recipes", "tiny", "--output", str(tmp_path / "loso.json")]) == 0
    out = capsys.readouterr().out
    assert "### tiny" in out and "mean accuracy gain" in out
    report: dict[str, Any] = json.loads((tmp_path / "loso.json").read_text())
    assert set(report["tiny"]) == {
        "pku-saferlhf",
        "xstest",
        "beavertails-unsafe",
        "refusals",
        "alpaca-benign",
    }

    ns = judge_loso.argparse.Namespace(
        data_dir=str(data), cache=str(tmp_path / "cache"), per_source=6, seed=0, max_length=256,
        model=str(tiny["model"]), dtype="float32", chunk=4, sources=["pku-saferlhf"], prompt=True,
    )  # fmt: skip
    cached = judge_loso.load_all(ns)["pku-saferlhf"]["feats"]  # read back from the cache
    pairs = load_source(data, "pku-saferlhf", 6, 0)
    model = load_model(tiny["model"], device="cpu", dtype="float32", with_tokenizer=False).model
    expected = hidden_features(
        model,
        make_tokenizer(),
        [p.prompt for p in pairs],
        [p.response for p in pairs],
        layers=[1, 2],
        max_length=256,
        progress=False,
        poolings=("mean", "last", "prompt"),
    )
    assert set(cached) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(cached[key], value, rtol=0, atol=1e-5, msg=str(key))
