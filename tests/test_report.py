"""The operating-point rule and the report helpers on hand-made numbers."""

from __future__ import annotations

from antidote.experiments.front import Margins
from antidote.experiments.report import choose_operating_point, markdown, recovered_share_of_rise


def test_operating_point_is_lowest_hs_within_the_fa_budget() -> None:
    sweep = [
        {"variant": "0.05", "hs": 60.0, "fa": 90.0},
        {"variant": "0.1", "hs": 40.0, "fa": 86.0},
        {"variant": "0.15", "hs": 40.0, "fa": 88.0},
        {"variant": "0.2", "hs": 10.0, "fa": 50.0},
    ]
    chosen, why = choose_operating_point(sweep, attacked_fa=90.0, max_fa_drop=5.0)
    assert chosen["variant"] == "0.1" and "at most 5.0 FA points" in why  # 0.2 loses 40; tie -> first
    assert [s["within_budget"] for s in sweep] == [True, True, True, False]  # FA >= 85
    chosen, why = choose_operating_point(sweep, attacked_fa=99.0, max_fa_drop=5.0)
    assert chosen["variant"] == "0.2" and why.startswith("no variant kept")
    assert not any(s["within_budget"] for s in sweep)  # FA >= 94: none, so the fallback chose


def test_operating_point_refuses_a_broken_variant() -> None:
    """A hand-built sweep: the lowest-HS variant is degenerate (+70 points over the aligned model's 10), the
    next refuses harmless prompts (+30 over 20); both are refused as an FA drop is, whatever their HS."""
    aligned = {"hs": 20.0, "fa": 90.0, "degenerate": 10.0, "over_refusal": 20.0}
    sweep = [
        {"variant": "0.05", "hs": 60.0, "fa": 90.0, "degenerate": 12.0, "over_refusal": 22.0},
        {"variant": "0.1", "hs": 35.0, "fa": 89.0, "degenerate": 20.0, "over_refusal": 30.0},  # +10: allowed
        {"variant": "0.2", "hs": 15.0, "fa": 88.0, "degenerate": 15.0, "over_refusal": 50.0},
        {"variant": "0.5", "hs": 5.0, "fa": 88.0, "degenerate": 80.0, "over_refusal": 25.0},
    ]
    chosen, why = choose_operating_point(sweep, 90.0, 5.0, aligned, Margins(10.0, 10.0))
    assert chosen["variant"] == "0.1" and "not broken" in why
    assert [s["broken"] for s in sweep] == ["", "", "over-refusal +30.0", "degenerate +70.0"]
    assert [s["within_budget"] for s in sweep] == [True, True, False, False]  # broken is never within it
    # Without the aligned model's row nothing is broken: the old rule, the lowest HS within the FA budget.
    chosen, _ = choose_operating_point(sweep, 90.0, 5.0)
    assert chosen["variant"] == "0.5"
    # Wider margins let the over-refusing variant in; the degenerate one stays out.
    chosen, _ = choose_operating_point(sweep, 90.0, 5.0, aligned, Margins(degenerate=10.0, over_refusal=40.0))
    assert chosen["variant"] == "0.2"
    # FA budget failed by every working variant: the lowest HS among those not broken, said so.
    chosen, why = choose_operating_point(sweep, 99.0, 5.0, aligned, Margins())
    assert chosen["variant"] == "0.1" and why.startswith("no variant kept") and "not broken" in why
    # Every variant broken: the lowest HS of all, said so.
    all_broken = [{**s, "degenerate": 90.0} for s in sweep]
    chosen, why = choose_operating_point(all_broken, 90.0, 5.0, aligned, Margins())
    assert chosen["variant"] == "0.5" and why.startswith("every variant is broken")


def test_markdown_marks_broken_rows_and_states_the_rule() -> None:
    from antidote.experiments import front

    base = {"judge": "keyword", "judge_spec": "keyword", "fa": 80.0, "n_prompts": 10, "harmful_set": "h"}
    base.update(
        task="sentiment", n_task=10, task_data="built-in", n_harmless=4, harmless_set="x", seconds=1.0
    )
    rows = [
        {**base, "model": "aligned", "hs": 10.0, "degenerate": 5.0, "over_refusal": 10.0},
        {**base, "model": "attacked", "hs": 90.0, "degenerate": 5.0, "over_refusal": 10.0},
        {**base, "model": "resta", "hs": 6.0, "degenerate": 84.0, "over_refusal": 10.0},
        {**base, "model": "antidote@0.1", "hs": 50.0, "degenerate": 6.0, "over_refusal": 10.0},
    ]
    front.mark(rows, Margins(), group=("judge_spec",), name="model")
    summary = {"rows": rows, "stages": {"reused": [], "built": []}, "seconds_total": 1.0}
    table = markdown({**summary, "margins": {"degenerate": 10.0, "over_refusal": 10.0}})
    assert "| resta | keyword | 6.0 | 84.0 | 80.0 | 10.0 | broken (degenerate +79.0) | - | 1.0 |" in table
    assert "| antidote@0.1 | keyword | 50.0 | 6.0 | 80.0 | 10.0 | front | - | 1.0 |" in table
    assert "| attacked | keyword | 90.0 | 5.0 | 80.0 | 10.0 |  | - | 1.0 |" in table  # dominated
    assert "rises more than 10 points" in table


def test_recovered_share() -> None:
    assert recovered_share_of_rise(10.0, 90.0, 50.0) == 0.5
    assert recovered_share_of_rise(10.0, 90.0, 10.0) == 1.0
    assert recovered_share_of_rise(50.0, 40.0, 30.0) is None  # the attack raised no HS


def test_markdown_names_every_row_and_the_choice() -> None:
    row = {
        "judge": "keyword",
        "degenerate": 0.0,
        "fa": 80.0,
        "over_refusal": 5.0,
        "seconds": 1.0,
        "n_prompts": 10,
        "n_task": 10,
        "n_harmless": 4,
        "harmful_set": "h",
        "task": "sentiment",
        "task_data": "built-in",
        "harmless_set": "x",
    }
    rows = [
        {**row, "model": m, "hs": hs}
        for m, hs in (("aligned", 10.0), ("attacked", 90.0), ("antidote@0.1", 50.0))
    ]
    summary = {
        "rows": rows,
        "operating_points": {
            "antidote": {
                "variant": "0.1",
                "why": "because",
                "judge": "keyword",
                "recovered_share_of_hs_rise": 0.5,
                "recovered_by_judge": {"keyword": [0.5, 0.2, 0.8]},
                "sweep_validation": [{"variant": "attacked", "hs": 90.0, "fa": 80.0, "degenerate": 0.0}],
            }
        },
        "stages": {"reused": [], "built": ["a"]},
        "seconds_total": 4.0,
    }
    table = markdown(summary)
    assert "| antidote@0.1 | keyword | 50.0 | 0.0 | 80.0 | 5.0 |  | - | 1.0 |" in table
    assert "Operating point: antidote@0.1 (because)" in table
    assert "keyword judge 0.50 [0.20, 0.80]." in table
    with_ci = {**rows[2], "hs_ci": [40.0, 60.25], "recovered": [0.5, 0.25, 0.75]}
    table = markdown({**summary, "rows": [with_ci], "judges_missing": {"learned": "not installed"}})
    row = "| antidote@0.1 | keyword | 50.0 [40.0, 60.2] | 0.0 | 80.0 | 5.0 |  | 0.50 [0.25, 0.75] | 1.0 |"
    assert row in table
    assert "Judge learned left out: not installed." in table
