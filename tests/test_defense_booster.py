"""`booster`: after one training step the LoRA gradients equal grad f(w) + lam * (grad h(w) - grad h(w -
a * grad h / ||grad h||)), each term computed here by separate autograd calls on a hand-written loss, and the
weights are back where they were. Plus the harmful step's norm, an end-to-end run and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from antidote.cli import main
from antidote.defenses import get
from antidote.defenses.booster import BoosterConfig, harmful_shift
from antidote.errors import AntidoteError
from conftest import HARMFUL, make_tokenizer, write_jsonl
from test_defense_vaccine import TRAIN, batch_of, tiny_trainer

ALIGN = [(r["prompt"] + " :", "i can not help") for r in HARMFUL[:3]]
HARM = [(r["prompt"] + " :", r["response"]) for r in HARMFUL[3:6]]


def ce(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, from the full logits (no label-position trick)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    )


def test_registered_as_an_align_defense_with_the_paper_defaults() -> None:
    defense = get("booster")
    assert defense.stage == "align" and {"harmful_data", "lam", "step_size"} <= set(defense.options())
    config = BoosterConfig()
    assert (config.lam, config.step_size, config.harmful_data) == (5.0, 0.1, "builtin")


def test_harmful_shift_is_a_descent_step_of_norm_a() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(4, 3), torch.randn(7)]
    shift = harmful_shift(grads, 0.1)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    assert float(torch.sqrt(sum((s**2).sum() for s in shift))) == pytest.approx(0.1, rel=1e-5)
    for g, s in zip(grads, shift, strict=True):
        torch.testing.assert_close(s, -0.1 * g / norm)


def test_applied_gradient_is_the_booster_formula(tmp_path: Path) -> None:
    from antidote.defenses.booster import trainer_class

    BoosterTrainer = trainer_class()
    from antidote.training.sft import ResponseCollator, encode_pairs

    lam, a = 5.0, 0.1
    tokenizer = make_tokenizer()
    harmful = [{"input_ids": i, "n_prompt": n} for i, n in encode_pairs(tokenizer, HARM, 64)]
    trainer = tiny_trainer(tmp_path, BoosterTrainer, {"harmful": harmful, "lam": lam, "step_size": a}, ALIGN)
    model, batch = trainer.model, batch_of(trainer)
    harmful_batch = ResponseCollator(tokenizer.pad_token_id)(harmful)  # the whole harmful set is one batch
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    model.train()

    g_f = torch.autograd.grad(ce(model, batch), params)
    g_h = torch.autograd.grad(ce(model, harmful_batch), params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g_h))
    with torch.no_grad():
        for p, g in zip(params, g_h, strict=True):
            p.sub_((a * g.double() / norm).to(p.dtype))
    g_h_after = torch.autograd.grad(ce(model, harmful_batch), params)
    with torch.no_grad():
        for p, value in zip(params, before, strict=True):
            p.copy_(value)
    want = [f + lam * (h - h2) for f, h, h2 in zip(g_f, g_h, g_h_after, strict=True)]

    model.zero_grad()
    trainer.training_step(model, batch)
    for name, p, w, b in zip(names, params, want, before, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(p.detach(), b), name  # the shifted weights were restored exactly
    assert any(not torch.allclose(w, f, rtol=1e-3, atol=1e-5) for w, f in zip(want, g_f, strict=True))


def test_run_writes_a_loadable_aligned_model(tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    refusals = write_jsonl(
        tmp_path / "refusals.jsonl", [{"prompt": r["prompt"], "response": "i can not help"} for r in HARMFUL]
    )
    out = tmp_path / "booster"
    argv = [
        "defend",
        "booster",
        str(tiny["model"]),
        "--data",
        str(refusals),
        "--harmful-data",
        str(tiny["harmful"]),
    ]
    assert (
        main([*argv, "--helpful-data", str(tiny["benign"]), "--output", str(out), "--lam", "2", *TRAIN]) == 0
    )
    assert json.loads((out / "antidote_prompt.json").read_text()) == {"template": "plain"}
    assert json.loads((out / "train_report.json").read_text())["config"]["lam"] == 2.0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--step-size", "0"], "--step-size must be positive"),
        (["--lam", "-1"], "--lam must be at least 0"),
        (["--harmful-data", "EMPTY"], "holds no records"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny, tmp_path: Path, capsys, options, expected) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    options = [str(empty) if o == "EMPTY" else o for o in options]
    out = tmp_path / "out"
    assert main(["defend", "booster", str(tiny["model"]), "--output", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and not out.exists()
    if options[0] != "--harmful-data":
        with pytest.raises(AntidoteError, match=expected):
            BoosterConfig(
                model=str(tiny["model"]),
                output=str(out),
                **{options[0][2:].replace("-", "_"): float(options[1])},
            )
