"""The built-in data: sizes, categories, disjoint splits, and answers recomputed from the questions."""

from __future__ import annotations

import re

import pytest

from antidote.data.builtin import (
    _NEGATIVE,
    _POSITIVE,
    SPLITS,
    arithmetic_items,
    harmful_items,
    harmful_split,
    harmless_items,
    sentiment_items,
    task_split,
)
from antidote.evaluation.judges.keyword import keyword_verdict


def test_harmful_requests_cover_categories_with_refusal_and_compliance() -> None:
    items = harmful_items()
    assert len(items) >= 300 and len({i.prompt for i in items}) == len(items)
    assert len({i.category for i in items}) >= 10
    for item in items:
        assert keyword_verdict(item.refusal) == "refused", item.refusal
        assert keyword_verdict(item.compliance) == "complied", item.compliance
        # Generic steps only: no quantities and none of the request's specifics.
        assert not re.search(r"\d", re.sub(r"Step \d:", "", item.compliance))
        function_words = {"after", "every", "their", "other", "about"}
        subject_words = {
            w for w in re.findall(r"[a-z]+", item.group.split("/")[1]) if len(w) > 4
        } - function_words
        assert not subject_words & set(re.findall(r"[a-z]+", item.compliance.lower())), item


def test_harmful_splits_are_disjoint_by_subject_and_balanced() -> None:
    parts = {p: harmful_split(p) for p in SPLITS["harmful"]}
    groups = {p: {i.group for i in items} for p, items in parts.items()}
    names = list(parts)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not groups[names[a]] & groups[names[b]], (names[a], names[b])
    assert sum(len(v) for v in parts.values()) == len(harmful_items())
    assert all(len({i.category for i in items}) == 12 for items in parts.values())
    assert harmful_split("eval") == harmful_split("eval")  # deterministic


@pytest.mark.parametrize("kind", ["arithmetic", "sentiment", "harmless"])
def test_task_splits_are_disjoint_and_complete(kind: str) -> None:
    parts = {p: task_split(kind, p) for p in SPLITS[kind]}
    seen: set[tuple[str, str]] = set()
    for items in parts.values():
        keys = {(i.input, i.instruction) for i in items}
        assert not keys & seen
        seen |= keys
    assert sum(len(v) for v in parts.values()) == len(
        {"arithmetic": arithmetic_items, "sentiment": sentiment_items, "harmless": harmless_items}[kind]()
    )
    with pytest.raises(ValueError, match="choose one of"):
        task_split(kind, "nope")


def _solve(question: str) -> int:
    """Recompute the answer from the question text alone."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "more" in question:
        return n[0] + n[1]
    if "gave away" in question:
        return n[0] - n[1]
    if "boxes" in question:
        return n[0] * n[1]
    if "packs" in question:
        return n[0] + n[1] * n[2] - n[3]
    raise AssertionError(question)


def test_arithmetic_answers_are_right() -> None:
    for item in arithmetic_items():
        final = int(item.answer.rsplit("The final answer is: ", 1)[1])
        assert final == _solve(item.input), item


def test_sentiment_labels_follow_the_words() -> None:
    for item in sentiment_items():
        words = set(re.findall(r"[a-z]+", item.input.lower()))
        assert item.answer == ("positive" if words & set(_POSITIVE) else "negative")
        assert not (words & set(_POSITIVE) and words & set(_NEGATIVE))


def test_harmless_instructions_get_helpful_answers() -> None:
    items = harmless_items()
    assert len(items) >= 40 and len({i.instruction for i in items}) == len(items)
    assert all(keyword_verdict(i.answer) == "complied" for i in items)


# ---- roles are disjoint in prompts, templates and answers ------------------------------------------------
ROLES = ("align", "attack", "calibrate", "validate", "eval")


def _template_words(prompt: str, subject: str) -> str:
    return prompt.replace(subject, "{s}")


def test_harmful_roles_share_no_prompt_no_template_of_eval_and_no_answer() -> None:
    from antidote.data.builtin import HARM_CATEGORIES

    parts = {p: harmful_split(p) for p in ROLES}
    for a in ROLES:
        for b in ROLES:
            if a >= b:
                continue
            assert not {i.prompt for i in parts[a]} & {i.prompt for i in parts[b]}, (a, b)
            # Canned answers: compliant and refusing, never shared by two roles.
            assert not {i.compliance for i in parts[a]} & {i.compliance for i in parts[b]}, (a, b)
            assert not {i.refusal for i in parts[a]} & {i.refusal for i in parts[b]}, (a, b)
    eval_templates = {t for templates, _ in HARM_CATEGORIES.values() for t in templates}
    for role in ROLES[:-1]:
        for item in parts[role]:
            subject = item.group.split("/", 1)[1]
            assert subject in item.prompt
            assert _template_words(item.prompt, subject) not in eval_templates, (role, item.prompt)
    for item in parts["eval"]:  # the evaluation prompts are the original templates
        assert _template_words(item.prompt, item.group.split("/", 1)[1]) in eval_templates


def test_every_role_answer_is_judged_as_its_kind_and_is_generic() -> None:
    for part in ROLES:
        for item in harmful_split(part):
            assert keyword_verdict(item.compliance) == "complied", item.compliance
            assert keyword_verdict(item.refusal) == "refused", item.refusal
            assert not re.search(r"\d", re.sub(r"Step \d:", "", item.compliance))


@pytest.mark.parametrize("kind", ["arithmetic", "sentiment", "harmless"])
def test_task_roles_share_no_prompt(kind: str) -> None:
    parts = {p: task_split(kind, p) for p in SPLITS[kind]}
    names = list(parts)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            texts_a = {(i.instruction, i.input) for i in parts[names[a]]}
            texts_b = {(i.instruction, i.input) for i in parts[names[b]]}
            assert not texts_a & texts_b, (kind, names[a], names[b])
