"""Random pruning (ablation): zero a random fraction of the fine-tuned weights, the same number as Antidote
would at the same mask ratio. It needs no data: if it helps as much as Antidote, the harmful-data scores are
not what does the work.

The places are drawn over the whole tensor by default (`granularity: layer`), as the Antidote authors'
random-prune ablation (git-disl/Antidote train.py, `--random_prune True`: `torch.randperm` over each
trainable tensor); `row` draws the same count in every row. Their count is int(n * ratio), ours the
engine's n - int(n * (1 - ratio)): at most one entry more per tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from antidote.defenses.base import Defense, register
from antidote.defenses.pruning import PruneConfig, option_help, prune_with_score


@dataclass
class RandomPruneConfig(PruneConfig):
    """Options of random pruning: the ablation's, places drawn over the whole tensor by default."""

    granularity: str = field(default="layer", metadata=option_help("granularity"))


def run(config: PruneConfig) -> dict[str, Path]:
    return prune_with_score(config, "random")


DEFENSE = register(
    Defense(
        name="random-prune",
        stage="post",
        config=RandomPruneConfig,
        run=run,
        summary="zero a random alpha fraction of the fine-tuned weights (ablation; no data)",
    )
)
