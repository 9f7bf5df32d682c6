"""`antidote align` and `antidote finetune` on the tiny model: outputs reload, counts, presets, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.errors import AntidoteError
from antidote.training.stages import PAPER, FinetuneConfig, attack_mix
from conftest import HARMFUL, write_jsonl

TRAIN = ["--template", "plain", "--epochs", "1", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8"]


def test_align_then_finetune(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    refusals = write_jsonl(
        tmp_path / "refusals.jsonl",
        [{"prompt": r["prompt"], "response": "i can not help with that"} for r in HARMFUL],
    )
    aligned = tmp_path / "aligned"
    assert (
        main(
            [
                "align",
                str(tiny["model"]),
                "--data",
                str(refusals),
                "--helpful-data",
                str(tiny["benign"]),
                "--output",
                str(aligned),
                "--keep-adapter",
                *TRAIN,
            ]
        )
        == 0
    )
    assert json.loads((aligned / "antidote_prompt.json").read_text()) == {"template": "plain"}
    report = json.loads((aligned / "train_report.json").read_text())
    assert report["refusals"] == 10 and report["helpful"] == 6 and report["steps"] == 4
    before = load_file(tiny["model"] / "model.safetensors")
    after = load_file(aligned / "model.safetensors")
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )  # the merged LoRA changed it
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert (aligned / "adapter" / "adapter_config.json").is_file()

    attack = tmp_path / "attack"
    assert (
        main(
            [
                "finetune",
                str(aligned),
                "--task-data",
                str(tiny["benign"]),
                "--harmful",
                str(tiny["harmful"]),
                "--harmful-ratio",
                "0.5",
                "--num-samples",
                "6",
                "--output",
                str(attack),
                *TRAIN,
            ]
        )
        == 0
    )
    report = json.loads((attack / "train_report.json").read_text())
    assert report["samples"] == 6 and report["harmful"] == 3
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned), attack)


def test_attack_mix_counts_and_limits() -> None:
    task = [(f"t{i}", "", "a") for i in range(10)]
    harmful = [(f"h{i}", "", "b") for i in range(4)]
    mix, n_harmful = attack_mix(task, harmful, 10, 0.2, seed=0)
    assert n_harmful == 2 and len(mix) == 10 and sum(p.startswith("h") for p, _, _ in mix) == 2
    assert attack_mix(task, harmful, 10, 0.2, seed=0) == (mix, 2)  # seeded
    with pytest.raises(AntidoteError, match="lower N"):
        attack_mix(task, harmful, 10, 0.5, seed=0)  # needs 5 harmful, has 4


def test_paper_preset_sets_the_reference_hyper_parameters() -> None:
    config = FinetuneConfig(model="m", output="o", preset="paper")
    assert {k: getattr(config, k) for k in PAPER} == PAPER
    assert config.train_config().target_modules == ("q_proj", "k_proj", "v_proj")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--harmful-ratio", "1.5"], "outside [0, 1]"),
        (["--num-samples", "0"], "at least 1"),
        (["--preset", "fast"], "choose paper"),
        (["--task", "poems"], "choose one of sentiment, arithmetic"),
        (["--num-samples", "100000"], "lower N"),
        (["--scheduler", "linear"], "cosine or constant"),
    ],
)
def test_finetune_bad_input(tiny, tmp_path, capsys, extra, expected) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert main(["finetune", str(tiny["model"]), "--output", str(out), *extra]) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
