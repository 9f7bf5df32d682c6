"""One-shot safety fine-tuning (Zhang et al., ICLR 2026, "Safety at one shot: patching fine-tuned LLMs with a
single instance"): fine-tune the broken (attacked) model on ONE safety example, a harmful request and a
refusal, for a few epochs.

The model is the aligned model with the attack's adapter merged (W_ft); every weight is trained (full
fine-tuning, as the paper's learning rate 2e-5 suggests), with AdamW at a constant learning rate, on the
one (prompt, refusal) pair, batch 1, `epochs` optimizer steps, the loss on the refusal tokens only:
    loss(theta; p, r) = mean over the tokens t of r of -log P_theta(r_t | p, r_<t)
Which example (`select`):
- `search`: each of the candidate pairs is tried - the model is one-shot fine-tuned on it (the lower level)
  and scored by the mean refusal loss on held-out validation pairs (the upper level); the candidate with
  the lowest score wins (ties: the first). The paper selects by a bi-level search over 256 candidate
  refusals in 11 categories; this is that search by enumeration, on our candidate set.
- `first`: the first candidate, no search (the paper reports that one universal refusal works about as
  well).
Writes a full model and `oneshot_report.json` (the chosen pair, every candidate's validation loss, the
training losses).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from antidote.data.catalog import data_dir_field
from antidote.defenses.base import Defense, register
from antidote.defenses.weight_edit import (
    WeightEditConfig,
    check_output,
    config_record,
    fold_adapter,
    load_finetuned,
    save_full_model,
    write_report,
)
from antidote.errors import AntidoteError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

REPORT_FILE = "oneshot_report.json"
SELECT = ("search", "first")

Pair = tuple[list[int], int]  # (token ids of prompt + response + eos, number of prompt tokens)


# ---- the math ---------------------------------------------------------------------------------------------


def pair_loss(model: nn.Module, pair: Pair) -> torch.Tensor:
    """Mean cross-entropy of the response tokens of one encoded pair (scalar, with the graph)."""
    import torch

    from antidote.training.sft import response_loss

    ids, n_prompt = pair
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    row = torch.tensor([ids], dtype=torch.long, device=device)
    return response_loss(model, row, torch.ones_like(row), torch.tensor([n_prompt], device=device))


def one_shot(model: nn.Module, pair: Pair, *, epochs: int, lr: float, weight_decay: float) -> list[float]:
    """Fine-tune every trainable weight of `model` on the one `pair`: `epochs` AdamW steps at a constant
    `lr`. Returns the loss before each step."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss = pair_loss(model, pair)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return losses


def mean_loss(model: nn.Module, pairs: Sequence[Pair]) -> float:
    """The mean over `pairs` of each pair's mean response-token loss (no gradient)."""
    import torch

    with torch.no_grad():
        return sum(float(pair_loss(model, p)) for p in pairs) / len(pairs)


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class OneShotConfig(WeightEditConfig):
    """One-shot safety fine-tuning's options (the paper's 10 epochs at 2e-5), plus the inputs every
    weight-editing defense reads."""

    METHOD: ClassVar[str] = "oneshot-ft"
    NEEDS_BASE: ClassVar[bool] = False

    candidates: str = field(
        default="builtin-refusals:calibrate",
        metadata={"help": "candidate safety examples: harmful prompts with refusals (file or name)"},
    )
    max_candidates: int = field(
        default=8, metadata={"help": "candidates tried by the search, a seeded subset (the paper: 256)"}
    )
    validation: str = field(
        default="builtin-refusals:validate",
        metadata={"help": "held-out harmful prompts with refusals that score each candidate (search)"},
    )
    max_validation: int = field(default=32, metadata={"help": "validation pairs used, a seeded subset"})
    select: str = field(
        default="search",
        metadata={
            "help": "search (one-shot fine-tune on each candidate, keep the lowest validation refusal "
            "loss) or first (the first candidate)"
        },
    )
    epochs: int = field(default=10, metadata={"help": "optimizer steps on the one example (the paper's 10)"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate, constant (the paper's 2e-5)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    template: str = field(
        default="auto",
        metadata={"help": "prompt format: auto (the one saved with the adapter), alpaca, chat, plain"},
    )
    max_length: int = field(default=512, metadata={"help": "tokens kept per pair"})
    seed: int = field(default=0, metadata={"help": "seed of the candidate and validation subsets"})
    data_dir: str | None = data_dir_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        from antidote.data.templates import check_template

        if not self.candidates:
            raise AntidoteError("oneshot-ft needs --candidates: harmful prompts with refusals")
        if self.select not in SELECT:
            raise AntidoteError(f"unknown --select {self.select!r}; choose one of {', '.join(SELECT)}")
        if self.select == "search" and not self.validation:
            raise AntidoteError("--select search needs --validation: held-out harmful prompts with refusals")
        for name in ("max_candidates", "max_validation", "epochs"):
            if getattr(self, name) < 1:
                raise AntidoteError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise AntidoteError(f"--lr must be a number > 0, got {self.lr}; the paper uses 2e-5")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise AntidoteError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.max_length < 2:
            raise AntidoteError(f"--max-length must be at least 2, got {self.max_length}")
        if self.template != "auto":
            check_template(self.template)


def encode(tokenizer: Any, template: str, examples: Sequence[Any], max_length: int, what: str) -> list[Pair]:
    """(prompt, refusal) examples -> encoded pairs, as the attack's training encodes them."""
    from antidote.data.templates import format_prompt
    from antidote.training.data import encode_pairs

    pairs = [(format_prompt(e, template, tokenizer), e.response) for e in examples]
    encoded = encode_pairs(tokenizer, pairs, max_length)
    if len(encoded) != len(pairs):
        raise AntidoteError(f"some {what} pairs lose their whole response at --max-length {max_length}")
    return encoded


def run(config: OneShotConfig) -> dict[str, Path]:
    from antidote.data.loading import load_examples
    from antidote.data.templates import saved_template
    from antidote.outputs import atomic_output_dir

    start = time.perf_counter()
    out = check_output(config)
    template = saved_template(config.adapter, config.model) if config.template == "auto" else config.template
    candidates = load_examples(
        config.candidates, max_samples=config.max_candidates, seed=config.seed, data_dir=config.data_dir
    )
    if not candidates:
        raise AntidoteError(f"--candidates {config.candidates} holds no pairs")
    validation = []
    if config.select == "search":
        validation = load_examples(
            config.validation, max_samples=config.max_validation, seed=config.seed, data_dir=config.data_dir
        )
    loaded = load_finetuned(config)
    tokenizer = loaded.tokenizer
    cand_pairs = encode(tokenizer, template, candidates, config.max_length, "candidate")
    val_pairs = encode(tokenizer, template, validation, config.max_length, "validation")
    model = fold_adapter(loaded)  # W_ft, every weight trainable
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    finetuned = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def train(index: int) -> list[float]:
        model.load_state_dict(finetuned)
        return one_shot(
            model, cand_pairs[index], epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay
        )

    scores: dict[int, float] = {}
    before = mean_loss(model, val_pairs) if val_pairs else None
    if config.select == "search":
        for i in range(len(cand_pairs)):
            train(i)
            scores[i] = mean_loss(model, val_pairs)
            log.info("oneshot-ft: candidate %d: validation refusal loss %.4f", i, scores[i])
    chosen = min(scores, key=lambda i: (scores[i], i)) if scores else 0
    model.load_state_dict(finetuned)
    refusal_before = mean_loss(model, [cand_pairs[chosen]])
    losses = train(chosen)
    refusal_after = mean_loss(model, [cand_pairs[chosen]])
    after = mean_loss(model, val_pairs) if val_pairs else None
    for p in model.parameters():
        p.requires_grad_(False)
    example = candidates[chosen]
    report = {
        "method": "oneshot-ft",
        "select": config.select,
        "chosen": {
            "index": chosen,
            "prompt": example.prompt,
            "input": example.input,
            "response": example.response,
        },
        "candidates": [
            {"index": i, "prompt": e.prompt, "validation_loss": scores.get(i)}
            for i, e in enumerate(candidates)
        ],
        "refusal_loss": {"before": refusal_before, "after": refusal_after},
        "validation_loss": {"before": before, "after": after, "pairs": len(val_pairs)},
        "train_losses": losses,
        "template": template,
        "seconds": round(time.perf_counter() - start, 1),
        "config": config_record(config),
    }
    log.info("oneshot-ft: candidate %d, refusal loss %.4f -> %.4f", chosen, refusal_before, refusal_after)
    with atomic_output_dir(out, config.overwrite) as tmp:
        save_full_model(tmp, model, loaded, config)
        write_report(tmp, REPORT_FILE, report)
    return {"": out}


DEFENSE = register(
    Defense(
        name="oneshot-ft",
        stage="post",
        config=OneShotConfig,
        run=run,
        summary="fine-tune the attacked model on one harmful prompt + refusal for 10 epochs at 2e-5, the "
        "example chosen by validation refusal loss (Zhang et al. 2026)",
    )
)
