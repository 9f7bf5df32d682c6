"""The operating-point rule and the report helpers on hand-made numbers."""

from __future__ import annotations

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
    chosen, why = choose_operating_point(sweep, attacked_fa=99.0, max_fa_drop=5.0)
    assert chosen["variant"] == "0.2" and why.startswith("no variant kept")


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
    assert "| antidote@0.1 | keyword | 50.0 | 0.0 | 80.0 | 5.0 | - | 1.0 |" in table
    assert "Operating point: antidote@0.1 (because)" in table
    assert "keyword judge 0.50 [0.20, 0.80]." in table
    with_ci = {**rows[2], "hs_ci": [40.0, 60.25], "recovered": [0.5, 0.25, 0.75]}
    table = markdown({**summary, "rows": [with_ci], "judges_missing": {"learned": "not installed"}})
    row = "| antidote@0.1 | keyword | 50.0 [40.0, 60.2] | 0.0 | 80.0 | 5.0 | 0.50 [0.25, 0.75] | 1.0 |"
    assert row in table
    assert "Judge learned left out: not installed." in table
