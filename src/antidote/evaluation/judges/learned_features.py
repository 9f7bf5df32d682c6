"""How the learned judge sees a (prompt, response) pair: the text layout (the model's chat template or a
plain "User:/Assistant:" layout), the token ids, and the hidden states of a frozen causal LM pooled into
feature blocks, one per (layer, pooling), concatenated side by side (`assemble`).

Poolings: "mean" (the average over the response tokens), "last" (the last response token), "prompt" (the
average over the kept prompt tokens, chat template included: what was asked, as the model reads it).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from antidote.errors import AntidoteError
from antidote.evaluation.judges.keyword import is_refusal
from antidote.models.layers import decoder_layers

PROMPT_FORMATS = ("chat", "plain")
PLAIN_PREFIX = "User: {prompt}\nAssistant: "
POOLINGS = ("mean", "last", "prompt")


def prompt_format_key(tokenizer: Any, prompt_format: str) -> str:
    """Names the exact text layout: 'chat:<hash of the chat template>' or 'plain:v1'."""
    if prompt_format == "plain":
        return "plain:v1"
    if prompt_format != "chat":
        raise AntidoteError(
            f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}"
        )
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise AntidoteError("the base model's tokenizer has no chat template; use --prompt-format plain")
    return "chat:" + hashlib.sha256(str(template).encode()).hexdigest()[:12]


def encode_pair(
    tokenizer: Any, prompt: str, response: str, prompt_format: str, max_length: int
) -> tuple[list[int], int]:
    """Token ids of the formatted pair and the index of its first response token.

    The prompt part keeps at most max_length // 2 tokens (its end, where the assistant turn opens), the
    response fills the rest. An empty response points at the last prompt token.
    """
    if prompt_format == "chat":
        prefix = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )
        special = False  # the template wrote its own special tokens
    else:
        prefix, special = PLAIN_PREFIX.format(prompt=prompt), True
    head = tokenizer(prefix, add_special_tokens=special)["input_ids"]
    full = tokenizer(prefix + response, add_special_tokens=special)["input_ids"]
    start = len(head) if full[: len(head)] == head else _common_prefix(head, full)
    keep_head = min(start, max(max_length // 2, 1))
    ids = full[start - keep_head : start] + full[start : start + max_length - keep_head]
    return ids, min(keep_head, len(ids) - 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class _Stop(Exception):
    """Raised by the hook on the deepest layer wanted: the rest of the forward is not needed."""


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def hidden_features(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    layers: Sequence[int],
    prompt_format: str = "chat",
    max_length: int = 512,
    batch_size: int = 4,
    progress: bool = True,
    poolings: Sequence[str] = ("mean", "last"),
) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, pooling): (n, hidden_size) float32} for every layer in `layers` and every pooling:
    "mean" (over the response tokens), "last" (the last response token), "prompt" (mean over the kept
    prompt tokens, chat template included: what was asked, as the model reads it).

    layer l (1-based) is the output of the l-th transformer block. The forward stops after the deepest
    layer wanted; batches hold pairs of similar length, right-padded, so padding changes nothing.
    """
    from tqdm.auto import tqdm

    decoder, blocks = decoder_layers(model)
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown:
        raise AntidoteError(f"unknown pooling {unknown[0]!r}; choose from {', '.join(POOLINGS)}")
    bad = [x for x in layers if not 1 <= x <= len(blocks)]
    if bad:
        raise AntidoteError(
            f"layer {bad[0]} does not exist; the base model has layers 1-{len(blocks)} (--layers)"
        )
    encoded = [
        encode_pair(tokenizer, p, r, prompt_format, max_length)
        for p, r in zip(prompts, responses, strict=True)
    ]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    deepest = max(layers)
    out: dict[tuple[int, str], torch.Tensor] = {}
    captured: dict[int, torch.Tensor] = {}

    def hook(number: int) -> Callable[..., None]:
        def save(module: nn.Module, args: Any, output: Any) -> None:
            captured[number] = output[0] if isinstance(output, tuple) else output
            if number == deepest:
                raise _Stop

        return save

    handles = [blocks[x - 1].register_forward_hook(hook(x)) for x in sorted(set(layers))]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(total=len(encoded), desc="learned judge: features", disable=not progress)
            for batch in _batches([len(ids) for ids, _ in encoded], batch_size):
                width = max(len(encoded[i][0]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                response = torch.zeros((len(batch), width), dtype=torch.bool)
                last = torch.zeros(len(batch), dtype=torch.long)
                for row, i in enumerate(batch):
                    seq, start = encoded[i]
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                    response[row, start : len(seq)] = True
                    last[row] = len(seq) - 1
                captured.clear()
                with contextlib.suppress(_Stop):
                    decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                weights = response.float() / response.sum(1, keepdim=True).clamp(min=1)
                asked = mask.bool() & ~response
                asked_weights = asked.float() / asked.sum(1, keepdim=True).clamp(min=1)
                for x in layers:
                    h = captured[x].float().cpu()  # (batch, width, hidden)
                    for p in poolings:
                        if (x, p) not in out:
                            out[(x, p)] = torch.zeros(len(encoded), h.shape[-1])
                    if "mean" in poolings:
                        out[(x, "mean")][batch] = torch.einsum("bt,bth->bh", weights, h)
                    if "last" in poolings:
                        out[(x, "last")][batch] = h[torch.arange(len(batch)), last]
                    if "prompt" in poolings:
                        out[(x, "prompt")][batch] = torch.einsum("bt,bth->bh", asked_weights, h)
                bar.update(len(batch))
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return out


def with_keyword(x: torch.Tensor, responses: Sequence[str]) -> torch.Tensor:
    """Append the keyword judge's refusal flag (1.0 if the response refuses) as one more feature column."""
    flag = torch.tensor([float(is_refusal(r)) for r in responses], dtype=x.dtype)[:, None]
    return torch.cat([x, flag], dim=1)


def assemble(
    features: dict[tuple[int, str], torch.Tensor],
    blocks: Sequence[tuple[int, str]],
    responses: Sequence[str],
    keyword_feature: bool,
) -> torch.Tensor:
    """The judge's feature matrix: the (layer, pooling) blocks side by side, in the given order, then the
    keyword judge's refusal flag as one more column when keyword_feature."""
    x = torch.cat([features[(layer, pooling)] for layer, pooling in blocks], dim=1)
    return with_keyword(x, responses) if keyword_feature else x
