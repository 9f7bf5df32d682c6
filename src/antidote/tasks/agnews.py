"""AG News: four-way news topic classification, exact match on the class name (as the Antidote paper)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from antidote.tasks.base import Task, TaskExample, exact_answer_settled

AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
AGNEWS_NEW_TOKENS = 200  # the authors' generation budget (Antidote repository, agnews/pred_eval.py)


def agnews_label(label: int | str) -> str:
    """1..4 (the CSV's numbering) or a class name -> the class name."""
    text = str(label).strip()
    if text.isdigit() and 1 <= int(text) <= len(AGNEWS_LABELS):
        return AGNEWS_LABELS[int(text) - 1]
    for name in AGNEWS_LABELS:
        if text.lower() == name.lower():
            return name
    raise ValueError(f"AG News label {label!r} (expected 1-4 or {', '.join(AGNEWS_LABELS)})")


def agnews_correct(output: str, label: int | str) -> bool:
    """Exact match with the class name, upper- or lower-case (World, world, Sci/Tech, sci/tech)."""
    gold = agnews_label(label)
    return output.strip() in (gold, gold.lower())


def _agnews_row(row: Mapping[str, Any], training: bool) -> TaskExample:
    text = row.get("text") or f"{row['title']} {row['description']}"
    return (AGNEWS_INSTRUCTION, str(text), agnews_label(row["label"]))


AGNEWS = Task(
    name="agnews",
    instruction=AGNEWS_INSTRUCTION,
    from_row=_agnews_row,
    correct=agnews_correct,
    max_new_tokens=AGNEWS_NEW_TOKENS,
    settled=exact_answer_settled([form for label in AGNEWS_LABELS for form in (label, label.lower())]),
)
