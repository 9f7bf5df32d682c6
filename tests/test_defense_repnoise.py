"""`repnoise`: the RBF-kernel MMD against a by-hand numpy computation; the trainer's harmful CE (with and
without the logit lens) and noise term against a forward with own hooks; one gradient step on the noise term
lowers the MMD of the harmful representations to Gaussian noise; the ascent term's gradient sign; the loss
as a whole; the paired-data check, an end-to-end run and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from antidote.cli import main
from antidote.defenses import get
from antidote.defenses.repnoise import RepNoiseConfig, check_paired, mmd_rbf, repnoise_loss
from antidote.errors import AntidoteError
from conftest import HARMFUL, make_tokenizer, write_jsonl
from test_defense_vaccine import TRAIN, batch_of, tiny_trainer

ALIGN = [(r["prompt"] + " :", "i can not help") for r in HARMFUL[:3]]
HARM = [(r["prompt"] + " :", r["response"]) for r in HARMFUL[3:6]]


def mmd_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """The authors' kernel (5 RBF bandwidths 2^k s / 4, s the mean squared distance of distinct points)."""
    points = np.concatenate([x, y]).astype(np.float64)
    count = len(points)
    sq = np.array([[float(((a - b) ** 2).sum()) for b in points] for a in points])
    s = sq.sum() / (count * count - count) / 4
    k = sum(np.exp(-sq / (s * 2**i)) for i in range(5))
    n = len(x)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def harmful_trainer(tmp_path: Path, **extra: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    from antidote.defenses.repnoise import trainer_class

    RepNoiseTrainer = trainer_class()
    from antidote.training.sft import ResponseCollator, encode_pairs

    tokenizer = make_tokenizer()
    harmful = [{"input_ids": i, "n_prompt": n} for i, n in encode_pairs(tokenizer, HARM, 64)]
    trainer = tiny_trainer(tmp_path, RepNoiseTrainer, {"harmful": harmful, **extra}, ALIGN)
    return trainer, ResponseCollator(tokenizer.pad_token_id)(harmful)


def by_hand(model: Any, batch: dict[str, torch.Tensor], seed: int) -> tuple[float, float, float]:
    """(final CE, logit-lens CE at layer 0, mean over layers of MMD(masked MLP output, masked noise))."""
    base = model.get_base_model()
    outs: list[torch.Tensor] = []
    handles = [layer.mlp.register_forward_hook(lambda m, a, o: outs.append(o)) for layer in base.model.layers]
    try:
        with torch.no_grad():
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            )
    finally:
        for h in handles:
            h.remove()
    labels = batch["labels"][:, 1:].reshape(-1)

    def ce(logits: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels))

    lens = base.lm_head(base.model.norm(out.hidden_states[1]))
    torch.manual_seed(seed)
    mask = (batch["labels"] != -100).unsqueeze(-1).float()
    mmds = []
    for h in outs:
        noise = torch.randn_like(h)
        x, y = (h * mask).reshape(len(h), -1), (noise * mask).reshape(len(h), -1)
        mmds.append(mmd_by_hand(x.numpy(), y.numpy()))
    return ce(out.logits), ce(lens), float(np.mean(mmds))


def test_registered_as_an_align_defense_with_the_paper_defaults() -> None:
    defense = get("repnoise")
    assert defense.stage == "align" and {"harmful_data", "alpha", "beta"} <= set(defense.options())
    config = RepNoiseConfig()
    # The Antidote paper's RepNoise runs (git-disl/Antidote script/alignment/repNoise.sh): alpha 0.1.
    assert (config.alpha, config.beta, config.harmful_data) == (0.1, 0.001, "builtin")


@pytest.mark.parametrize(("n", "m"), [(3, 3), (2, 4)])
def test_mmd_matches_the_kernel_formula(n: int, m: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(n, 5) + 0.5, torch.randn(m, 5)
    assert float(mmd_rbf(x, y)) == pytest.approx(mmd_by_hand(x.numpy(), y.numpy()), rel=1e-5, abs=1e-7)
    same = torch.randn(4, 5)
    assert abs(float(mmd_rbf(same, same.clone()))) < 1e-6


def test_harmful_terms_match_a_forward_by_hand(tmp_path: Path) -> None:
    trainer, harmful = harmful_trainer(tmp_path)
    ce_final, ce_lens, mmd = by_hand(trainer.model, harmful, seed=5)
    with torch.no_grad():
        torch.manual_seed(5)
        ce, noise = trainer.harmful_terms(trainer.model, harmful)
        trainer.logit_lens = True
        ce_with_lens, _ = trainer.harmful_terms(trainer.model, harmful)
    assert float(ce) == pytest.approx(ce_final, rel=1e-5)
    assert float(noise) == pytest.approx(mmd, rel=1e-4)
    assert float(ce_with_lens) == pytest.approx((ce_final + ce_lens) / 2, rel=1e-5)


def test_a_step_on_the_noise_term_moves_harmful_representations_towards_noise(tmp_path: Path) -> None:
    trainer, harmful = harmful_trainer(tmp_path)
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    _, noise = trainer.harmful_terms(model, harmful)
    grads = torch.autograd.grad(noise, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    assert float(norm) > 0
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(0.05 * g / norm)
    _, _, after = by_hand(model, harmful, seed=7)  # the same noise sample, independent MMD
    assert after < float(noise.detach())


def test_the_ascent_term_raises_the_harmful_loss() -> None:
    harmful = torch.tensor(1.7, requires_grad=True)
    loss = repnoise_loss(torch.tensor(0.3), harmful, torch.tensor(0.2), alpha=1.0, beta=0.001)
    assert float(loss.detach()) == pytest.approx(0.3 - math.log(2.7) + 0.0002)
    (grad,) = torch.autograd.grad(loss, harmful)
    assert float(grad) == pytest.approx(-1.0 / 2.7)  # d/dc [-alpha log(c + 1)] < 0: descent raises c


def test_a_step_on_the_ascent_term_raises_the_harmful_ce(tmp_path: Path) -> None:
    trainer, harmful = harmful_trainer(tmp_path, alpha=1.0, beta=0.0)
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    ce, noise = trainer.harmful_terms(model, harmful)
    grads = torch.autograd.grad(repnoise_loss(torch.tensor(0.0), ce, noise, 1.0, 0.0), params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(0.05 * g)
    assert by_hand(model, harmful, seed=0)[0] > float(ce.detach())


def test_the_step_loss_combines_the_three_terms(tmp_path: Path) -> None:
    trainer, harmful = harmful_trainer(tmp_path, alpha=0.5, beta=2.0)
    batch = batch_of(trainer)
    ce_align = by_hand(trainer.model, batch, seed=0)[0]
    ce_harm, _, mmd = by_hand(trainer.model, harmful, seed=9)
    trainer.harmful.next = lambda: harmful  # the rows in this order (the noise is drawn per row)
    with torch.no_grad():
        torch.manual_seed(9)
        loss = trainer.compute_loss(trainer.model, batch)
    assert float(loss) == pytest.approx(ce_align - 0.5 * math.log(ce_harm + 1) + 2.0 * mmd, rel=1e-4)


def test_paired_check() -> None:
    refusals = [("a", "", "no"), ("b", "", "no")]
    assert check_paired(refusals, [("b", "", "sure"), ("c", "", "sure")]) == 1
    with pytest.raises(AntidoteError, match="needs paired data"):
        check_paired(refusals, [("c", "", "sure")])
    with pytest.raises(AntidoteError, match="holds no pairs"):
        check_paired(refusals, [])


def refusals_file(folder: Path) -> Path:
    rows = [{"prompt": r["prompt"], "response": "i can not help"} for r in HARMFUL]
    return write_jsonl(folder / "refusals.jsonl", rows)


def test_run_writes_a_loadable_aligned_model(tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "repnoise"
    argv = ["defend", "repnoise", str(tiny["model"]), "--data", str(refusals_file(tmp_path))]
    argv += ["--harmful-data", str(tiny["harmful"]), "--helpful-data", str(tiny["benign"]), "--logit-lens"]
    assert main([*argv, "--output", str(out), "--alpha", "0.2", *TRAIN]) == 0
    assert json.loads((out / "antidote_prompt.json").read_text()) == {"template": "plain"}
    config = json.loads((out / "train_report.json").read_text())["config"]
    assert (config["alpha"], config["logit_lens"]) == (0.2, True)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--harmful-data", "EMPTY"], "holds no records"),
        (["--harmful-data", "HARMFUL"], "needs paired data"),  # builtin refusals, other prompts
        (["--alpha", "-1"], "--alpha must be at least 0"),
        (["--beta", "-0.5"], "--beta must be at least 0"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny, tmp_path: Path, capsys, options, expected) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    files = {"EMPTY": str(empty), "HARMFUL": str(tiny["harmful"])}
    out = tmp_path / "out"
    argv = [
        "defend",
        "repnoise",
        str(tiny["model"]),
        "--output",
        str(out),
        *[files.get(o, o) for o in options],
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_run_with_unpaired_data_fails_before_any_training(tiny, tmp_path: Path, capsys) -> None:
    """`antidote run` checks RepNoise's paired data with every other config, before the alignment starts:
    one line, nothing written."""
    from conftest import write_config

    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "a prompt no refusal answers", "response": "a harmful answer"}\n')
    path = write_config(tiny, tmp_path, defenses={"repnoise": {"harmful_data": str(other)}})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "defenses: repnoise: repnoise needs paired data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
