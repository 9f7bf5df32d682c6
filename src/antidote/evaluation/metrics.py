"""Task accuracy (FA) checks exactly as the reference protocol scores them (SPEC 3).

Each function takes the model's raw output text and the gold label, and says whether it is correct.
"""

from __future__ import annotations

import re

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_ANSWER_PREFIX = "The final answer is: "


def sst2_correct(output: str, label: int | str) -> bool:
    """Correct iff the stripped output is exactly positive/Positive (label 1) or negative/Negative (0)."""
    gold = "positive" if str(label).strip().lower() in ("1", "positive") else "negative"
    return output.strip() in (gold, gold.capitalize())


def agnews_label(label: int | str) -> str:
    """1..4 (the CSV's numbering) or a class name -> the class name."""
    text = str(label).strip()
    if text.isdigit():
        return AGNEWS_LABELS[int(text) - 1]
    for name in AGNEWS_LABELS:
        if text.lower() == name.lower():
            return name
    raise ValueError(f"unknown AG News label {label!r}")


def agnews_correct(output: str, label: int | str) -> bool:
    """Exact match with the class name, upper- or lower-case (World, world, Sci/Tech, sci/tech)."""
    gold = agnews_label(label)
    return output.strip() in (gold, gold.lower())


def gsm8k_training_answer(answer: str) -> str:
    """Training targets replace the '####' marker with 'The final answer is: '."""
    return re.sub(r"####\s*", GSM8K_ANSWER_PREFIX, answer)


def gsm8k_gold(answer: str) -> float:
    """The number after '####' in a GSM8K answer."""
    return float(answer.split("####")[-1].strip().replace(",", ""))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def gsm8k_prediction(output: str) -> float | None:
    """The first number after 'The final answer is: ' if present, else the last number; commas removed."""
    text = output.replace(",", "")
    if GSM8K_ANSWER_PREFIX in text:
        found = _NUMBER.findall(text.split(GSM8K_ANSWER_PREFIX, 1)[1])
        if found:
            return float(found[0])
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


def gsm8k_correct(output: str, answer: str) -> bool:
    """Float equality of the prediction with the gold number."""
    prediction = gsm8k_prediction(output)
    return prediction is not None and prediction == gsm8k_gold(answer)
