"""Prompt templates: how a (prompt, response) pair becomes the token ids the model sees."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antidote.data.loading import Example
from antidote.errors import AntidoteError
from antidote.outputs import json_text

# The prompt format a stage records beside its model (`{"template": NAME}`), which evaluation reads back.
PROMPT_FILE = "antidote_prompt.json"
TEMPLATES: dict[str, str] = {
    "alpaca": "the paper's Alpaca prompt (the authors' code), with an Input block when the pair has an input",
    "chat": "the tokenizer's chat template (one user turn, then the assistant's answer)",
    "plain": "the prompt, its input and the answer on separate lines",
}


def saved_template(*folders: str | Path | None) -> str:
    """The prompt format recorded (`antidote_prompt.json`) with the first of `folders` that has one (an
    adapter before its base model), else alpaca."""
    for folder in folders:
        if folder and (Path(folder) / PROMPT_FILE).is_file():
            return str(json.loads((Path(folder) / PROMPT_FILE).read_text())["template"])
    return "alpaca"


def write_prompt_file(folder: Path, template: str) -> None:
    """Record the prompt format of a model or adapter folder, for the commands that read it next."""
    (folder / PROMPT_FILE).write_text(json_text({"template": template}) + "\n")


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
    """The full text of a pair, for reading: prompt, response and the end-of-sequence marker. Token ids
    come from `encode_pair` instead (the prompt and the response tokenized apart, as training sees them)."""
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


def adds_special_tokens(template: str) -> bool:
    """Whether the tokenizer's own special tokens (e.g. BOS) go in front of a prompt in `template`: not for
    the chat template, which writes its own; for the others, whatever `add_special_tokens=True` adds."""
    return template != "chat"


def encode_prompt(tokenizer: Any, prompt: str, *, special_tokens: bool = True) -> list[int]:
    """Token ids of a formatted prompt, the one way every stage tokenizes one (training, calibration,
    evaluation). With `special_tokens`, the tokens `add_special_tokens=True` puts in front of the text
    (BOS on Llama, Mistral, Gemma) lead; any it would put after the text (an EOS some tokenizers append)
    are left out, since a response follows."""
    plain = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not special_tokens:
        return plain
    full = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):  # the text's ids inside the special ones
        if full[start : start + len(plain)] == plain:
            return full[: start + len(plain)]
    return plain  # the special tokens changed the text's own ids: keep the text as it is


def encode_pair(
    tokenizer: Any, prompt: str, response: str, *, special_tokens: bool = True, max_length: int | None = None
) -> tuple[list[int], int]:
    """(formatted prompt, response) -> (token ids of prompt + response + EOS, number of prompt tokens).

    The prompt is `encode_prompt`'s (the ids generation starts from); the response is tokenized on its own,
    so the split point is exact, and gets the EOS token. Cut to `max_length` tokens when given.
    """
    p = encode_prompt(tokenizer, prompt, special_tokens=special_tokens)
    eos = tokenizer.eos_token_id
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
    ids = p + r
    return (ids[:max_length] if max_length is not None else ids), len(p)


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, template: str = "alpaca", max_length: int = 512
) -> list[list[int]]:
    """Token ids of each example (prompt in `template`, response, EOS), truncated to `max_length`: the same
    ids training sees for the pair (`encode_pair`). Every token counts."""
    check_template(template, tokenizer)
    if max_length < 2:
        raise AntidoteError(f"--max-length must be at least 2, got {max_length}")
    special = adds_special_tokens(template)
    return [
        encode_pair(
            tokenizer,
            format_prompt(e, template, tokenizer),
            e.response,
            special_tokens=special,
            max_length=max_length,
        )[0]
        for e in examples
    ]
