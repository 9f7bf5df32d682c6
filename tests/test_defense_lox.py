"""`lox` (an alignment-stage defense): the change it makes to each 2-D weight of the aligned model lies in
the top-k singular subspaces of the alignment delta V = W_aligned - W_base and equals alpha U_k S_k V_k^T
there; 1-D weights and weights that alignment left alone do not move (numpy's SVD of V from the saved
files). In a run the attack then trains on the LoX model."""

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


def defend(tiny: dict[str, Path], base: Path, out: Path, *options: str) -> dict[str, torch.Tensor]:
    argv = ["defend", "lox", str(base), "--aligned", str(tiny["model"])]
    assert main([*argv, "--output", str(out), *options]) == 0
    return load_file(out / "model.safetensors")


def test_registered_as_a_data_free_alignment_stage_defense() -> None:
    defense = get("lox")
    assert defense.stage == "align"
    assert {"rank", "alpha", "weights", "lr", "data"} <= set(defense.options())  # and align's options
    assert (
        "aligned" in defense.config.__dataclass_fields__ and "aligned" not in defense.options()
    )  # run sets it


def test_only_the_top_k_subspace_of_the_alignment_delta_changes(tiny, tmp_path: Path) -> None:
    k, alpha = 2, 1.5
    aligned = load_file(tiny["model"] / "model.safetensors")
    base = load_file(tiny["reference"] / "model.safetensors")
    out = defend(tiny, tiny["reference"], tmp_path / "out", "--rank", str(k), "--alpha", str(alpha))
    assert set(out) == set(aligned)
    two_d = 0
    for name, w in aligned.items():
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


def test_untouched_weights_stay_and_rank_0_extrapolates_the_whole_delta(tiny, tmp_path: Path) -> None:
    """A base model that differs only at layer 1's v_proj (by a full-rank delta): rank 0 adds alpha V
    there, and nothing anywhere else."""
    model = make_model(seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.add_(
            0.05 * torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
        )
    model.save_pretrained(tmp_path / "base")
    aligned = load_file(tiny["model"] / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    out = defend(tiny, tmp_path / "base", tmp_path / "out", "--rank", "0", "--alpha", "2")
    target = "model.layers.1.self_attn.v_proj.weight"
    for name, w in aligned.items():
        expected = w + 2 * (aligned[name] - base[name]) if name == target else w
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert json.loads((tmp_path / "out" / "lox_report.json").read_text())["extrapolated"] == [target]


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = ["defend", "lox", str(tiny["reference"]), "--aligned", str(tiny["model"])]
    assert main([*argv, "--weights", "nothing_like_this", "--output", str(tmp_path / "b")]) == 2
    assert "matches no 2-D weight" in capsys.readouterr().err
    other = make_model(seed=0, layers=3)
    other.save_pretrained(tmp_path / "other")
    bad = ["defend", "lox", str(tmp_path / "other"), "--aligned", str(tiny["model"]), "--output"]
    assert main([*bad, str(tmp_path / "c")]) == 2
    assert "does not match the aligned model" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="--rank must be 0"):
        get("lox").config(model="m", rank=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_in_a_run_the_attack_trains_on_the_extrapolated_aligned_model(tiny, tiny_run, tmp_path: Path) -> None:
    """LoX acts before the attack: its row is the attack's adapter trained on the LoX model (made from the
    plain alignment stage and the run's model as the base), not an edit of the plain attack afterwards."""
    from antidote.experiments.pipeline import load_run_config, run_pipeline
    from conftest import copy_run

    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"lox": {"rank": 2}}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    rows = {r["model"]: r for r in summary["rows"]}
    lox, attacked = rows["lox"], rows["attacked"]
    assert Path(lox["model_path"]).name.startswith("align-lox-")
    assert lox["adapter"] is not None and Path(lox["adapter"]).name.startswith("finetune-after-lox-")
    report = json.loads((Path(lox["model_path"]) / "lox_report.json").read_text())
    assert Path(report["aligned"]).name == Path(attacked["model_path"]).name  # the plain alignment, reused
    assert report["extrapolated"] and all(".layers." in name for name in report["extrapolated"])
    lox_weights = load_file(Path(lox["model_path"]) / "model.safetensors")
    plain = load_file(Path(attacked["model_path"]) / "model.safetensors")
    assert any(not torch.equal(lox_weights[n], plain[n]) for n in report["extrapolated"])
    # The same attack settings from another starting point: another adapter.
    ours = load_file(Path(lox["adapter"]) / "adapter_model.safetensors")
    theirs = load_file(Path(attacked["adapter"]) / "adapter_model.safetensors")
    assert set(ours) == set(theirs) and any(not torch.allclose(ours[k], theirs[k]) for k in ours)
