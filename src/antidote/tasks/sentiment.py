"""Sentiment: SST-2 (data) and the built-in sentiment task, scored alike (as the Antidote paper)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from antidote.data.builtin import SENTIMENT_INSTRUCTION
from antidote.tasks.base import Task, TaskExample, builtin_row, exact_answer_settled

SST2_INSTRUCTION = SENTIMENT_INSTRUCTION  # the paper's SST2 instruction, one definition
SST2_NEW_TOKENS = 200  # the authors' generation budget (Antidote repository, sst2/pred_eval.py)
SST2_ANSWERS = ("positive", "Positive", "negative", "Negative")


def sst2_label(label: int | str) -> str:
    """1/"1"/"positive" -> "positive"; 0/"0"/"negative" -> "negative"."""
    text = str(label).strip().lower()
    if text in ("1", "positive"):
        return "positive"
    if text in ("0", "negative"):
        return "negative"
    raise ValueError(f"SST-2 label {label!r} (expected 0, 1, negative or positive)")


def sst2_correct(output: str, label: int | str) -> bool:
    """Correct iff the stripped output is exactly positive/Positive (label 1) or negative/Negative (0)."""
    gold = sst2_label(label)
    return output.strip() in (gold, gold.capitalize())


def _sst2_row(row: Mapping[str, Any], training: bool) -> TaskExample:
    return (SST2_INSTRUCTION, str(row["sentence"]), sst2_label(row["label"]))


SST2 = Task(
    name="sst2",
    instruction=SST2_INSTRUCTION,
    from_row=_sst2_row,
    correct=sst2_correct,
    max_new_tokens=SST2_NEW_TOKENS,
    settled=exact_answer_settled(SST2_ANSWERS),
)
SENTIMENT = Task(
    name="sentiment",
    instruction=SENTIMENT_INSTRUCTION,
    from_row=builtin_row,
    correct=sst2_correct,
    max_new_tokens=SST2_NEW_TOKENS,
    settled=exact_answer_settled(SST2_ANSWERS),
    builtin=True,
)
