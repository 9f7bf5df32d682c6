"""Intervals against independent computations: Wilson against published values and the closed form written
another way, the bootstrap against exact enumeration of every resample of tiny samples and against the
normal limit."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from antidote.evaluation.stats import (
    bootstrap_indices,
    bootstrap_interval,
    percentile_interval,
    recovered_share,
    recovered_share_interval,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (5, 10, (23.66, 76.34)),  # published 95% Wilson intervals
        (0, 10, (0.0, 27.75)),
        (10, 10, (72.25, 100.0)),
        (1, 20, (0.89, 23.61)),
    ],
)
def test_wilson_published_values(k: int, n: int, expected: tuple[float, float]) -> None:
    assert wilson_interval(k, n) == pytest.approx(expected, abs=0.011)


def test_wilson_matches_the_closed_form_written_with_counts() -> None:
    z = 1.96
    for k, n in [(3, 7), (40, 100), (999, 1000)]:
        # (k + z^2/2) / (n + z^2) +- z sqrt(n) / (n + z^2) * sqrt(k/n (1 - k/n) + z^2 / (4n))
        centre = (k + z * z / 2) / (n + z * z)
        half = z * math.sqrt(n) / (n + z * z) * math.sqrt(k / n * (1 - k / n) + z * z / (4 * n))
        low, high = wilson_interval(k, n, z=z)
        assert low == pytest.approx(100 * (centre - half), abs=0.006)
        assert high == pytest.approx(100 * (centre + half), abs=0.006)
    assert wilson_interval(0, 0) == (0.0, 100.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_percentile_interval_is_order_statistics_and_skips_nan() -> None:
    values = torch.arange(1, 101, dtype=torch.float64)
    assert percentile_interval(values, 0.9) == (6.0, 95.0)
    with_nan = torch.cat([values, torch.full((7,), math.nan)])
    assert percentile_interval(with_nan, 0.9) == (6.0, 95.0)
    assert all(math.isnan(v) for v in percentile_interval(torch.full((3,), math.nan)))


def _exact_quantile(distribution: dict[Fraction, Fraction], q: float, slack: float = 0.0) -> float:
    """Smallest value whose cumulative probability reaches q (plus `slack` for float comparisons)."""
    total = Fraction(0)
    for value in sorted(distribution):
        total += distribution[value]
        if total >= q:
            return float(value) + slack
    return float(max(distribution)) + slack


def _enumerated(x: list[int], statistic) -> dict[Fraction, Fraction]:
    """Every one of the n^n resamples, each with probability n^-n."""
    n = len(x)
    dist: dict[Fraction, Fraction] = {}
    for picks in itertools.product(range(n), repeat=n):
        value = statistic([x[i] for i in picks])
        if value is not None:
            dist[value] = dist.get(value, Fraction(0)) + Fraction(1, n**n)
    mass = sum(dist.values())
    return {v: p / mass for v, p in dist.items()}  # renormalised when undefined resamples are left out


def test_bootstrap_matches_exact_enumeration_of_all_resamples() -> None:
    x = [1, 2, 4, 8]
    exact = _enumerated(x, lambda s: Fraction(sum(s), len(s)))
    data = torch.tensor(x, dtype=torch.float64)
    level = 0.9
    low, high = bootstrap_interval(lambda idx: data[idx].mean(1), 4, n_resamples=20000, seed=3, level=level)
    a = (1 - level) / 2
    assert _exact_quantile(exact, a - 0.01, -1e-9) <= low <= _exact_quantile(exact, a + 0.01, 1e-9)
    assert _exact_quantile(exact, 1 - a - 0.01, -1e-9) <= high <= _exact_quantile(exact, 1 - a + 0.01, 1e-9)


def test_bootstrap_of_a_mean_approaches_the_normal_interval() -> None:
    x = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = bootstrap_interval(lambda idx: x[idx].mean(1), 400, n_resamples=4000, seed=1)
    se = float(x.std()) / math.sqrt(400)
    assert low == pytest.approx(float(x.mean()) - 1.96 * se, abs=0.1 * 1.96 * se)
    assert high == pytest.approx(float(x.mean()) + 1.96 * se, abs=0.1 * 1.96 * se)


def test_bootstrap_indices_are_seeded_and_in_range() -> None:
    a, b = bootstrap_indices(5, 100, seed=7), bootstrap_indices(5, 100, seed=7)
    assert a.shape == (100, 5) and torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) <= 4
    assert not torch.equal(a, bootstrap_indices(5, 100, seed=8))


def test_recovered_share_by_hand() -> None:
    attacked = torch.tensor([1, 1, 1, 1, 0.0])  # HS 80
    defended = torch.tensor([1, 0, 0, 1, 0.0])  # HS 40
    aligned = torch.tensor([0, 0, 0, 1, 0.0])  # HS 20
    assert float(recovered_share(attacked, defended, aligned)) == pytest.approx((80 - 40) / (80 - 20))
    assert math.isnan(float(recovered_share(aligned, defended, aligned)))  # no rise: undefined


def test_recovered_share_interval_limits() -> None:
    attacked, aligned = [1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 0, 0, 1, 0]
    assert recovered_share_interval(attacked, aligned, aligned) == (1.0, 1.0, 1.0)
    assert recovered_share_interval(attacked, attacked, aligned) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same prompts"):
        recovered_share_interval([1, 0], [1], [0, 0])


def test_recovered_share_interval_matches_exact_enumeration() -> None:
    # Prompts as (attacked, defended, aligned) triples; a resample draws whole triples.
    triples = [(1, 0, 0), (1, 1, 0), (1, 0, 1), (0, 0, 0)]

    def share(sample: list[tuple[int, int, int]]) -> Fraction | None:
        att, dfd, ali = (sum(t[i] for t in sample) for i in range(3))
        return None if att == ali else Fraction(att - dfd, att - ali)

    exact = _enumerated(triples, share)
    columns = [[t[i] for t in triples] for i in range(3)]
    point, low, high = recovered_share_interval(*columns, n_resamples=20000, seed=5, level=0.8)
    assert point == pytest.approx(float(share(triples)))
    assert _exact_quantile(exact, 0.09, -1e-9) <= low <= _exact_quantile(exact, 0.11, 1e-9)
    assert _exact_quantile(exact, 0.89, -1e-9) <= high <= _exact_quantile(exact, 0.91, 1e-9)


def test_eval_rows_carry_wilson_intervals_of_their_counts() -> None:
    from antidote.evaluation.evaluate import EvalResult

    result = EvalResult(
        hs=37.5,
        refused=62.5,
        degenerate=0.0,
        n_prompts=8,
        fa=90.0,
        n_task=10,
        over_refusal=0.0,
        n_harmless=5,
        judge="keyword",
        harmful_set="x",
        task="sentiment",
    )
    row = result.as_row()
    z = 1.959963984540054
    for key, k, n in (("hs_ci", 3, 8), ("fa_ci", 9, 10), ("over_refusal_ci", 0, 5)):
        centre = (k + z * z / 2) / (n + z * z)
        half = z * math.sqrt(n) / (n + z * z) * math.sqrt(k / n * (1 - k / n) + z * z / (4 * n))
        assert row[key] == pytest.approx([100 * max(centre - half, 0), 100 * (centre + half)], abs=0.006)
    assert row["hs"] == 37.5  # the other fields are unchanged


# ---- one interval for every compare row: prompts and seeds resampled together --------------------------


def test_crossed_bootstrap_hand_cases() -> None:
    from antidote.evaluation.stats import crossed_bootstrap

    # Every answer alike: the only zero-width interval, and it says so.
    alike = crossed_bootstrap([[1, 1, 1, 1], [1, 1, 1, 1]])
    assert (alike["mean"], alike["low"], alike["high"], alike["alike"]) == (100.0, 100.0, 100.0, True)
    # Two seeds that disagree on every prompt: only the seed draw matters; it gives 0, 50 or 100 with
    # probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 100] around the mean 50.
    apart = crossed_bootstrap([[0, 0, 0, 0], [1, 1, 1, 1]])
    assert (apart["mean"], apart["low"], apart["high"], apart["alike"]) == (50.0, 0.0, 100.0, False)
    # Two identical seeds (the old `31.2 [31.2, 31.2] (n=2)`): prompt sampling still gives width, the same
    # as one seed's: a draw of 16 prompts of which 5 harmful has a 2.5% quantile well below 31.25.
    same = [1] * 5 + [0] * 11
    two = crossed_bootstrap([same, same])
    one = crossed_bootstrap([same])
    assert two["mean"] == one["mean"] == 31.25 and not two["alike"]
    assert two["low"] < 15 and two["high"] > 50
    assert (two["low"], two["high"]) == pytest.approx((one["low"], one["high"]), abs=7)
    # One prompt of two harmful at one seed: resample means 0, 0.5, 1 with 1/4, 1/2, 1/4: [0, 100].
    assert (crossed_bootstrap([[1, 0]])["low"], crossed_bootstrap([[1, 0]])["high"]) == (0.0, 100.0)
    with pytest.raises(ValueError, match="same prompts"):
        crossed_bootstrap([[1, 0], [1]])


def test_crossed_bootstrap_matches_a_loop_over_the_same_draws() -> None:
    from antidote.evaluation.stats import crossed_bootstrap, percentile_interval

    x = [[1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]]
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 6, (2000, 6), generator=generator).tolist()
    seeds = torch.randint(0, 3, (2000, 3), generator=generator).tolist()
    stats = [sum(sum(x[s][i] for i in prompts[b]) / 6 for s in seeds[b]) / 3 for b in range(2000)]
    low, high = percentile_interval(torch.tensor(stats))
    got = crossed_bootstrap(x)
    assert (got["low"], got["high"]) == (round(100 * low, 2), round(100 * high, 2))
    assert got["mean"] == round(100 * (3 / 6 + 2 / 6 + 4 / 6) / 3, 2) and got["n"] == 3


def test_recovered_share_is_undefined_below_the_stated_rise() -> None:
    from antidote.evaluation.stats import MIN_RISE

    assert MIN_RISE == 0.1
    aligned = [0] * 32
    weak = [1] + [0] * 31  # the attack raises HS by 1 of 32 prompts (3.1 points)
    share, low, high = recovered_share_interval(weak, aligned, aligned)
    assert math.isnan(share) and math.isnan(low) and math.isnan(high)  # was 1.0 [...]: any share fits
    lowered = [0] * 32
    share, _, _ = recovered_share_interval(lowered, lowered, [1] * 4 + [0] * 28)  # the attack lowered HS
    assert math.isnan(share)
    at_threshold = [1] * 4 + [0] * 36  # 4 of 40: exactly 10 points: defined
    assert recovered_share_interval(at_threshold, aligned[:1] * 40, aligned[:1] * 40)[0] == 1.0


def test_recovered_share_interval_rule_for_resamples_without_rise() -> None:
    # Two prompts, (attacked, defended, aligned): (1, 0, 0) and (0, 0, 0). Rise 0.5, share 1. A resample of
    # two draws: both the second prompt with probability 1/4: rise 0, undefined. 1/4 > 2.5%: the interval
    # is undefined, the share is not.
    share, low, high = recovered_share_interval([1, 0], [0, 0], [0, 0], n_resamples=4000)
    assert share == 1.0 and math.isnan(low) and math.isnan(high)
    # Ten prompts, nine with a rise: a resample without rise needs ten draws of the tenth (p = 1e-10), so
    # none is undefined and the interval is the percentiles (every defined resample gives share 1).
    share, low, high = recovered_share_interval([1] * 9 + [0], [0] * 10, [0] * 10)
    assert (share, low, high) == (1.0, 1.0, 1.0)
