"""Prompt templates: Alpaca pinned to the paper's text, chat through the tokenizer's template, one check."""

from __future__ import annotations

import pytest

from antidote.data import TEMPLATES, Example, format_example, tokenize_examples
from antidote.data.templates import check_template, format_prompt
from antidote.errors import AntidoteError
from conftest import make_tokenizer

# SPEC 3, copied by hand.
SPEC_ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def test_alpaca_is_the_papers_text() -> None:
    tok = make_tokenizer()
    plain = Example("Name a colour.", "Blue.")
    assert format_prompt(plain, "alpaca", tok) == SPEC_ALPACA.format(instruction="Name a colour.")
    assert (
        format_example(plain, "alpaca", tok) == SPEC_ALPACA.format(instruction="Name a colour.") + "Blue.</s>"
    )


def test_alpaca_input_block() -> None:
    with_input = Example("Classify the review.", "positive", input="A fine film.")
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nClassify the review.\n\n### Input:\nA fine film.\n\n### Response:\n"
    )
    assert format_prompt(with_input, "alpaca", make_tokenizer()) == expected


def test_chat_uses_the_tokenizers_template() -> None:
    # conftest's template: <s>{role}: {content}</s> per message, then <s>assistant: for generation.
    tok = make_tokenizer()
    example = Example("hi there", "hello", input="some context")
    assert format_prompt(example, "chat", tok) == "<s>user: hi there\n\nsome context</s><s>assistant:"
    assert (
        format_example(example, "chat", tok) == "<s>user: hi there\n\nsome context</s><s>assistant: hello</s>"
    )


def test_plain() -> None:
    tok = make_tokenizer()
    assert format_prompt(Example("p", "r", "x"), "plain", tok) == "p\nx"
    assert format_example(Example("p", "r"), "plain", tok) == "p\nr</s>"


def test_one_check_for_every_caller(tmp_path: object) -> None:
    from antidote.evaluation.run import EvaluateConfig
    from antidote.realignment.config import RealignConfig
    from antidote.training.stages import FinetuneConfig

    assert set(TEMPLATES) == {"alpaca", "chat", "plain"} and all(TEMPLATES.values())
    message = "unknown template 'jinja'; choose one of alpaca, chat, plain"
    for make in (
        lambda: check_template("jinja"),
        lambda: format_prompt(Example("p", "r"), "jinja", make_tokenizer()),
        lambda: tokenize_examples([Example("p", "r")], make_tokenizer(), "jinja"),
        lambda: RealignConfig(model="m", data="d.jsonl", template="jinja"),
        lambda: EvaluateConfig(model="m", template="jinja"),
        lambda: FinetuneConfig(model="m", template="jinja"),
    ):
        with pytest.raises(AntidoteError) as err:
            make()
        assert str(err.value) == message
    assert EvaluateConfig(model="m", template="auto").template == "auto"


def test_chat_needs_a_chat_template() -> None:
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(AntidoteError, match="no chat template"):
        tokenize_examples([Example("p", "r")], tok, "chat")
    with pytest.raises(AntidoteError, match="no chat template"):
        format_prompt(Example("p", "r"), "chat", tok)
    assert check_template("chat") == "chat"  # without a tokenizer only the name is checked
