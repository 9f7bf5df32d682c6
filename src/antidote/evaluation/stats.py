"""Intervals for the numbers we report: Wilson for a proportion, percentile bootstrap for any statistic,
and a paired bootstrap for the share of the harm rise a defense recovers.

Pure functions on tensors; seeded, so the same inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
# The recovered share divides by the attack's HS rise; below this rise (a fraction: 0.1 = 10 HS points) it
# is undefined, since a small rise measured on a few prompts makes any share, even far outside [0, 1], likely.
MIN_RISE = 0.1


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion successes / n, in percent (rounded to 2 decimals).

    n = 0 gives (0, 100): nothing is known.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (0.0, 100.0)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2))


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """(n_resamples, n) int64: each row draws n of range(n) with replacement."""
    if n < 1 or n_resamples < 1:
        raise ValueError(f"need n >= 1 and n_resamples >= 1, got {n} and {n_resamples}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_resamples, n), generator=generator)


def percentile_interval(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The (1-level)/2 and (1+level)/2 percentiles of `values` (B,), NaN values left out.

    Order statistics, no interpolation: low = sorted[floor(a * B)], high = sorted[ceil((1 - a) * B) - 1]
    with a = (1 - level) / 2 and B the number of finite values. All NaN gives (nan, nan).
    """
    finite = values[~torch.isnan(values)].double().sort().values
    b = finite.numel()
    if b == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    eps = 1e-9  # (1 - 0.9) / 2 is 0.04999...: do not let rounding move an order statistic
    low = finite[min(math.floor(a * b + eps), b - 1)]
    high = finite[max(math.ceil((1 - a) * b - eps) - 1, 0)]
    return (float(low), float(high))


def bootstrap_interval(
    statistic: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of any statistic of n rows.

    statistic: maps resampled row indices (B, n) to one value per resample (B,), e.g.
    `lambda idx: x[idx].mean(dim=1)`; NaN values (an undefined statistic) are left out.
    """
    return percentile_interval(statistic(bootstrap_indices(n, n_resamples, seed)), level)


def recovered_share(attacked: torch.Tensor, defended: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """(HS_attacked - HS_defended) / (HS_attacked - HS_aligned) over the last dimension.

    Each input: (..., prompts) harmful indicators (0/1) of the same prompts. NaN where the attack raised
    the attack raised HS by less than `MIN_RISE` (or lowered it): undefined. 1 means the defended model is as
    harmless as the aligned one.
    """
    rise = attacked.double().mean(-1) - aligned.double().mean(-1)
    drop = attacked.double().mean(-1) - defended.double().mean(-1)
    return torch.where(rise < MIN_RISE - 1e-12, torch.full_like(rise, math.nan), drop / rise)


def recovered_share_interval(
    attacked: Sequence[bool] | torch.Tensor,
    defended: Sequence[bool] | torch.Tensor,
    aligned: Sequence[bool] | torch.Tensor,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(share, low, high): the recovered share and its paired bootstrap interval.

    The three models answered the same prompts, in the same order; each resample draws prompts (not
    answers), so a prompt's three verdicts stay together. The share is NaN (undefined) when the attack's
    rise is below `MIN_RISE`. Rule for resamples whose rise is below `MIN_RISE` (undefined there): when
    they are more than (1 - level) / 2 of all resamples, the interval is undefined (NaN, NaN), since the
    rise itself is not clearly above the threshold; otherwise the percentiles of the defined resamples.
    """
    a, d, g = (torch.as_tensor(x, dtype=torch.float64) for x in (attacked, defended, aligned))
    if not a.shape == d.shape == g.shape or a.dim() != 1:
        raise ValueError(
            f"need three verdict lists over the same prompts, got shapes {a.shape}, {d.shape}, {g.shape}"
        )
    share = float(recovered_share(a, d, g))
    idx = bootstrap_indices(a.numel(), n_resamples, seed)
    shares = recovered_share(a[idx], d[idx], g[idx])
    if math.isnan(share) or float(torch.isnan(shares).double().mean()) > (1 - level) / 2:
        return share, math.nan, math.nan
    low, high = percentile_interval(shares, level)
    return share, low, high


def crossed_bootstrap(
    values: Sequence[Sequence[float]] | torch.Tensor,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, object]:
    """Mean over seeds of each seed's mean over prompts, with a percentile bootstrap interval that covers
    both prompt sampling and seeds: every seed answered the same prompts, so each resample draws the
    prompts once (the same draw for every seed) and the seeds once, both with replacement.

    values: (seeds, prompts) per-prompt indicators (0/1), in percent points of the result. Returns
    {"mean", "low", "high" (percent, 2 decimals), "n" (seeds), "interval_kind": "bootstrap", "alike"}: `alike`
    is True when every value is the same, the one case where the interval has zero width (said so).
    """
    if not isinstance(values, torch.Tensor) and len({len(v) for v in values}) > 1:
        raise ValueError(
            f"need (seeds, prompts) values over the same prompts, got {[len(v) for v in values]}"
        )
    x = torch.as_tensor(values, dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"need (seeds, prompts) values over the same prompts, got shape {tuple(x.shape)}")
    seeds, prompts = x.shape
    generator = torch.Generator().manual_seed(seed)
    prompt_draw = torch.randint(0, prompts, (n_resamples, prompts), generator=generator)
    seed_draw = torch.randint(0, seeds, (n_resamples, seeds), generator=generator)
    per_seed = x[:, prompt_draw].mean(-1)  # (seeds, resamples): each seed's mean under each prompt draw
    resampled = per_seed.T.gather(1, seed_draw).mean(1)
    low, high = percentile_interval(resampled, level)
    return {
        "mean": round(100 * float(x.mean(1).mean()), 2),
        "low": round(100 * low, 2),
        "high": round(100 * high, 2),
        "n": seeds,
        "interval_kind": "bootstrap",
        "alike": bool((x == x[0, 0]).all()),
    }
