"""Prompt templates: how a (prompt, response) pair becomes the token ids the model sees."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antidote.data.loading import Example
from antidote.errors import AntidoteError

TEMPLATES: dict[str, str] = {
    "alpaca": "the paper's Alpaca prompt (the authors' code), with an Input block when the pair has an input",
    "chat": "the tokenizer's chat template (one user turn, then the assistant's answer)",
    "plain": "the prompt, its input and the answer on separate lines",
}

PROMPT_FILE = "antidote_prompt.json"  # the prompt format a stage trained with, saved beside the weights


def saved_template(*folders: str | Path | None) -> str:
    """The prompt format recorded (`antidote_prompt.json`) with the first of `folders` that has one (an
    adapter before its base model), else alpaca."""
    for folder in folders:
        if folder and (Path(folder) / PROMPT_FILE).is_file():
            return str(json.loads((Path(folder) / PROMPT_FILE).read_text())["template"])
    return "alpaca"


def write_prompt_file(folder: Path, template: str) -> None:
    """Record the prompt format of a model or adapter folder, for the commands that read it next."""
    (folder / PROMPT_FILE).write_text(json.dumps({"template": template}) + "\n")


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def check_template(name: str, tokenizer: Any = None) -> str:
    """`name` if it is a template of TEMPLATES (and, with `tokenizer`, one it can apply); else AntidoteError.

    The one place templates are validated: configs, stages and the formatting functions call it.
    """
    if name not in TEMPLATES:
        raise AntidoteError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    if name == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise AntidoteError("the tokenizer has no chat template; use --template alpaca or --template plain")
    return name


def format_prompt(example: Example, template: str, tokenizer: Any) -> str:
    """The prompt part alone (what a model is asked at generation time)."""
    check_template(template, tokenizer)
    if template == "alpaca":
        if example.input:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=example.prompt, input=example.input)
        return ALPACA_PROMPT.format(instruction=example.prompt)
    if template == "chat":
        content = f"{example.prompt}\n\n{example.input}" if example.input else example.prompt
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        )
    return f"{example.prompt}\n{example.input}" if example.input else example.prompt  # plain


def format_example(example: Example, template: str, tokenizer: Any) -> str:
    """The full training-style text: prompt, response and the end-of-sequence marker."""
    check_template(template, tokenizer)
    eos = tokenizer.eos_token or ""
    if template == "chat":
        content = f"{example.prompt}\n\n{example.input}" if example.input else example.prompt
        return str(
            tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": example.response},
                ],
                tokenize=False,
            )
        )
    if template == "plain":
        return f"{format_prompt(example, template, tokenizer)}\n{example.response}{eos}"
    return f"{format_prompt(example, template, tokenizer)}{example.response}{eos}"


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, template: str = "alpaca", max_length: int = 512
) -> list[list[int]]:
    """Token ids of each formatted example, truncated to `max_length`. Every token counts."""
    check_template(template, tokenizer)
    if max_length < 2:
        raise AntidoteError(f"--max-length must be at least 2, got {max_length}")
    # The chat template writes its own special tokens; the others get the tokenizer's defaults (e.g. BOS).
    add_special = template != "chat"
    texts = [format_example(e, template, tokenizer) for e in examples]
    encoded = tokenizer(texts, add_special_tokens=add_special, truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]
