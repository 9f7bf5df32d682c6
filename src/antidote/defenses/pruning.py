"""Shared by the data-free pruning ablations (`random-prune`, `magnitude-prune`): the realignment engine with
a score that needs no calibration data, the same mask sizes as Antidote at the same ratio and granularity."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from antidote.realignment.config import RealignConfig


def option_help(name: str) -> dict[str, str]:
    """The engine's own help text for a field, so the two never drift apart."""
    meta = {f.name: dict(f.metadata) for f in dataclasses.fields(RealignConfig)}[name]
    meta.pop("positional", None)
    return meta


@dataclass
class PruneConfig:
    """Options of a data-free pruning ablation (a subset of `antidote realign`'s)."""

    model: str = field(default="", metadata={**option_help("model"), "positional": True})
    adapter: str | None = field(default=None, metadata=option_help("adapter"))
    output: str | None = field(default=None, metadata=option_help("output"))
    mask_ratios: tuple[float, ...] = field(default=(0.1,), metadata=option_help("mask_ratios"))
    granularity: str = field(default="row", metadata=option_help("granularity"))
    targets: str | None = field(default=None, metadata=option_help("targets"))
    seed: int = field(default=0, metadata=option_help("seed"))
    merge: bool = field(default=False, metadata=option_help("merge"))
    overwrite: bool = field(default=False, metadata=option_help("overwrite"))
    dtype: str = field(default="auto", metadata=option_help("dtype"))
    device: str = field(default="auto", metadata=option_help("device"))

    def __post_init__(self) -> None:
        self.realign_config("random")  # validates every shared option now, before any work

    def realign_config(self, score: str) -> RealignConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return RealignConfig(**values, score=score)


def prune_with_score(config: PruneConfig, score: str) -> dict[str, Path]:
    from antidote.realignment.engine import run_realign

    result = run_realign(config.realign_config(score))
    return {f"{r['mask_ratio']:g}": Path(str(f)) for r, f in zip(result.reports, result.folders, strict=True)}
