"""Antidote (Huang et al., arXiv 2408.09600): after fine-tuning, zero the weights most important on harmful
data (Wanda score |W| * ||X||, X the layer inputs on harmful prompt+answer pairs). The engine lives in
`antidote.realignment`; this module only registers it. One calibration pass serves every mask ratio."""

from __future__ import annotations

from pathlib import Path

from antidote.defenses.base import Defense, register
from antidote.realignment.config import RealignConfig


def run(config: RealignConfig) -> dict[str, Path]:
    from antidote.realignment.engine import run_realign

    result = run_realign(config)
    return {f"{r['mask_ratio']:g}": Path(str(f)) for r, f in zip(result.reports, result.folders, strict=True)}


DEFENSE = register(
    Defense(
        name="antidote",
        stage="post",
        config=RealignConfig,
        run=run,
        summary="prune the fine-tuned weights most important on harmful data (Wanda score), one shot",
    )
)
