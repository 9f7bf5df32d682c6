"""LoRA supervised fine-tuning with the loss on response tokens only: the step shared by `align`
(harmful prompt -> refusal, mixed with helpful answers) and `finetune` (the attack).

Logits are computed only where a response token is predicted, so the output layer (49k words on
SmolLM2) runs on a small fraction of positions.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """LoRA SFT settings (SPEC 3 gives the paper's; these defaults suit a 135M model on a CPU)."""

    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    target_modules: tuple[str, ...] = field(default=ALL_PROJECTIONS, metadata={"help": "modules to adapt"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=2, metadata={"help": "passes over the data"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    scheduler: str = field(default="cosine", metadata={"help": "cosine or constant"})
    max_length: int = field(default=256, metadata={"help": "truncate prompt+response to this many tokens"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA init and data order"})

    def __post_init__(self) -> None:
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose cosine or constant")
        if self.lora_r < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("lora_r, epochs and batch_size must be at least 1 and lr positive")


def encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """(prompt text, response text) -> (token ids of prompt+response+eos, number of prompt tokens).

    The prompt is tokenized on its own, so the split point is exact; the response gets the EOS token.
    """
    out = []
    eos = tokenizer.eos_token_id
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + r)[:max_length]
        if len(ids) > len(p):  # at least one response token survives truncation
            out.append((ids, len(p)))
    return out


def response_loss(
    model: nn.Module, ids: torch.Tensor, attention: torch.Tensor, n_prompt: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over response tokens. ids, attention: (B, T) right-padded; n_prompt: (B,).

    Token t is predicted from position t-1; only positions with n_prompt <= t < length count.
    """
    get_base = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    hidden = base.get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    target = (positions >= n_prompt.unsqueeze(1)) & attention.bool()  # (B, T): tokens to predict
    target[:, 0] = False
    rows, cols = target.nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(hidden[rows, cols - 1])  # only where a response token follows
    return nn.functional.cross_entropy(logits.float(), ids[rows, cols])


def train_lora(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    config: TrainConfig,
    desc: str = "training",
) -> tuple[Any, list[float]]:
    """Add a fresh LoRA adapter to `model` and train it on the pairs. Returns (PeftModel, step losses)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    if not encoded:
        raise ValueError("no training pairs left after tokenization")
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = steps_per_epoch * config.epochs

    def lr_factor(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / total)) if config.scheduler == "cosine" else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(config.seed)
    device = peft_model.get_input_embeddings().weight.device
    losses: list[float] = []
    peft_model.train()
    progress = tqdm(total=total, desc=desc, unit="step", leave=False)
    for _ in range(config.epochs):
        # Batches of similar length (little padding), visited in a random order.
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), rng.random()))
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
            n_prompt = torch.tensor([encoded[i][1] for i in batch])
            loss = response_loss(peft_model, ids.to(device), attention.to(device), n_prompt.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.item()))
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    progress.close()
    peft_model.eval()
    log.info("%s: %d steps, loss %.3f -> %.3f", desc, total, losses[0], losses[-1])
    return peft_model, losses
