"""`safelora`: exactly the LoRA layers whose cos(C dW, dW) is at or below the threshold (or the k lowest)
get B <- C B with C = V V^T / ||V||_F; the others keep their adapter. Checked against C, dW and the
cosines computed by hand (numpy, float64) from the saved weight files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get
from antidote.errors import AntidoteError
from conftest import copy_run, make_model

PREFIX = "base_model.model."


def by_hand(tiny: dict[str, Path], base: Path) -> dict[str, dict[str, Any]]:
    """Per LoRA module (plain name): C, B, A and cos(C dW, dW), from the files alone."""
    aligned = load_file(tiny["model"] / "model.safetensors")
    before = load_file(base / "model.safetensors")
    adapter = load_file(tiny["adapter"] / "adapter_model.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for key in adapter:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix(PREFIX)
        v = (aligned[f"{module}.weight"] - before[f"{module}.weight"]).double().numpy()
        a = adapter[key].double().numpy()
        b = adapter[key.replace("lora_A", "lora_B")].double().numpy()
        entry: dict[str, Any] = {"A": a, "B": b, "cos": float("nan")}
        if np.linalg.norm(v) > 0:
            c = v @ v.T / np.linalg.norm(v)  # Frobenius norm
            dw = b @ a * scale
            cdw = c @ dw
            entry.update(C=c, cos=float((cdw * dw).sum() / (np.linalg.norm(cdw) * np.linalg.norm(dw))))
        out[module] = entry
    return out


def defend(tiny: dict[str, Path], base: Path, out: Path, *options: str) -> dict[str, torch.Tensor]:
    argv = ["defend", "safelora", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--base-model", str(base), "--output", str(out), *options]) == 0
    return load_file(out / "adapter_model.safetensors")


def check_projected(
    expected: dict[str, dict[str, Any]], after: dict[str, torch.Tensor], chosen: set[str]
) -> None:
    for module, e in expected.items():
        b_after = after[f"{PREFIX}{module}.lora_B.weight"].double().numpy()
        want = e["C"] @ e["B"] if module in chosen else e["B"]
        np.testing.assert_allclose(b_after, want, rtol=1e-5, atol=1e-6, err_msg=module)
        a_after = after[f"{PREFIX}{module}.lora_A.weight"].double().numpy()
        np.testing.assert_array_equal(a_after, e["A"])


def test_registered_as_a_data_free_post_defense() -> None:
    defense = get("safelora")
    assert defense.stage == "post" and "data" not in defense.options()
    assert {"select", "threshold", "top_k"} <= set(defense.options())
    config = defense.config(model="m", adapter="a", base_model="b")
    assert (config.select, config.top_k) == ("number", 10)  # the authors' default: the 10 lowest-cos layers


def test_projects_exactly_the_layers_at_or_below_the_threshold(tiny, tmp_path: Path) -> None:
    expected = by_hand(tiny, tiny["reference"])
    cos = sorted(e["cos"] for e in expected.values())
    assert len(cos) == 4 and cos[1] + 1e-3 < cos[2]  # distinct enough to put a threshold between
    threshold = (cos[1] + cos[2]) / 2
    after = defend(
        tiny, tiny["reference"], tmp_path / "out", "--select", "threshold", "--threshold", str(threshold)
    )
    chosen = {m for m, e in expected.items() if e["cos"] <= threshold}
    assert len(chosen) == 2
    check_projected(expected, after, chosen)
    report = json.loads((tmp_path / "out" / "safelora_report.json").read_text())
    assert {m for m, r in report["layers"].items() if r["projected"]} == chosen
    for m, r in report["layers"].items():
        assert r["cos"] == pytest.approx(expected[m]["cos"], abs=1e-5)


def test_top_k_projects_the_k_least_similar_layers(tiny, tmp_path: Path) -> None:
    expected = by_hand(tiny, tiny["reference"])
    lowest = min(expected, key=lambda m: expected[m]["cos"])
    after = defend(tiny, tiny["reference"], tmp_path / "out", "--top-k", "1", "--threshold", "-1")
    check_projected(expected, after, {lowest})
    # At the defaults (10 layers, as the authors) the 4 LoRA layers here are all projected.
    check_projected(expected, defend(tiny, tiny["reference"], tmp_path / "default"), set(expected))


def test_layers_without_an_alignment_delta_are_left_alone(tiny, tmp_path: Path) -> None:
    """A base model that differs from the aligned one only at layer 0's q_proj: the other LoRA layers have
    V = 0 (no subspace to project on) and keep their adapter even at the loosest threshold."""
    model = make_model(seed=0)
    with torch.no_grad():
        q = model.model.layers[0].self_attn.q_proj.weight
        q -= 0.1 * torch.outer(torch.linspace(-1, 1, q.shape[0]), torch.linspace(1, 2, q.shape[1]))
    model.save_pretrained(tmp_path / "base")
    expected = by_hand(tiny, tmp_path / "base")
    after = defend(tiny, tmp_path / "base", tmp_path / "out", "--select", "threshold", "--threshold", "1")
    check_projected(expected, after, {"model.layers.0.self_attn.q_proj"})
    report = json.loads((tmp_path / "out" / "safelora_report.json").read_text())
    assert sum(r["cos"] is None for r in report["layers"].values()) == 3


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = ["defend", "safelora", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 2
    assert "needs --base-model" in capsys.readouterr().err
    make_model(seed=0, hidden_size=64).save_pretrained(tmp_path / "wide")
    assert main([*argv, "--base-model", str(tmp_path / "wide"), "--output", str(tmp_path / "b")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("antidote: error")]
    assert len(errors) == 1 and "does not match the aligned model at model.embed_tokens.weight" in errors[0]
    make_model(seed=0, layers=3).save_pretrained(tmp_path / "deeper")
    assert main([*argv, "--base-model", str(tmp_path / "deeper"), "--output", str(tmp_path / "c")]) == 2
    assert "has weights the aligned model lacks" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="--threshold is a cosine"):
        get("safelora").config(model="m", adapter="a", base_model="b", threshold=2.0)
    assert not any(p.name in {"a", "b", "c"} for p in tmp_path.iterdir())


def test_runs_in_the_pipeline(tiny, tiny_run, tmp_path: Path) -> None:
    """In a run, the base model is the run's model and the result is evaluated as an adapter row."""
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    path = copy_run(tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"safelora": {}})
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    rows = {r["model"]: r for r in summary["rows"]}
    report = json.loads((Path(rows["safelora"]["adapter"]) / "safelora_report.json").read_text())
    assert report["config"]["base_model"] == str(tiny["model"]) and report["projected"] >= 0
    assert rows["safelora"]["fa"] is not None
