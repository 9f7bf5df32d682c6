"""Pure tensor functions of the realignment engine (statistics, scores, mask selection) and the tables
`SCORES` and `GRANULARITIES` that name them.

No hooks, no models, no I/O: every function takes tensors and returns tensors, so each is tested
against a hand computation. Shapes follow `nn.Linear`: `weight: (out_features, in_features)`.

The tables are the single list of names: `RealignConfig` validates against them, the engine
dispatches through them and `--help` prints their help texts. torch is imported inside the functions,
so that reading the tables (config validation, `antidote --help`) does not import it.

Selection rule (all granularities): the `k` highest scores are selected, `k = n - int(n * (1 - ratio))`
(the reference code's floor rule). Ties at the threshold are broken by position: the lower flat index
is selected first, so masks are deterministic and independent of sort implementations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def num_selected(n: int, ratio: float) -> int:
    """How many of `n` scores the top `ratio` fraction holds: `n - int(n * (1 - ratio))`."""
    return n - int(n * (1.0 - ratio))


# ---- the statistic ----------------------------------------------------------------------------------


def sample_sq_sums(
    x: torch.Tensor, lengths: Sequence[int], starts: Sequence[int] | None = None
) -> torch.Tensor:
    """Per sample and input feature: the sum over that sample's real tokens of x^2, in float64.

    x: (batch, seq, in_features), any float dtype, each sample's real tokens first (right padding);
    lengths: (batch,) real tokens per sample; starts: (batch,) the first token that counts (default 0;
    e.g. the first response token, to count the response alone). Returns (batch, in_features) float64.

    Squares of float32, bfloat16 and float16 values are exact in float64, and each sample's sum is
    taken over a fresh tensor of its own tokens alone, so it does not depend on which other samples
    share the batch or on the padding width.
    """
    import torch

    # The copy is a fresh tensor of the same shape and layout at any batch size; squared in place.
    first = [0] * len(lengths) if starts is None else starts
    return torch.stack(
        [
            x[b, s:n].to(torch.float64, copy=True).square_().sum(0)
            for b, (s, n) in enumerate(zip(first, lengths, strict=True))
        ]
    )


# ---- scores -------------------------------------------------------------------------------------------


def wanda_score(weight: torch.Tensor, feature_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(s_j). weight: (out, in); feature_sq_sum: (in,). Returns (out, in) float32."""
    return weight.detach().float().abs() * feature_sq_sum.to(weight.device).float().sqrt().unsqueeze(0)


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|. weight: (out, in). Returns (out, in) float32."""
    return weight.detach().float().abs()


def random_score(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) scores of `shape`, float32, drawn on the CPU from `seed` (the same on any device)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator).to(device)


def contrast_score(
    weight: torch.Tensor, harmful_sq_sum: torch.Tensor, benign_sq_sum: torch.Tensor
) -> torch.Tensor:
    """Wanda on harmful data minus Wanda on benign data, each divided by its own tensor mean.

    High where a weight matters for the harmful data but not for the benign data (Wei et al. 2024).
    Returns (out, in) float32; can be negative.
    """
    import torch

    harmful = wanda_score(weight, harmful_sq_sum)
    benign = wanda_score(weight, benign_sq_sum)
    eps = torch.finfo(torch.float32).tiny
    return harmful / harmful.mean().clamp_min(eps) - benign / benign.mean().clamp_min(eps)


@dataclass(frozen=True)
class ScoreInputs:
    """What a score may use for one target tensor.

    weight: (out, in), the weight W, or the fine-tuning change W - W_ref when a reference is given;
    sq_sum: (in,) float32, the harmful-data statistic (mean over samples of the sum over tokens of x^2);
    benign_sq_sum: (in,) float32, the same on benign data (only for scores with `needs_benign`);
    seed: seeds random scores; the engine gives every tensor its own (`tensor_seed`).
    """

    weight: torch.Tensor
    sq_sum: torch.Tensor | None
    benign_sq_sum: torch.Tensor | None = None
    seed: int = 0


def tensor_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th target tensor under the run's `seed`."""
    return seed * 1_000_003 + index


@dataclass(frozen=True)
class ScoreSpec:
    """One score: its help text and `score(inputs) -> (out, in) float32 scores on the weight's device`."""

    help: str
    score: Callable[[ScoreInputs], torch.Tensor]
    needs_benign: bool = False
    needs_data: bool = True  # False: no calibration pass, no --data (the data-free ablations)


def _contrast(inputs: ScoreInputs) -> torch.Tensor:
    if inputs.sq_sum is None or inputs.benign_sq_sum is None:
        raise ValueError("the contrast score needs harmful and benign statistics")
    return contrast_score(inputs.weight, inputs.sq_sum, inputs.benign_sq_sum)


def _wanda(inputs: ScoreInputs) -> torch.Tensor:
    if inputs.sq_sum is None:
        raise ValueError("the wanda score needs calibration statistics")
    return wanda_score(inputs.weight, inputs.sq_sum)


SCORES: dict[str, ScoreSpec] = {
    "wanda": ScoreSpec(
        "|W| * sqrt(sum x^2) on the harmful data, the paper's",
        _wanda,
    ),
    "magnitude": ScoreSpec(
        "|W| alone, an ablation (no data)", lambda i: magnitude_score(i.weight), needs_data=False
    ),
    "random": ScoreSpec(
        "uniform random, seeded by --seed, an ablation (no data)",
        lambda i: random_score(i.weight.shape, i.seed, i.weight.device),
        needs_data=False,
    ),
    "contrast": ScoreSpec(
        "harmful-data Wanda minus --benign-data Wanda, each over its mean, after Wei et al. 2024",
        _contrast,
        needs_benign=True,
    ),
}


# ---- selection within one tensor ---------------------------------------------------------------------


def select_rows(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Top `ratio` of each row. scores: (out, in). Returns bool (out, in), the same count in every row."""
    return _select_top_k(scores, num_selected(scores.shape[1], ratio))


def select_tensor(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Top `ratio` of the whole tensor (any shape). Returns bool of the same shape."""
    flat = scores.reshape(1, -1)
    return _select_top_k(flat, num_selected(flat.shape[1], ratio)).reshape(scores.shape)


def _select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest entries of each row of scores (rows, n), ties at the threshold to the lower index."""
    import torch

    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    chosen = scores >= threshold
    # Fast path: a row with exactly k entries at or above its threshold has no tie to break.
    tied = (chosen.sum(dim=1) != k).nonzero().squeeze(1)
    if tied.numel():
        chosen[tied] = _take_ties_in_order(scores[tied], threshold[tied], k)
    return chosen


def _take_ties_in_order(scores: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """scores: (rows, n); threshold: (rows, 1) = the k-th largest of each row.

    Selects everything above the threshold, then the lowest-index entries equal to it until k per row.
    """
    above = scores > threshold
    equal = scores == threshold
    room = k - above.sum(dim=1, keepdim=True)
    return above | (equal & (equal.cumsum(dim=1) <= room))


# ---- global selection: one threshold over many tensors, never holding all scores at once ----------


def _ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2^32) with the same order (IEEE-754 bit trick)."""
    import torch

    bits = (values.float() + 0.0).reshape(-1).view(torch.int32).to(torch.int64)  # + 0.0 turns -0 into +0
    # Non-negative floats order like their bit patterns; negative ones in reverse, so flip them.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered + 2**31


def _key_to_value(key: int) -> float:
    import torch

    bits = key - 2**31
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def global_threshold(score_chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> tuple[float, int]:
    """The k-th largest value over all tensors that `score_chunks()` yields (k >= 1), and how many
    values lie strictly above it.

    Exact radix select in two passes of 16 bits, so memory is one tensor of scores plus a
    65536-bin histogram. `score_chunks` is called twice and must yield the same values each time.
    """
    import torch

    # Pass 1: histogram of the high 16 bits of every key.
    high_hist = torch.zeros(1 << 16, dtype=torch.int64)
    for scores in score_chunks():
        high_hist += torch.bincount((_ordered_keys(scores) >> 16).cpu(), minlength=1 << 16)
    high, above_high = _bucket_holding_kth_largest(high_hist, k)
    # Pass 2: histogram of the low 16 bits among keys in that high bucket.
    low_hist = torch.zeros(1 << 16, dtype=torch.int64)
    for scores in score_chunks():
        keys = _ordered_keys(scores)
        in_bucket = keys[(keys >> 16) == high]
        low_hist += torch.bincount((in_bucket & 0xFFFF).cpu(), minlength=1 << 16)
    low, above_low = _bucket_holding_kth_largest(low_hist, k - above_high)
    return _key_to_value((high << 16) | low), above_high + above_low


def _bucket_holding_kth_largest(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Return (the bucket holding the k-th largest, how many counts lie in higher buckets)."""
    import torch

    from_top = hist.flip(0).cumsum(0)  # from_top[i] = count in the i+1 highest buckets
    i = int(torch.searchsorted(from_top, torch.tensor(k)).item())
    above = int(from_top[i - 1].item()) if i > 0 else 0
    return hist.numel() - 1 - i, above


# ---- granularities: plan a selection over the targets, then take each tensor's mask -----------------

# take(i, scores_i) -> bool mask of scores_i's shape; called once per target tensor, in order.
Take = Callable[[int, "torch.Tensor"], "torch.Tensor"]
# plan(score_chunks, sizes, ratio) -> take; see GranularitySpec.
Planner = Callable[[Callable[[], Iterable["torch.Tensor"]], Sequence[int], float], Take]


def select_global(
    score_chunks: Callable[[], Iterable[torch.Tensor]], sizes: Sequence[int], ratio: float
) -> Take:
    """Plan a global top-`ratio` selection over tensors whose element counts are `sizes`.

    Returns `take(i, scores_i) -> bool mask`, to be called once per tensor in the same order as
    `score_chunks` yields them. Ties at the threshold go to earlier tensors, then lower flat index.
    """
    import torch

    k = num_selected(int(sum(sizes)), ratio)
    if k <= 0:
        return lambda i, scores: torch.zeros_like(scores, dtype=torch.bool)
    threshold, above = global_threshold(score_chunks, k)
    ties_left = [k - above]  # ties at the threshold fill exactly the remaining room

    def take(i: int, scores: torch.Tensor) -> torch.Tensor:
        flat = scores.reshape(-1)
        equal = flat == threshold
        chosen = (flat > threshold) | (equal & (equal.cumsum(0) <= ties_left[0]))
        ties_left[0] -= int((equal & chosen).sum().item())
        return chosen.reshape(scores.shape)

    return take


def _each_tensor(select: Callable[[torch.Tensor, float], torch.Tensor]) -> Planner:
    """A planner for selections made within each tensor alone: no pass over the scores beforehand."""

    def plan(score_chunks: Callable[[], Iterable[torch.Tensor]], sizes: Sequence[int], ratio: float) -> Take:
        return lambda i, scores: select(scores, ratio)

    return plan


@dataclass(frozen=True)
class GranularitySpec:
    """One granularity: its help text and `plan(score_chunks, sizes, ratio) -> take`.

    `score_chunks()` yields every target's scores in order (a planner may call it, e.g. twice for the
    global threshold); `sizes` are the targets' element counts; `take(i, scores_i)` returns the mask.
    """

    help: str
    plan: Planner


GRANULARITIES: dict[str, GranularitySpec] = {
    "row": GranularitySpec("top alpha of each output row, as the authors' code", _each_tensor(select_rows)),
    "layer": GranularitySpec("top alpha of each tensor", _each_tensor(select_tensor)),
    "global": GranularitySpec("one exact threshold over all targets", select_global),
}


def describe(table: Mapping[str, ScoreSpec | GranularitySpec]) -> str:
    """`name (help), ...` for a help text."""
    return ", ".join(f"{name} ({spec.help})" for name, spec in table.items())
