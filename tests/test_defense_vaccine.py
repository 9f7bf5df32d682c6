"""`vaccine`: the perturbation eps_l = rho * g_l / ||g|| of the attention outputs has global norm rho, raises
the loss to first order by rho * ||g|| (more than a random direction of the same norm), and the update is
the gradient of the loss at the perturbed forward. Checked against gradients taken by hand with autograd
(retain_grad on the attention outputs, own hooks), not the defense's helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from antidote.cli import main
from antidote.defenses import get
from antidote.defenses.vaccine import VaccineConfig, sam_perturbation
from antidote.errors import AntidoteError
from conftest import HARMFUL, make_model, make_tokenizer, write_jsonl

TRAIN = ["--template", "plain", "--epochs", "1", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8"]


def tiny_trainer(tmp_path: Path, cls: type, extra: dict[str, Any], pairs: list[tuple[str, str]]) -> Any:
    """A `cls` trainer on a tiny LoRA model (B non-zero: every LoRA weight has a gradient) and `pairs`."""
    from peft import LoraConfig, get_peft_model

    from antidote.training.config import TrainConfig
    from antidote.training.sft import ResponseCollator, _training_arguments, encode_pairs

    tokenizer = make_tokenizer()
    model = get_peft_model(
        make_model(seed=0),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    config = TrainConfig(lora_r=4, lora_alpha=8, batch_size=len(pairs), epochs=1)
    features = [{"input_ids": ids, "n_prompt": n} for ids, n in encode_pairs(tokenizer, pairs, 64)]
    trainer = cls(
        model=model,
        args=_training_arguments(config, tmp_path / "trainer"),
        train_dataset=features,
        data_collator=ResponseCollator(tokenizer.pad_token_id),
        **extra,
    )
    trainer.current_gradient_accumulation_steps = 1  # as `train()` sets it
    return trainer


def batch_of(trainer: Any) -> dict[str, torch.Tensor]:
    return trainer.data_collator(list(trainer.train_dataset))


PAIRS = [(r["prompt"] + " :", r["response"]) for r in HARMFUL[:3]]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.get_base_model().model.layers]


def loss_with(
    model: Any, batch: dict[str, torch.Tensor], deltas: list[torch.Tensor] | None, keep: list
) -> Any:
    """Mean response CE with delta_l added to attention output l (own hooks); outputs kept in `keep`."""
    handles = []
    for i, module in enumerate(attention_modules(model)):

        def hook(mod: Any, args: Any, output: Any, i: int = i) -> Any:
            hidden = output[0] if deltas is None else output[0] + deltas[i]
            if deltas is None:
                hidden.retain_grad()
            keep.append(hidden)
            return (hidden, *output[1:])

        handles.append(module.register_forward_hook(hook))
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))


def grads_by_hand(model: Any, batch: dict[str, torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
    """(loss, g_l = dL/d attention output l) by plain backward with retain_grad."""
    outs: list[torch.Tensor] = []
    model.zero_grad()
    loss = loss_with(model, batch, None, outs)
    loss.backward()
    grads = [o.grad.detach().clone() for o in outs]
    model.zero_grad()
    return loss, grads


def test_registered_as_an_align_defense_with_rho() -> None:
    defense = get("vaccine")
    assert defense.stage == "align" and "rho" in defense.options()
    assert VaccineConfig().rho == 2.0


def test_perturbation_has_global_norm_rho_and_the_gradient_direction() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(2, 5, 8), 3 * torch.randn(2, 5, 8), torch.randn(1, 3)]
    eps = sam_perturbation(grads, rho=2.0)
    total = torch.sqrt(sum(float((e.double() ** 2).sum()) for e in eps) * torch.ones(()))
    assert float(total) == pytest.approx(2.0, rel=1e-5)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    for g, e in zip(grads, eps, strict=True):
        torch.testing.assert_close(e.double(), 2.0 * g.double() / norm, rtol=1e-5, atol=1e-7)
    assert all(float(e.abs().sum()) == 0 for e in sam_perturbation([torch.zeros(3), torch.zeros(2, 2)], 2.0))


def test_perturbation_raises_the_loss_to_first_order(tmp_path: Path) -> None:
    from antidote.defenses.vaccine import trainer_class

    VaccineTrainer = trainer_class()

    rho = 1e-2
    trainer = tiny_trainer(tmp_path, VaccineTrainer, {"rho": rho}, PAIRS)
    model, batch = trainer.model, batch_of(trainer)
    model.train()
    eps = trainer.perturbation(model, batch)
    loss, grads = grads_by_hand(model, batch)
    g_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    assert g_norm > 0
    for g, e in zip(grads, eps, strict=True):  # eps = rho * g / ||g||, g by hand
        torch.testing.assert_close(e, rho * g / g_norm, rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        rise = float(loss_with(model, batch, eps, []) - loss)
        torch.manual_seed(3)
        noise = [torch.randn_like(g) for g in grads]
        n_norm = float(torch.sqrt(sum((n**2).sum() for n in noise)))
        random_rise = float(loss_with(model, batch, [rho * n / n_norm for n in noise], []) - loss)
    assert rise == pytest.approx(rho * g_norm, rel=0.05)  # <g, eps> = rho * ||g||
    assert rise > random_rise + 0.5 * rho * g_norm


def test_update_is_the_gradient_at_the_perturbed_forward(tmp_path: Path) -> None:
    from antidote.defenses.vaccine import trainer_class

    VaccineTrainer = trainer_class()

    rho = 2.0
    trainer = tiny_trainer(tmp_path, VaccineTrainer, {"rho": rho}, PAIRS)
    model, batch = trainer.model, batch_of(trainer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    _, grads = grads_by_hand(model, batch)
    g_norm = torch.sqrt(sum((g**2).sum() for g in grads))
    eps = [rho * g / g_norm for g in grads]
    loss_at = loss_with(model, batch, eps, [])
    want = dict(zip(params, torch.autograd.grad(loss_at, list(params.values())), strict=True))
    plain = dict(
        zip(
            params, torch.autograd.grad(loss_with(model, batch, None, []), list(params.values())), strict=True
        )
    )
    model.zero_grad()
    trainer.training_step(model, batch)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.allclose(want[n], plain[n], rtol=1e-3, atol=1e-5) for n in params)  # rho matters


def test_run_writes_a_loadable_aligned_model(tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    refusals = write_jsonl(
        tmp_path / "refusals.jsonl", [{"prompt": r["prompt"], "response": "i can not help"} for r in HARMFUL]
    )
    out = tmp_path / "vaccine"
    argv = [
        "defend",
        "vaccine",
        str(tiny["model"]),
        "--data",
        str(refusals),
        "--helpful-data",
        str(tiny["benign"]),
    ]
    assert main([*argv, "--output", str(out), "--rho", "0.5", *TRAIN]) == 0
    assert json.loads((out / "antidote_prompt.json").read_text()) == {"template": "plain"}
    assert json.loads((out / "train_report.json").read_text())["config"]["rho"] == 0.5
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32


@pytest.mark.parametrize("rho", [0.0, -1.0])
def test_bad_rho_is_a_one_line_error(tiny, tmp_path: Path, capsys, rho: float) -> None:
    with pytest.raises(AntidoteError, match="--rho must be positive"):
        VaccineConfig(model=str(tiny["model"]), output=str(tmp_path / "out"), rho=rho)
    argv = ["defend", "vaccine", str(tiny["model"]), "--output", str(tmp_path / "out"), f"--rho={rho}"]
    assert main(argv) == 2
    assert "--rho must be positive" in capsys.readouterr().err and not (tmp_path / "out").exists()
