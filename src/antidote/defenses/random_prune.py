"""Random pruning (the paper's ablation): zero a random fraction of the fine-tuned weights, the same number as
Antidote would at the same mask ratio and granularity. It needs no data: if it helps as much as Antidote, the
harmful-data scores are not what does the work."""

from __future__ import annotations

from pathlib import Path

from antidote.defenses.base import Defense, register
from antidote.defenses.pruning import PruneConfig, prune_with_score


def run(config: PruneConfig) -> dict[str, Path]:
    return prune_with_score(config, "random")


DEFENSE = register(
    Defense(
        name="random-prune",
        stage="post",
        config=PruneConfig,
        run=run,
        summary="zero a random alpha fraction of the fine-tuned weights (ablation; no data)",
    )
)
