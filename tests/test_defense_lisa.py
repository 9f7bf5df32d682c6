"""`lisa`: alignment and user steps alternate on the schedule written out by hand, each alignment step trains
on an alignment batch, the proximal term is rho/2 * sum ||w - w_phase_start||^2 recomputed by hand from
the weights each step saw (0 in the first 10% of steps), the step count is the plain fine-tuning's, and the
defense writes a loadable float32 adapter. Bad options are one-line errors before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from antidote.cli import main
from antidote.defenses import get
from antidote.defenses.lisa import ALIGNMENT, FINETUNE, LisaConfig, lisa_phase, trainer_class
from antidote.training.sft import TrainConfig, encode_pairs, fit_lora, label_loss
from conftest import BENIGN, HARMFUL, make_model, make_tokenizer, write_jsonl

A, F = ALIGNMENT, FINETUNE
USER = [(r["instruction"], " " + r["output"]) for r in BENIGN] + [("tell me the plan", " go home")]
REFUSALS = [(r["prompt"], " i can not help with that") for r in HARMFUL[:3]]


def test_registered_as_a_finetune_defense() -> None:
    defense = get("lisa")
    assert defense.stage == "finetune"
    assert {"align_data", "max_align", "align_steps", "finetune_steps", "rho"} <= set(defense.options())
    assert {"task_data", "harmful_ratio", "epochs"} <= set(defense.options())  # the fine-tuning's own options


def test_phase_schedule_by_hand() -> None:
    assert [lisa_phase(s, 2, 3) for s in range(12)] == [A, A, F, F, F, A, A, F, F, F, A, A]
    assert [lisa_phase(s, 1, 9) for s in range(21)] == ([A] + [F] * 9) * 2 + [A]


def _rows(batch: dict[str, torch.Tensor]) -> set[tuple[int, ...]]:
    return {
        tuple(ids[mask.bool()].tolist())
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    }


def run_recorded(
    tmp_path: Path, rho: float, epochs: int = 3, steps: tuple[int, int] = (2, 3)
) -> tuple[list[dict[str, Any]], Any, set, set]:
    """Train with (align_steps, finetune_steps) `steps` on 7 user pairs (batch 2: 4 steps per epoch),
    keeping for every step its batch rows, loss - CE of that batch, and the trainable weights it started
    from."""
    records: list[dict[str, Any]] = []

    class Recording(trainer_class()):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                ce = label_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            records.append(
                {
                    "step": self.state.global_step,
                    "rows": _rows(inputs),
                    "extra": float(loss.detach()) - float(ce),
                    "weights": {
                        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                    },
                }
            )
            return loss

    tokenizer = make_tokenizer()
    aligned = encode_pairs(tokenizer, REFUSALS, 64)
    config = TrainConfig(lora_r=2, lr=5e-2, epochs=epochs, batch_size=2, scheduler="constant", seed=1)
    trained = fit_lora(
        make_model(seed=3),
        tokenizer,
        USER,
        config,
        output_dir=tmp_path / "work",
        trainer_class=Recording,
        extra={
            "align_dataset": [{"input_ids": i, "n_prompt": n} for i, n in aligned],
            "align_steps": steps[0],
            "finetune_steps": steps[1],
            "rho": rho,
        },
    )
    align_rows = {tuple(i) for i, _ in aligned}
    user_rows = {tuple(i) for i, _ in encode_pairs(tokenizer, USER, 64)}
    return records, trained, align_rows, user_rows


def test_steps_follow_the_schedule_and_the_proximal_term_is_by_hand(tmp_path: Path) -> None:
    rho = 5.0
    records, trained, align_rows, user_rows = run_recorded(tmp_path, rho)
    total = math.ceil(len(USER) / 2) * 3
    assert trained.trainer.state.global_step == total == 12 and len(trained.losses) == total
    assert [r["step"] for r in records] == list(range(total))

    # The schedule, by hand: A A F F F ...; alignment steps see only alignment pairs, user steps only user's.
    expected = [A, A, F, F, F, A, A, F, F, F, A, A]
    seen = [A if r["rows"] <= align_rows else F if r["rows"] <= user_rows else "mixed" for r in records]
    assert seen == expected

    # The anchor of a step is the weights at the start of its phase (= the end of the other state's last
    # phase; the initial weights in the first one). The term is on after 10% of 12 steps: from step 2.
    starts = [s if s == 0 or expected[s] != expected[s - 1] else None for s in range(total)]
    by_hand = []
    for s, record in enumerate(records):
        start = max(t for t in range(s + 1) if starts[t] is not None)
        anchor = records[start]["weights"]
        by_hand.append(
            rho
            / 2
            * sum(float((w.double() - anchor[n].double()).pow(2).sum()) for n, w in record["weights"].items())
        )
    assert by_hand[1] > 1e-3  # step 1 has left its anchor: a term switched on too early would show
    assert [r["extra"] for r in records[:2]] == pytest.approx([0.0, 0.0], abs=1e-6)  # the first 10%: off
    for s in range(2, total):
        assert records[s]["extra"] == pytest.approx(by_hand[s], rel=1e-4, abs=5e-6), s
    assert min(by_hand[s] for s in range(2, total) if starts[s] is None) > 1e-3  # the term is exercised
    assert all(by_hand[s] == 0 for s in range(total) if starts[s] is not None)  # zero at each phase start
    logged = [h for h in trained.trainer.state.log_history if "proximal" in h]
    assert [h["alignment_step"] for h in logged] == [float(p == A) for p in expected]
    assert [h["proximal"] for h in logged] == pytest.approx([0.0, 0.0, *by_hand[2:]], rel=1e-4, abs=1e-6)


def test_at_the_defaults_the_proximal_term_acts_on_both_sides_and_changes_the_update(tmp_path: Path) -> None:
    """With the default phase lengths and rho, some alignment steps and some user steps carry a non-zero
    proximal term (an alignment phase of one step never does: its anchor is the weights it starts from),
    and the trained weights differ from the same run without the term."""
    defaults = LisaConfig(model="m", output="o")
    steps, rho = (defaults.align_steps, defaults.finetune_steps), defaults.rho
    assert rho > 0 and steps[0] >= 2
    records, trained, *_ = run_recorded(tmp_path / "on", rho, steps=steps)
    phases = [lisa_phase(r["step"], *steps) for r in records]
    assert max(r["extra"] for r, p in zip(records, phases, strict=True) if p == A) > 1e-4
    assert max(r["extra"] for r, p in zip(records, phases, strict=True) if p == F) > 1e-4
    _, plain, *_ = run_recorded(tmp_path / "off", 0.0, steps=steps)
    on, off = (dict(t.model.named_parameters()) for t in (trained, plain))
    lora = [n for n in on if "lora_" in n]
    assert lora and any(not torch.allclose(on[n], off[n], atol=1e-6) for n in lora)


def test_rho_zero_leaves_the_cross_entropy_alone(tmp_path: Path) -> None:
    records, *_ = run_recorded(tmp_path, rho=0.0, epochs=1)
    assert [round(r["extra"], 6) for r in records] == [0.0] * 4


def _config(tiny: dict[str, Path], tmp_path: Path, **changes: Any) -> LisaConfig:
    refusals = write_jsonl(
        tmp_path / "refusals.jsonl", [{"prompt": r["prompt"], "response": "i can not help"} for r in HARMFUL]
    )
    values: dict[str, Any] = {
        "model": str(tiny["model"]),
        "task": "pairs",
        "task_data": str(tiny["benign"]),
        "harmful": str(tiny["harmful"]),
        "harmful_ratio": 0.5,
        "num_samples": 6,
        "align_data": str(refusals),
        "template": "plain",
        "epochs": 2,
        "batch_size": 2,
        "lora_r": 4,
        "lora_alpha": 8,
        "output": str(tmp_path / "out"),
        **changes,
    }
    return LisaConfig(**values)


def test_run_writes_a_loadable_float32_adapter(tiny, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = get("lisa").run(_config(tiny, tmp_path, align_steps=1, finetune_steps=2))[""]
    assert json.loads((out / "antidote_prompt.json").read_text()) == {"template": "plain"}
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 6 and report["samples"] == 6  # 3 batches x 2 epochs, as plain fine-tuning
    assert report["config"]["align_steps"] == 1 and report["config"]["rho"] == 1.0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out)
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert any(p.abs().sum() > 0 for p in lora.values())  # it trained


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--rho", "-1"], "--rho must be 0 or more"),
        (["--align-steps", "0"], "--align-steps must be at least 1"),
        (["--finetune-steps", "0"], "--finetune-steps must be at least 1"),
        (["--max-align", "0"], "--max-align must be at least 1"),
        (["--align-data", "EMPTY"], "holds no records"),
    ],
)
def test_bad_input_is_a_one_line_error_before_anything_is_written(
    tiny, tmp_path, capsys, extra, expected
) -> None:
    empty = tmp_path / "data" / "empty.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    argv = ["defend", "lisa", str(tiny["model"]), "--output", str(tmp_path / "out"), "--num-samples", "6"]
    assert main([*argv, *extra]) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no output, no temporary folder
