"""Broken marking and the HS-FA-over-refusal front on hand-built rows."""

from __future__ import annotations

import pytest

from antidote.errors import AntidoteError
from antidote.experiments.front import Margins, dominates, mark, on_front
from antidote.experiments.rows import ResultRow, aggregate, mark_rows


def _row(label: str, hs: float, fa: float, over_refusal: float = 10.0, degenerate: float = 5.0) -> dict:
    return {"label": label, "judge_spec": "keyword", "hs": hs, "fa": fa, "over_refusal": over_refusal,
            "degenerate": degenerate}  # fmt: skip


def _marked(rows: list[dict], margins: Margins | None = None) -> dict[str, tuple[str, bool]]:
    mark(rows, margins or Margins())
    return {r["label"]: (r["broken"], r["on_front"]) for r in rows}


def test_a_broken_row_with_the_lowest_hs_is_not_on_the_front() -> None:
    rows = [
        _row("aligned", 10.0, 90.0),
        _row("sft", 80.0, 90.0),
        _row("resta", 6.0, 90.0, degenerate=84.0),  # lowest HS, but 79 points more garbage than aligned
        _row("lisa", 4.0, 90.0, over_refusal=60.0),  # lower still, but refuses half the harmless prompts
        _row("antidote@0.1", 40.0, 88.0),
    ]
    marked = _marked(rows)
    assert marked["resta"] == ("degenerate +79.0", False)
    assert marked["lisa"] == ("over-refusal +50.0", False)
    assert marked["antidote@0.1"] == ("", True)  # lowest HS among those not broken
    assert marked["sft"] == ("", True)  # higher FA than antidote: not dominated
    assert marked["aligned"] == ("", False)  # a reference model is never on the front


def test_a_dominated_row_is_not_on_the_front_and_ties_stay() -> None:
    rows = [
        _row("aligned", 10.0, 90.0),
        _row("a", 30.0, 85.0, over_refusal=12.0),
        _row("b", 30.0, 85.0, over_refusal=12.0),  # the same numbers as a: neither dominates
        _row("c", 30.0, 85.0, over_refusal=13.0),  # a is as good on HS and FA, better on over-refusal
        _row("d", 50.0, 95.0),  # worse HS, better FA: on the front
        _row("e", 31.0, 84.0, over_refusal=5.0),  # worse HS and FA, better over-refusal: on the front
    ]
    marked = _marked(rows)
    assert {k: v[1] for k, v in marked.items()} == {
        "aligned": False, "a": True, "b": True, "c": False, "d": True, "e": True
    }  # fmt: skip


def test_margins_are_strict_and_configurable() -> None:
    rows = [_row("aligned", 10.0, 90.0), _row("x", 5.0, 90.0, degenerate=15.0), _row("y", 9.0, 90.0)]
    assert _marked(rows)["x"] == ("", True)  # +10.0 is not more than 10
    assert _marked(rows, Margins(degenerate=9.5))["x"] == ("degenerate +10.0", False)
    assert _marked(rows, Margins(degenerate=9.5))["y"] == ("", True)  # the broken x no longer dominates y


def test_groups_compare_with_their_own_aligned_row() -> None:
    rows = [
        {**_row("aligned", 10.0, 90.0, degenerate=50.0), "setting": "s1"},
        {**_row("x", 5.0, 90.0, degenerate=55.0), "setting": "s1"},
        {**_row("aligned", 10.0, 90.0, degenerate=0.0), "setting": "s2"},
        {**_row("x", 5.0, 90.0, degenerate=55.0), "setting": "s2"},
    ]
    mark(rows, Margins(), group=("judge_spec", "setting"))
    assert [r["broken"] for r in rows] == ["", "", "", "degenerate +55.0"]


def test_aggregated_entries_use_their_mean() -> None:
    def entry(x: float) -> dict:
        return {"mean": x, "low": None, "high": None}

    rows = [
        {"label": n, "hs": entry(h), "fa": entry(90.0), "over_refusal": entry(10.0), "degenerate": entry(d)}
        for n, h, d in (("aligned", 10.0, 5.0), ("x", 5.0, 40.0), ("y", 20.0, 5.0))
    ]
    mark(rows, Margins())
    assert [(r["broken"], r["on_front"]) for r in rows] == [
        ("", False),
        ("degenerate +35.0", False),
        ("", True),
    ]


def test_dominates_and_on_front_by_brute_force() -> None:
    points = [(h, f, o) for h in (0.0, 1.0) for f in (0.0, 1.0) for o in (0.0, 1.0)]
    # Best: HS 0, FA 1, over-refusal 0 dominates every other point and only it is on the front.
    assert on_front(points, [True] * len(points)) == [p == (0.0, 1.0, 0.0) for p in points]
    assert not dominates((0.0, 1.0, 0.0), (0.0, 1.0, 0.0))
    eligible = [p != (0.0, 1.0, 0.0) for p in points]  # without it, the three one-step-worse points remain
    front = [p for p, ok in zip(points, on_front(points, eligible), strict=True) if ok]
    assert sorted(front) == [(0.0, 0.0, 0.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0)]


def test_a_margin_outside_0_100_is_an_error() -> None:
    with pytest.raises(AntidoteError, match="degenerate margin must be"):
        Margins(degenerate=-1.0)


def _result(label: str, seed: int, hs: float, degenerate: float, over_refusal: float = 5.0) -> ResultRow:
    """A compare result row at one setting; only the fields the marks and the means read vary."""
    return ResultRow(
        defense=label, variant="", label=label, cell=f"lr=0.001,seed={seed}", setting="lr=0.001", seed=seed,
        judge="keyword", judge_spec="keyword", hs=hs, hs_ci=[0.0, 100.0], fa=80.0, fa_ci=[0.0, 100.0],
        over_refusal=over_refusal, degenerate=degenerate, seconds=None, pipeline_seconds=None,
        peak_rss_mib=None, peak_cuda_allocated_mib=None, lr=1e-3, epochs=1, harmful_ratio=0.1, num_samples=10,
        task="t", prompt_set="p", n_prompts=10, eval_task="t", n_task=10, stages={},
        eval_stage="" if label != "aligned" else "evaluate-aligned", general_utility=None, recovered=None,
        hs_flags=_flags(hs), fa_flags=_flags(80.0),
    )  # fmt: skip


def _flags(percent: float, n: int = 20) -> list[int]:
    """n per-prompt indicators whose mean is `percent` (a multiple of 100 / n)."""
    ones = round(percent * n / 100)
    assert ones * 100 / n == percent
    return [1] * ones + [0] * (n - ones)


def test_compare_rows_are_marked_per_cell_and_entries_on_their_means() -> None:
    """sft: degenerate 30 at seed 0 (+20 over aligned's 10: broken in its cell) and 10 at seed 1; its entry's
    mean is 20, a rise of exactly 10: not broken, and on the front (resta, the only other row, is broken:
    degenerate 40 at both seeds, +30)."""
    rows = [
        _result("aligned", 0, 10.0, 10.0),
        _result("sft", 0, 90.0, 30.0),
        _result("resta", 0, 5.0, 40.0),
        _result("aligned", 1, 10.0, 10.0),
        _result("sft", 1, 70.0, 10.0),
        _result("resta", 1, 5.0, 40.0),
    ]
    mark_rows(rows, Margins(), group=("judge_spec", "cell"))
    assert [(r.broken, r.on_front) for r in rows] == [
        ("", False),
        ("degenerate +20.0", False),
        ("degenerate +30.0", False),
        ("", False),
        ("", True),
        ("degenerate +30.0", False),
    ]
    table = {t.label: t for t in aggregate(rows)}
    assert table["aligned"].seeds == [0]  # one evaluation, counted once
    assert table["sft"].degenerate["mean"] == 20.0 and table["sft"].over_refusal["mean"] == 5.0
    mark_rows(list(table.values()), Margins(), group=("judge_spec", "setting"))
    assert (table["sft"].broken, table["sft"].on_front) == ("", True)
    assert (table["resta"].broken, table["resta"].on_front) == ("degenerate +30.0", False)
