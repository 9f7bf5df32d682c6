"""The demo's operating-point rule and report helpers on hand-made numbers."""

from __future__ import annotations

from antidote.evaluation.evaluate import EvalResult
from antidote.experiments.demo import _recovered, choose_operating_point, markdown_table


def result(hs: float, fa: float) -> EvalResult:
    return EvalResult(
        hs=hs,
        refused=100 - hs,
        degenerate=0.0,
        n_prompts=10,
        fa=fa,
        n_task=10,
        over_refusal=0.0,
        n_harmless=4,
        judge="keyword",
        harmful_set="built-in validate",
        task="sentiment",
    )


def test_operating_point_is_lowest_hs_within_the_fa_budget() -> None:
    sweep = [
        {"mask_ratio": 0.05, "hs": 60.0, "fa": 90.0},
        {"mask_ratio": 0.1, "hs": 40.0, "fa": 86.0},
        {"mask_ratio": 0.2, "hs": 10.0, "fa": 50.0},
        {"mask_ratio": 0.15, "hs": 40.0, "fa": 88.0},
    ]
    chosen, why = choose_operating_point(sweep, result(80.0, 90.0).fa, max_fa_drop=5.0)
    assert (
        chosen["mask_ratio"] == 0.1 and "at most 5.0 FA points" in why
    )  # 0.2 loses 40 points; tie -> smaller
    chosen, why = choose_operating_point(sweep, result(80.0, 99.0).fa, max_fa_drop=5.0)
    assert chosen["mask_ratio"] == 0.2 and why.startswith("no ratio kept")


def test_recovered_share_and_table() -> None:
    rows = [
        {
            "model": m,
            "hs": hs,
            "degenerate": 0.0,
            "fa": 80.0,
            "over_refusal": 5.0,
            "seconds": 1.0,
            "n_prompts": 10,
            "n_task": 10,
            "n_harmless": 4,
        }
        for m, hs in (("base", 90.0), ("aligned", 10.0), ("attacked", 90.0), ("realigned", 50.0))
    ]
    assert _recovered(rows) == 0.5
    summary = {
        "model": "m",
        "judge": "keyword",
        "data": "built-in",
        "rows": rows,
        "seconds_total": 4.0,
        "sweep_validation": [{"mask_ratio": 0.0, "hs": 90.0, "fa": 80.0, "degenerate": 0.0}],
        "operating_point": {"mask_ratio": 0.1, "why": "because"},
        "recovered_share_of_hs_rise": 0.5,
    }
    table = markdown_table(summary)
    assert "| realigned | 50.0 | 0.0 | 80.0 | 5.0 |" in table and "alpha 0.1 (because)" in table
