"""`lox`: the change it makes to each 2-D weight of the fine-tuned model lies in the top-k singular
subspaces of the alignment delta V = W_aligned - W_base and equals alpha U_k S_k V_k^T there; 1-D weights
and weights that alignment left alone do not move. Checked with numpy's SVD of V from the saved files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get
from antidote.errors import AntidoteError
from conftest import make_model

PREFIX = "base_model.model."


def finetuned_by_hand(tiny: dict[str, Path]) -> dict[str, torch.Tensor]:
    """W_ft = W_aligned + B A * alpha / r at the LoRA layers, from the files alone."""
    aligned = load_file(tiny["model"] / "model.safetensors")
    adapter = load_file(tiny["adapter"] / "adapter_model.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    for key, a in adapter.items():
        if ".lora_A." in key:
            name = key.split(".lora_A.")[0].removeprefix(PREFIX) + ".weight"
            aligned[name] = aligned[name] + adapter[key.replace("lora_A", "lora_B")] @ a * (
                cfg["lora_alpha"] / cfg["r"]
            )
    return aligned


def defend(tiny: dict[str, Path], base: Path, out: Path, *options: str) -> dict[str, torch.Tensor]:
    argv = ["defend", "lox", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--base-model", str(base), "--output", str(out), *options]) == 0
    return load_file(out / "model.safetensors")


def test_registered_as_a_data_free_post_defense() -> None:
    defense = get("lox")
    assert defense.stage == "post" and "data" not in defense.options()
    assert {"rank", "alpha", "targets"} <= set(defense.options())


def test_only_the_top_k_subspace_of_the_alignment_delta_changes(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    k, alpha = 2, 1.5
    finetuned = finetuned_by_hand(tiny)
    aligned = load_file(tiny["model"] / "model.safetensors")
    base = load_file(tiny["reference"] / "model.safetensors")
    out = defend(tiny, tiny["reference"], tmp_path / "out", "--rank", str(k), "--alpha", str(alpha))
    assert set(out) == set(finetuned)
    two_d = 0
    for name, w in finetuned.items():
        update = (out[name] - w).double().numpy()
        if w.dim() == 1:
            assert not update.any(), name  # 1-D weights are not extrapolated
            continue
        two_d += 1
        u, s, vt = np.linalg.svd((aligned[name] - base[name]).double().numpy(), full_matrices=False)
        uk, vk = u[:, :k], vt[:k].T
        scale = np.linalg.norm(update)
        assert scale > 0, name
        # Nothing outside the top-k left and right singular subspaces of V (up to the float32 SVD's
        # error, ~1e-5 here where V's singular values lie close; a wrong subspace leaves ~1) ...
        assert np.linalg.norm(update - uk @ uk.T @ update) < 2e-4 * scale, name
        assert np.linalg.norm(update - update @ vk @ vk.T) < 2e-4 * scale, name
        # ... and inside them, alpha times V's top-k singular values.
        np.testing.assert_allclose(uk.T @ update @ vk, alpha * np.diag(s[:k]), rtol=1e-3, atol=2e-4 * scale)
    assert two_d == 2 * 7 + 2  # seven projections per layer, the embeddings and the output layer


def test_untouched_weights_stay_and_rank_0_extrapolates_the_whole_delta(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A base model that differs only at layer 1's v_proj (by a full-rank delta): rank 0 adds alpha V
    there, and nothing anywhere else."""
    model = make_model(seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.add_(
            0.05 * torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
        )
    model.save_pretrained(tmp_path / "base")
    finetuned = finetuned_by_hand(tiny)
    aligned = load_file(tiny["model"] / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    out = defend(tiny, tmp_path / "base", tmp_path / "out", "--rank", "0", "--alpha", "2")
    target = "model.layers.1.self_attn.v_proj.weight"
    for name, w in finetuned.items():
        expected = w + 2 * (aligned[name] - base[name]) if name == target else w
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert json.loads((tmp_path / "out" / "lox_report.json").read_text())["extrapolated"] == [target]


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["defend", "lox", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 2
    assert "needs --base-model" in capsys.readouterr().err
    base = ["--base-model", str(tiny["reference"]), "--output", str(tmp_path / "b")]
    assert main([*argv, *base, "--targets", "nothing_like_this"]) == 2
    assert "matches no 2-D weight" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="--rank must be 0"):
        get("lox").config(model="m", adapter="a", base_model="b", rank=-1)
    assert not list(tmp_path.iterdir())


def test_runs_in_the_pipeline(tiny, tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """In a run the result is a full model row; the run's model is the base, the aligned model's delta
    from it is the LoRA alignment's (rank at most its r), so rank 2 extrapolates part of it."""
    from antidote.experiments.pipeline import load_run_config, run_pipeline
    from conftest import copy_run

    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"lox": {"rank": 2}}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    row = next(r for r in summary["rows"] if r["model"] == "lox")
    assert row["adapter"] is None
    report = json.loads((Path(row["model_path"]) / "lox_report.json").read_text())
    assert report["extrapolated"] and all(".layers." in name for name in report["extrapolated"])
