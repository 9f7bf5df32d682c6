"""The aggregation math of `antidote compare`: a mean over seeds with its Student-t interval, and the
exact Student-t quantile it needs (no SciPy). Pure functions of numbers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's T with `df` (integer >= 1) degrees of freedom.

    Closed form (Abramowitz & Stegun 26.7.3-4), theta = atan(t / sqrt(df)):
    df odd:  2/pi * (theta + sin(theta) * (cos + 2/3 cos^3 + ... + (2*4*..*(df-3))/(1*3*..*(df-2))
             cos^(df-2)))
    df even: sin(theta) * (1 + 1/2 cos^2 + ... + (1*3*..*(df-3))/(2*4*..*(df-2)) cos^(df-2))
    """
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, c
        for k in range(1, df - 1, 2):  # powers cos^1, cos^3, ..., cos^(df-2)
            total += term
            term *= c * c * (k + 1) / (k + 2)
        return 2 / math.pi * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(0, df - 1, 2):  # powers cos^0, cos^2, ..., cos^(df-2)
        total += term
        term *= c * c * (k + 1) / (k + 2)
    return s * total


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| <= t) = level (e.g. 0.95 -> the 97.5% quantile), by bisection to 1e-12."""
    if not 0 < level < 1:
        raise ValueError(f"need 0 < level < 1, got {level}")
    low, high = 0.0, 1.0
    while t_two_sided_mass(high, df) < level:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_mass(mid, df) < level:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return (low + high) / 2


def mean_t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{df=n-1} * s / sqrt(n), s the sample standard deviation (n >= 2)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    mean = statistics.fmean(values)
    half = t_quantile(level, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def summarize(
    values: Sequence[float],
    intervals: Sequence[Sequence[float] | None],
    level: float = 0.95,
    bounds: tuple[float, float] = (0.0, 100.0),
) -> dict[str, object]:
    """One table entry from the same number over seeds: several seeds give the mean and its t interval
    (`interval_kind` "t"); one seed gives the value and its own per-prompt interval (`intervals[0]`,
    e.g. Wilson; kind "per-prompt", or None when the row has none)."""
    if len(values) >= 2:
        mean, t_low, t_high = mean_t_interval(values, level)
        return {  # a percentage's interval ends at its bounds (a t interval of 2 seeds easily passes 100)
            "mean": round(mean, 2),
            "low": round(max(t_low, bounds[0]), 2),
            "high": round(min(t_high, bounds[1]), 2),
            "n": len(values),
            "interval_kind": "t",
        }
    if len(values) == 1:
        ci = intervals[0] if intervals else None
        own: tuple[float | None, float | None] = (float(ci[0]), float(ci[1])) if ci else (None, None)
        low, high = own
        return {
            "mean": values[0],
            "low": low,
            "high": high,
            "n": 1,
            "interval_kind": "per-prompt" if ci is not None else None,
        }
    raise ValueError("nothing to summarize")
