"""Antidote (Huang et al., arXiv 2408.09600): after fine-tuning, zero the weights most important on harmful
data (Wanda score |W| * ||X||, X the layer inputs on harmful prompt+answer pairs). The engine lives in
`antidote.engine`; this module only registers it. One calibration pass serves every mask ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from antidote.config import RealignConfig
from antidote.defenses.base import Defense, register


def run(config: RealignConfig) -> dict[str, Path]:
    from antidote.engine import run_realign

    results = run_realign(config, keep_masks=False)
    return {f"{r.report['mask_ratio']:g}": Path(str(r.output)) for r in results}


def variant_labels(config: Any) -> list[str]:
    return [f"{r:g}" for r in config.mask_ratios]


DEFENSE = register(
    Defense(
        name="antidote",
        stage="post",
        config=RealignConfig,
        run=run,
        summary="prune the fine-tuned weights most important on harmful data (Wanda score), one shot",
    )
)
