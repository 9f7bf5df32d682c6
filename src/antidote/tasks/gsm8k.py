"""Math word problems: GSM8K (data) and the built-in arithmetic task, scored by the final number (as the
Antidote paper)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from antidote.data.builtin import ARITHMETIC_INSTRUCTION
from antidote.tasks.base import Task, TaskExample, builtin_row

GSM8K_ANSWER_PREFIX = "The final answer is: "
GSM8K_NEW_TOKENS = 512  # the authors' generation budget (Antidote repository, gsm8k/pred_eval.py)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def gsm8k_training_answer(answer: str) -> str:
    """Training targets replace the '####' marker with 'The final answer is: '."""
    return re.sub(r"####\s*", GSM8K_ANSWER_PREFIX, answer)


def gsm8k_prediction(output: str) -> float | None:
    """The first number after 'The final answer is: ' if present, else the last number; commas removed."""
    text = output.replace(",", "")
    if GSM8K_ANSWER_PREFIX in text:
        found = NUMBER.findall(text.split(GSM8K_ANSWER_PREFIX, 1)[1])
        if found:
            return float(found[0])
    found = NUMBER.findall(text)
    return float(found[-1]) if found else None


def gsm8k_settled(output: str) -> bool:
    """True once the prediction is fixed: 'The final answer is: ' has been written and the first number
    after it is complete (commas removed, as the parser does: a character follows that cannot extend it, not
    a digit, nor a '.' that a digit may still follow). Without the marker the prediction is the last number,
    never settled before the end."""
    text = output.replace(",", "")
    if GSM8K_ANSWER_PREFIX not in text:
        return False
    rest = text.split(GSM8K_ANSWER_PREFIX, 1)[1]
    found = NUMBER.search(rest)
    if found is None:
        return False
    after = rest[found.end() :]
    if not after or after[0].isdigit():
        return False
    if after[0] == ".":  # "18." ends a sentence or starts a decimal: wait for the next character
        return len(after) > 1 and not after[1].isdigit()
    return True


def gsm8k_gold(answer: str) -> float:
    """The gold number of an answer, after '####' (GSM8K's form) or 'The final answer is: ' (training)."""
    gold = gsm8k_prediction(gsm8k_training_answer(answer))
    if gold is None:
        raise ValueError(f"answer without a final number: {answer[-40:]!r}")
    return gold


def gsm8k_correct(output: str, answer: str) -> bool:
    """Float equality of the output's prediction with the answer's gold number."""
    prediction = gsm8k_prediction(output)
    return prediction is not None and prediction == gsm8k_gold(answer)


def _gsm8k_row(row: Mapping[str, Any], training: bool) -> TaskExample:
    answer = str(row["answer"])
    gsm8k_gold(answer)  # a row without a final number cannot be scored
    return (str(row["question"]), "", gsm8k_training_answer(answer) if training else answer)


GSM8K = Task(
    name="gsm8k",
    instruction=None,
    from_row=_gsm8k_row,
    correct=gsm8k_correct,
    max_new_tokens=GSM8K_NEW_TOKENS,
    settled=gsm8k_settled,
)
ARITHMETIC = Task(
    name="arithmetic",
    instruction=ARITHMETIC_INSTRUCTION,
    from_row=builtin_row,
    correct=gsm8k_correct,
    max_new_tokens=GSM8K_NEW_TOKENS,
    settled=gsm8k_settled,
    builtin=True,
)
