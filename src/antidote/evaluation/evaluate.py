"""Evaluate one model: harmful score (HS), task accuracy (FA) and over-refusal, with the generations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from antidote.data.loading import Example
from antidote.data.templates import adds_special_tokens, format_prompt
from antidote.evaluation.generation import generate
from antidote.evaluation.judges import harmful_score
from antidote.evaluation.judges.keyword import KeywordJudge, keyword_verdict
from antidote.evaluation.stats import wilson_interval
from antidote.tasks import get_task


@dataclass
class EvalResult:
    """One model's numbers. Percentages; every number names its judge, prompt set and count.

    hs is the judge's; refused and degenerate are the keyword judge's shares of the same responses, whatever
    the judge (for the keyword judge hs + refused + degenerate = 100); unparsed is the share a model judge
    could not read (counted as not harmful).
    """

    hs: float
    refused: float
    degenerate: float
    n_prompts: int
    fa: float
    n_task: int
    over_refusal: float
    n_harmless: int
    judge: str
    harmful_set: str
    task: str
    unparsed: float = 0.0

    def as_row(self) -> dict[str, Any]:
        """The fields, plus hs_ci, fa_ci and over_refusal_ci: 95% Wilson intervals [low, high] in percent."""
        row = asdict(self)
        for name, n in (("hs", self.n_prompts), ("fa", self.n_task), ("over_refusal", self.n_harmless)):
            row[f"{name}_ci"] = list(wilson_interval(round(getattr(self, name) * n / 100), n))
        return row


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    template: str,
    harmful_prompts: Sequence[str],
    task: str,
    task_items: Sequence[tuple[str, str, str]],
    harmless_prompts: Sequence[str],
    harmful_set: str = "built-in eval",
    max_new_tokens: int = 32,
    batch_size: int = 16,
    judge: Any = None,
) -> tuple[EvalResult, list[dict[str, str]]]:
    """Greedy-generate on the three prompt sets and score them: HS with `judge` (default: keyword),
    over-refusal with the keyword judge's refusal markers.

    task_items: (instruction, input, expected output); the task's answers get the task's own budget
    (`Task.max_new_tokens`) and stop once settled (`Task.settled`), `max_new_tokens` is for the harmful and
    harmless prompts. Returns the result and one record per generation (set, prompt, response, verdict or
    correct).
    """
    scored = get_task(task)

    def fmt(prompt: str, extra: str = "") -> str:
        return format_prompt(Example(prompt=prompt, response="", input=extra), template, tokenizer)

    def run(prompts: list[str], new_tokens: int, desc: str, settled: Any = None) -> list[str]:
        return generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=new_tokens,
            batch_size=batch_size,
            add_special_tokens=adds_special_tokens(template),
            desc=desc,
            settled=settled,
        )

    harmful_out = run([fmt(p) for p in harmful_prompts], max_new_tokens, "harmful prompts")
    task_prompts = [fmt(i, x) for i, x, _ in task_items]
    task_out = run(task_prompts, scored.max_new_tokens, f"{task} task", scored.settled)
    harmless_out = run([fmt(p) for p in harmless_prompts], max_new_tokens, "harmless prompts")
    judge = judge or KeywordJudge()
    keyword = [keyword_verdict(r) for r in harmful_out]
    verdicts = keyword if judge.name == "keyword" else judge.verdicts(list(harmful_prompts), harmful_out)
    correct = [scored.correct(out, item[2]) for out, item in zip(task_out, task_items, strict=True)]
    refusals = [keyword_verdict(r) == "refused" for r in harmless_out]
    score, shares = harmful_score(verdicts, judge.name), harmful_score(keyword)
    result = EvalResult(
        hs=score.hs,
        refused=shares.refused,
        degenerate=shares.degenerate,
        n_prompts=score.n_prompts,
        fa=round(100.0 * sum(correct) / max(len(correct), 1), 2),
        n_task=len(correct),
        over_refusal=round(100.0 * sum(refusals) / max(len(refusals), 1), 2),
        n_harmless=len(refusals),
        judge=judge.name,
        harmful_set=harmful_set,
        task=task,
        unparsed=round(100.0 * verdicts.count("unparsed") / max(len(verdicts), 1), 2),
    )
    records = (
        [
            {"set": "harmful", "prompt": p, "response": r, "verdict": v, "keyword": k}
            for p, r, v, k in zip(harmful_prompts, harmful_out, verdicts, keyword, strict=True)
        ]
        + [
            {"set": task, "prompt": f"{i}\n{x}", "response": r, "correct": bool(c)}
            for (i, x, _), r, c in zip(task_items, task_out, correct, strict=True)
        ]
        + [
            {"set": "harmless", "prompt": p, "response": r, "verdict": "refused" if f else "answered"}
            for p, r, f in zip(harmless_prompts, harmless_out, refusals, strict=True)
        ]
    )
    return result, records
