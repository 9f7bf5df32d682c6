"""The steps both engines share (in memory: `engine.py`; block by block: `sequential.py`).

The mask steps -- score each target, select its mask, apply it in place and restore it -- one tensor at a
time; the checks on weights and statistics; the calibration data; the output check; the phase timer and
what a run returns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from antidote.data import tokenize_examples
from antidote.errors import AntidoteError
from antidote.outputs import check_output_dir
from antidote.realignment.calibrate import Statistics
from antidote.realignment.config import RealignConfig
from antidote.realignment.save import ratio_folder
from antidote.realignment.scores import GRANULARITIES, SCORES, ScoreInputs, tensor_seed
from antidote.tasks import load_pairs

Records = Sequence[Mapping[str, Any]]


@dataclass
class SweepResult:
    """What a run over one or more mask ratios produced: one report per ratio, in order (what each
    `realign_report.json` holds), and the output folder (None when nothing was written). With several
    ratios, each ratio's output is in `output/alpha-<ratio>/`; `folders` lists them. Under a
    multi-process launch, only rank 0's result has reports; the others' is empty."""

    reports: list[dict[str, Any]]
    output: Path | None = None

    @property
    def folders(self) -> list[Path | None]:
        if self.output is None:
            return [None] * len(self.reports)
        if len(self.reports) == 1:
            return [self.output]
        return [self.output / ratio_folder(r["mask_ratio"]) for r in self.reports]


class Timer:
    """Seconds spent per named phase, summed over repeats."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


# ---- checks ------------------------------------------------------------------------------------------


def check_finite_weights(targets: Mapping[str, nn.Linear]) -> None:
    for name, module in targets.items():
        if not torch.isfinite(module.weight).all():
            raise AntidoteError(
                f"weights of {name} contain NaN or inf; the model is corrupt or overflowed "
                "its dtype: reload it with --dtype float32 or re-export it"
            )


def check_finite_statistics(stats: Statistics) -> None:
    for name, s in stats.sq_sums.items():
        if not torch.isfinite(s).all():
            raise AntidoteError(
                f"calibration statistics of {name} are NaN or inf (activations overflowed); "
                "run with --dtype float32 or shorter --max-length"
            )


_Spec = TypeVar("_Spec")


def _lookup(table: Mapping[str, _Spec], name: str, flag: str) -> _Spec:
    if name not in table:
        raise AntidoteError(f"unknown {flag} {name!r}; choose one of {', '.join(table)}")
    return table[name]


# ---- masks: scores -> selection -> apply / restore -------------------------------------------------


def target_scores(
    targets: Mapping[str, nn.Linear],
    stats: Statistics,
    *,
    score: str = "wanda",
    benign: Statistics | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    first_index: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, scores (out, in) float32 on the weight's device) per target, computed on the fly.

    With `reference`, scores use the fine-tuning change W - W_ref in place of W. `first_index`: the
    position of the first of `targets` among all the model's targets (seeds random scores).
    """
    spec = _lookup(SCORES, score, "--score")
    if spec.needs_benign and benign is None:
        raise AntidoteError(f"--score {score} needs --benign-data FILE (benign prompt+answer pairs)")
    for i, (name, module) in enumerate(targets.items()):
        weight = module.weight.detach()
        if reference is not None:
            weight = weight.float() - reference[name].to(weight.device).float()
        inputs = ScoreInputs(
            weight=weight,
            sq_sum=stats.sq_sums.get(name),
            benign_sq_sum=benign.sq_sums[name] if benign is not None else None,
            seed=tensor_seed(seed, first_index + i),
        )
        yield name, spec.score(inputs)


def iter_masks(
    targets: Mapping[str, nn.Linear],
    stats: Statistics,
    ratio: float,
    *,
    score: str = "wanda",
    granularity: str = "row",
    benign: Statistics | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    first_index: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (module name, bool mask (out, in) on the weight's device), one target at a time, True for
    the top-`ratio` scores. Only one tensor of scores exists at a time. `first_index` as for
    `target_scores` (a subset of the targets, e.g. one decoder block's)."""
    plan = _lookup(GRANULARITIES, granularity, "--granularity").plan

    def scores() -> Iterator[tuple[str, torch.Tensor]]:
        return target_scores(
            targets,
            stats,
            score=score,
            benign=benign,
            reference=reference,
            seed=seed,
            first_index=first_index,
        )

    sizes = [m.weight.numel() for m in targets.values()]
    take = plan(lambda: (s for _, s in scores()), sizes, ratio)
    for i, (name, s) in enumerate(scores()):
        yield name, take(i, s)


def compute_masks(
    targets: Mapping[str, nn.Linear], stats: Statistics, ratio: float, **options: Any
) -> dict[str, torch.Tensor]:
    """Module name -> bool mask (out, in) on the CPU; `options` as for `iter_masks`."""
    return {name: mask.cpu() for name, mask in iter_masks(targets, stats, ratio, **options)}


@torch.no_grad()
def apply_masks(
    targets: Mapping[str, nn.Linear],
    masks: Mapping[str, torch.Tensor],
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    keep_old: bool = False,
) -> dict[str, torch.Tensor]:
    """Set masked weights to zero (or to `reference`), in place. With `keep_old`, returns the old values
    of the masked entries per module (1-D), which `restore_masks` puts back; else an empty dict."""
    saved = {}
    for name, mask in masks.items():
        weight = targets[name].weight
        m = mask.to(weight.device)
        if keep_old:
            saved[name] = weight[m].clone()
        if reference is None:
            weight.masked_fill_(m, 0)
        else:
            weight[m] = reference[name].to(weight.device, weight.dtype)[m]
    return saved


@torch.no_grad()
def restore_masks(
    targets: Mapping[str, nn.Linear], masks: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]
) -> None:
    """Put back the values `apply_masks(..., keep_old=True)` returned."""
    for name, mask in masks.items():
        weight = targets[name].weight
        weight[mask.to(weight.device)] = saved[name]


# ---- data, output, time -------------------------------------------------------------------------------


def load_sequences(
    config: RealignConfig, tokenizer: Any, records: Records | None = None
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids of the harmful data and of the benign data (None unless the score needs it); no data
    at all for a data-free score."""
    if not SCORES[config.score].needs_data:
        return [], None
    examples = load_pairs(  # a task's data set (sst2:train) reads as that task's pairs
        config.data if records is None else records,
        filters=config.filters,
        max_samples=config.max_samples,
        seed=config.seed,
        data_dir=config.data_dir,
    )
    sequences = tokenize_examples(examples, tokenizer, config.template, config.max_length)
    benign_sequences = None
    if SCORES[config.score].needs_benign and config.benign_data:
        benign = load_pairs(
            config.benign_data, max_samples=config.max_samples, seed=config.seed, data_dir=config.data_dir
        )
        benign_sequences = tokenize_examples(benign, tokenizer, config.template, config.max_length)
    return sequences, benign_sequences


def checked_output(config: RealignConfig) -> Path | None:
    """The output folder, refused before any work if it cannot be written; None without --output."""
    if not config.output:
        return None
    inputs = (config.model, config.adapter, config.data, config.reference, config.benign_data)
    return check_output_dir(config.output, config.overwrite, inputs)
