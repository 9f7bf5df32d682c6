"""The training-data API: where (prompt, input, response) triples come from, how they are subset, formatted
with a prompt template and tokenized. The alignment and fine-tuning stages use it, and so do the defenses that
draw extra data (Lisa's alignment steps, Booster's and RepNoise's harmful batches).

Tokenization is `antidote.data.templates.encode_pair`, the one path for a (prompt, response) pair that
calibration and evaluation share, so every stage sees the same token ids for the same pair (BOS included).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from antidote.data.loading import Example, load_examples
from antidote.data.templates import adds_special_tokens, encode_pair, format_prompt

__all__ = [
    "BUILTIN",
    "Triple",
    "encode_pairs",
    "encode_triples",
    "format_pairs",
    "read_triples",
    "subset",
]

BUILTIN = "builtin"  # a data option's value that means the project's own built-in data

Triple = tuple[str, str, str]
"""(prompt or instruction, input, response): one training example before formatting."""


def read_triples(source: str, builtin: list[Triple], data_dir: str | None = None) -> list[Triple]:
    """Triples from a file, a data set name (read from `data_dir`), or `builtin` when source is BUILTIN."""
    if source == BUILTIN:
        return builtin
    return [(e.prompt, e.input, e.response) for e in load_examples(source, data_dir=data_dir)]


def subset(items: list[Any], n: int | None, seed: int) -> list[Any]:
    """A seeded random subset of `n` items in their original order (all of them when n is None)."""
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def format_pairs(tokenizer: Any, template: str, triples: Sequence[Triple]) -> list[tuple[str, str]]:
    """(formatted prompt, response) pairs: the prompt and its input written in `template`."""
    return [(format_prompt(Example(p, "", x), template, tokenizer), r) for p, x, r in triples]


def encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int, *, special_tokens: bool = True
) -> list[tuple[list[int], int]]:
    """(formatted prompt, response) -> (token ids of prompt + response + EOS, number of prompt tokens), by
    `encode_pair`. special_tokens: `adds_special_tokens(template)` (False for chat-formatted prompts).
    Pairs whose response is cut off entirely by `max_length` are left out.
    """
    out = []
    for prompt, response in pairs:
        ids, n_prompt = encode_pair(
            tokenizer, prompt, response, special_tokens=special_tokens, max_length=max_length
        )
        if len(ids) > n_prompt:  # at least one response token survives truncation
            out.append((ids, n_prompt))
    return out


def encode_triples(
    tokenizer: Any, template: str, triples: Sequence[Triple], max_length: int
) -> list[dict[str, Any]]:
    """Training features ({"input_ids", "n_prompt"}) of triples, formatted and tokenized as a stage does."""
    pairs = format_pairs(tokenizer, template, triples)
    special = adds_special_tokens(template)
    return [
        {"input_ids": ids, "n_prompt": n}
        for ids, n in encode_pairs(tokenizer, pairs, max_length, special_tokens=special)
    ]
