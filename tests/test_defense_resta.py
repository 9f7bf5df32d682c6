"""`resta`: the written model equals W_ft + gamma (W_aligned - W_unaligned) on every weight, W_ft being the
aligned model with the adapter's B A * alpha / r added, all computed by hand from the saved files (the
unaligned model a full model, or a LoRA adapter on the aligned model: then V = -its B A * alpha / r); with
DARE, about a fraction 1 - p of the sparsified delta's entries survive, each scaled by 1 / (1 - p). In a
run the unaligned model is a cached stage: the attack's settings on harmful samples only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get
from antidote.errors import AntidoteError
from conftest import copy_run

PREFIX = "base_model.model."


def weights_by_hand(tiny: dict[str, Path]) -> tuple[dict[str, torch.Tensor], ...]:
    """(W_ft, V = W_aligned - W_unaligned, dW) per weight name, from the files alone (dW only at LoRA
    layers); the unaligned model is the full model `reference`."""
    aligned = load_file(tiny["model"] / "model.safetensors")
    base = load_file(tiny["reference"] / "model.safetensors")
    adapter = load_file(tiny["adapter"] / "adapter_model.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    delta = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace("lora_A", "lora_B")]
            delta[key.split(".lora_A.")[0].removeprefix(PREFIX) + ".weight"] = (
                b @ a * (cfg["lora_alpha"] / cfg["r"])
            )
    finetuned = {k: w + delta[k] if k in delta else w for k, w in aligned.items()}
    return finetuned, {k: w - base[k] for k, w in aligned.items()}, delta


def defend(tiny: dict[str, Path], out: Path, *options: str) -> dict[str, torch.Tensor]:
    argv = ["defend", "resta", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--unaligned", str(tiny["reference"]), "--output", str(out), *options]) == 0
    return load_file(out / "model.safetensors")


def test_registered_as_a_data_free_post_defense() -> None:
    defense = get("resta")
    assert defense.stage == "post" and "data" not in defense.options()
    assert {"gamma", "drop_rate", "dare_on", "seed", "unaligned", "unaligned_samples"} <= set(
        defense.options()
    )


def test_an_unaligned_adapter_gives_minus_its_update_as_the_safety_vector(tiny, tmp_path: Path) -> None:
    """The unaligned model = the aligned model + the same adapter as the attack: V = -dW on the LoRA
    layers and 0 elsewhere, so gamma 1 gives back W_aligned exactly and gamma 0.25 keeps 3/4 of dW."""
    _, _, delta = weights_by_hand(tiny)
    aligned = load_file(tiny["model"] / "model.safetensors")
    argv = ["defend", "resta", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    for gamma in (1.0, 0.25):
        out_dir = tmp_path / f"out{gamma}"
        assert (
            main(
                [*argv, "--unaligned", str(tiny["adapter"]), "--gamma", str(gamma), "--output", str(out_dir)]
            )
            == 0
        )
        out = load_file(out_dir / "model.safetensors")
        for name, w in aligned.items():
            expected = w + (1 - gamma) * delta[name] if name in delta else w
            torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-6, msg=name)
        assert json.loads((out_dir / "resta_report.json").read_text())["tensors"] == len(delta) == 4


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_without_dare_adds_gamma_times_the_safety_vector_to_every_weight(
    tiny, tmp_path: Path, gamma: float
) -> None:
    finetuned, safety, _ = weights_by_hand(tiny)
    out = defend(tiny, tmp_path / "out", "--gamma", str(gamma))
    assert set(out) == set(finetuned)  # a full model: every weight, the adapter merged
    for name, w in finetuned.items():
        torch.testing.assert_close(out[name], w + gamma * safety[name], rtol=1e-6, atol=1e-7, msg=name)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_dare_on_the_safety_vector_keeps_about_1_minus_p_scaled_up(tiny, tmp_path: Path) -> None:
    finetuned, safety, _ = weights_by_hand(tiny)
    p = 0.3
    out = defend(tiny, tmp_path / "out", "--drop-rate", str(p), "--dare-on", "safety", "--seed", "3")
    kept = total = 0
    for name, w in finetuned.items():
        added = out[name] - w
        v = safety[name]
        is_kept = (added - v / (1 - p)).abs() <= 1e-5 * (1 + v.abs())
        is_dropped = added.abs() <= 1e-6
        assert (is_kept | is_dropped).all(), name  # each entry is either v / (1 - p) or nothing
        kept += int((is_kept & (v != 0)).sum())
        total += int((v != 0).sum())
    assert total > 20_000
    assert kept / total == pytest.approx(1 - p, abs=0.02)
    report = json.loads((tmp_path / "out" / "resta_report.json").read_text())
    assert report["dare"]["kept"] / report["dare"]["entries"] == pytest.approx(kept / total, abs=1e-3)


def test_dare_on_the_finetuning_delta_sparsifies_only_the_adapter_update(tiny, tmp_path: Path) -> None:
    finetuned, safety, delta = weights_by_hand(tiny)
    p = 0.5
    out = defend(tiny, tmp_path / "out", "--drop-rate", str(p))  # dare_on finetune is the default
    kept = total = 0
    for name, w in finetuned.items():
        if name not in delta:  # no adapter here: exactly W_aligned + V
            torch.testing.assert_close(out[name], w + safety[name], rtol=1e-6, atol=1e-7, msg=name)
            continue
        added = out[name] - (w - delta[name] + safety[name])  # what remains of dW
        is_kept = (added - delta[name] / (1 - p)).abs() <= 1e-5
        is_dropped = added.abs() <= 1e-5
        assert (is_kept | is_dropped).all(), name
        kept += int(is_kept.sum())
        total += added.numel()
    assert total == 2 * (32 * 32 + 16 * 32)  # q_proj and v_proj of two layers
    assert kept / total == pytest.approx(1 - p, abs=0.05)


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = ["defend", "resta", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 2
    assert "resta needs --unaligned" in capsys.readouterr().err
    base = ["--unaligned", str(tiny["reference"]), "--output", str(tmp_path / "b")]
    assert main([*argv, *base, "--drop-rate", "1"]) == 2
    assert "--drop-rate is a probability in [0, 1)" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="unknown --dare-on 'both'"):
        get("resta").config(model="m", adapter="a", dare_on="both")
    assert not list(tmp_path.iterdir())


def test_runs_in_the_pipeline_on_a_harmful_fine_tuned_unaligned_stage(tiny, tiny_run, tmp_path: Path) -> None:
    """In a run the result is a full model row; the unaligned model is the stage `resta-unaligned`, the
    aligned model fine-tuned with the attack's settings on harmful samples only (not the base model)."""
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"resta": {"gamma": 0.5}}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    row = next(r for r in summary["rows"] if r["model"] == "resta")
    assert row["adapter"] is None
    report = json.loads((Path(row["model_path"]) / "resta_report.json").read_text())
    assert report["config"]["gamma"] == 0.5
    unaligned = Path(report["config"]["unaligned"])
    assert unaligned.name.startswith("resta-unaligned-") and unaligned.name in summary["stages"]["built"]
    trained = json.loads((unaligned / "train_report.json").read_text())
    attack = yaml.safe_load(path.read_text())["finetune"]
    n_harmful = round(attack["harmful_ratio"] * attack["num_samples"])
    assert trained["samples"] == trained["harmful"] == n_harmful > 0
    assert Path(trained["config"]["model"]).name.startswith("align-")  # fine-tuned from the aligned model
