"""Magnitude pruning (the paper's ablation): zero the fine-tuned weights of largest |W|, the same number as
Antidote would at the same mask ratio and granularity. It needs no data: the gap to Antidote is what the
harmful-data activations add."""

from __future__ import annotations

from pathlib import Path

from antidote.defenses.base import Defense, register
from antidote.defenses.pruning import PruneConfig, prune_with_score


def run(config: PruneConfig) -> dict[str, Path]:
    return prune_with_score(config, "magnitude")


DEFENSE = register(
    Defense(
        name="magnitude-prune",
        stage="post",
        config=PruneConfig,
        run=run,
        summary="zero the alpha fraction of fine-tuned weights with the largest |W| (ablation; no data)",
    )
)
