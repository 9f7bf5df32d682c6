"""`ldifs`: the training loss of every step is CE + the sum over layers of rho/2 * d_l, leaving out each
term at or above the cap (0.1 by default, as the comparison code git-disl/Antidote runs), d_l the feature
distance of layer l recomputed by hand (each
MLP's input caught by a pre-hook, the MLP done by hand with the LoRA deltas B A * alpha/r added, the aligned
side on a separate copy of the aligned model, summed over real tokens only); it is 0 at the fresh LoRA and
positive once the adapter moves, and its gradient holds the features back; `layers` picks the layers; the
defense writes a loadable float32 adapter; bad options are one-line errors before anything is written."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from antidote.cli import main
from antidote.defenses import get
from antidote.defenses.ldifs import LDIFSConfig, feature_distance, mlp_modules, trainer_class
from antidote.training.sft import TrainConfig, fit_lora, label_loss
from conftest import BENIGN, HARMFUL, make_model, make_tokenizer

USER = [(r["instruction"], " " + r["output"]) for r in BENIGN] + [
    (r["prompt"], " " + r["response"]) for r in HARMFUL[:2]
]
SEED = 3  # the aligned model


def test_registered_as_a_finetune_defense() -> None:
    defense = get("ldifs")
    assert defense.stage == "finetune" and {"rho", "layers", "task_data", "epochs"} <= set(defense.options())
    assert LDIFSConfig(model="m", output="o").rho == 1e-4


def test_feature_distance_sums_squares_over_layers_real_tokens_and_dimensions() -> None:
    gen = torch.Generator().manual_seed(0)
    current = [torch.randn(2, 3, 4, generator=gen) for _ in range(2)]
    reference = [torch.randn(2, 3, 4, generator=gen) for _ in range(2)]
    attention = torch.tensor([[1, 1, 1], [1, 1, 0]])
    by_hand = 0.0
    for c, r in zip(current, reference, strict=True):
        for b, length in enumerate((3, 2)):
            for t in range(length):
                by_hand += sum((float(c[b, t, d]) - float(r[b, t, d])) ** 2 for d in range(4))
    assert float(feature_distance(current, reference, attention)) == pytest.approx(by_hand, rel=1e-6)


def test_mlp_modules_are_the_decoder_layers_mlps() -> None:
    model = make_model()
    assert list(mlp_modules(model, None)) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert list(mlp_modules(model, [1])) == ["model.layers.1.mlp"]
    with pytest.raises(Exception, match=r"--layers 2: the model's MLP layers are 0\.\.1"):
        mlp_modules(model, [0, 2])


def _mlp_by_hand(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """LlamaMLP: down(silu(gate x) * up x). x: (B, T, D); weights (out, in) by projection name."""
    gate = torch.nn.functional.silu(x @ weights["gate_proj"].T)
    return (gate * (x @ weights["up_proj"].T)) @ weights["down_proj"].T


def _mlp_inputs(model: Any, names: list[str], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    caught: list[torch.Tensor] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, args: caught.append(args[0])) for n in names]
    try:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return caught


def distance_by_hand(
    model: Any, aligned: Any, inputs: dict[str, torch.Tensor], layers: Sequence[int]
) -> list[float]:
    """The LDIFS distance d_l of each layer from the weights alone: the trained side's MLP with
    W + B A * alpha / r."""
    params = dict(model.named_parameters())
    scale = model.peft_config["default"].lora_alpha / model.peft_config["default"].r
    prefix = "base_model.model.model.layers"
    current = _mlp_inputs(model, [f"{prefix}.{i}.mlp" for i in layers], inputs)
    reference = _mlp_inputs(aligned, [f"model.layers.{i}.mlp" for i in layers], inputs)
    lengths = inputs["attention_mask"].sum(1).tolist()
    per_layer = []
    for i, x_cur, x_ref in zip(layers, current, reference, strict=True):
        mlp = f"{prefix}.{i}.mlp"
        trained = {
            p: params[f"{mlp}.{p}.base_layer.weight"].double()
            + params[f"{mlp}.{p}.lora_B.default.weight"].double()
            @ params[f"{mlp}.{p}.lora_A.default.weight"].double()
            * scale
            for p in ("gate_proj", "up_proj", "down_proj")
        }
        plain = {p: aligned.get_parameter(f"model.layers.{i}.mlp.{p}.weight").double() for p in trained}
        diff = _mlp_by_hand(x_cur.double(), trained) - _mlp_by_hand(x_ref.double(), plain)
        per_layer.append(sum(float(diff[b, :n].pow(2).sum()) for b, n in enumerate(lengths)))
    return per_layer


def run_recorded(
    tmp_path: Path, rho: float, layers: tuple[int, ...] | None, cap: float = 0.0
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """Train 2 epochs of 3 batches; per step: loss, CE and the distance by hand; and Trainer's log."""
    records: list[dict[str, float]] = []
    aligned = make_model(seed=SEED)  # the aligned model, kept apart from the one being trained

    class Recording(trainer_class()):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                by_hand = distance_by_hand(model, aligned, inputs, layers or (0, 1))
                ce = float(label_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"]))
            padded = bool((inputs["attention_mask"] == 0).any())
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            records.append({"loss": float(loss.detach()), "ce": ce, "by_hand": by_hand, "padded": padded})
            return loss

    config = TrainConfig(lora_r=2, lr=5e-2, epochs=2, batch_size=3, scheduler="constant", seed=1)
    trained = fit_lora(
        make_model(seed=SEED),
        make_tokenizer(),
        USER,
        config,
        output_dir=tmp_path / "work",
        trainer_class=Recording,
        extra={"rho": rho, "layers": layers, "layer_cap": cap},
    )
    return records, trained.trainer.state.log_history


@pytest.mark.parametrize("layers", [None, (1,)])
def test_loss_is_ce_plus_rho_half_times_the_feature_distance_by_hand(tmp_path: Path, layers) -> None:
    rho = 1e-2
    records, log_history = run_recorded(tmp_path, rho, layers)  # cap 0: every layer's term counts
    assert len(records) == 6 and any(r["padded"] for r in records)  # 3 steps x 2 epochs; padding occurs
    assert sum(records[0]["by_hand"]) == 0.0  # fresh LoRA: B = 0, the same features as the aligned model
    assert records[0]["loss"] == pytest.approx(records[0]["ce"], abs=1e-6)
    assert all(sum(r["by_hand"]) > 1e-2 for r in records[1:])  # the adapter moved: the features moved
    for r in records:
        assert r["loss"] - r["ce"] == pytest.approx(rho / 2 * sum(r["by_hand"]), rel=1e-4, abs=5e-6)
    logged = [h["feature_distance"] for h in log_history if "feature_distance" in h]
    assert logged == pytest.approx([sum(r["by_hand"]) for r in records], rel=1e-4, abs=1e-6)


def test_a_layer_term_at_or_above_the_cap_is_left_out(tmp_path: Path) -> None:
    """With the comparison code's cap 0.1 and a rho large enough that some layer terms pass it, exactly
    the terms below 0.1 count (some steps have both kinds)."""
    assert LDIFSConfig(model="m", output="o").layer_cap == 0.1
    rho, cap = 0.5, 0.1
    records, _ = run_recorded(tmp_path, rho, None, cap=cap)
    kept = skipped = 0
    for r in records:
        terms = [rho / 2 * d for d in r["by_hand"]]
        expected = sum(t for t in terms if t < cap)
        assert r["loss"] - r["ce"] == pytest.approx(expected, rel=1e-4, abs=5e-6)
        kept += sum(0 < t < cap for t in terms)
        skipped += sum(t >= cap for t in terms)
    assert kept > 0 and skipped > 0, (kept, skipped)


def test_run_writes_a_loadable_float32_adapter(tiny, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = LDIFSConfig(
        model=str(tiny["model"]),
        task="pairs",
        task_data=str(tiny["benign"]),
        harmful=str(tiny["harmful"]),
        harmful_ratio=0.5,
        num_samples=6,
        template="plain",
        epochs=1,
        batch_size=2,
        lora_r=4,
        lora_alpha=8,
        layers="0,1",
        output=str(tmp_path / "out"),
    )
    out = get("ldifs").run(config)[""]
    assert json.loads((out / "antidote_prompt.json").read_text()) == {"template": "plain"}
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 3 and report["config"]["layers"] == "0,1" and report["config"]["rho"] == 1e-4
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora) and any(p.abs().sum() > 0 for p in lora)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--rho=-1e-4"], "--rho must be 0 or more"),
        (["--layers", "a,b"], "give layer indices like 0,5,10, or all"),
        (["--layers", "-1"], "give layer indices 0 or more"),
        (
            ["--layers", "0,7"],
            "--layers 7: the model's MLP layers are 0..1",
        ),  # found once the model is loaded
    ],
)
def test_bad_input_is_a_one_line_error_before_anything_is_written(
    tiny, tmp_path, capsys, extra, expected
) -> None:
    argv = ["defend", "ldifs", str(tiny["model"]), "--output", str(tmp_path / "out"), "--num-samples", "6"]
    assert main([*argv, "--template", "plain", *extra]) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_the_penalty_holds_the_features_near_the_aligned_model(tmp_path: Path) -> None:
    free, _ = run_recorded(tmp_path / "free", rho=0.0, layers=None)
    held, _ = run_recorded(tmp_path / "held", rho=2.0, layers=None)  # no cap: rho/2 = 1
    assert all(r["loss"] == r["ce"] for r in free)  # rho 0: plain fine-tuning
    assert sum(held[-1]["by_hand"]) < 0.2 * sum(free[-1]["by_hand"])  # its gradient reaches the adapter
