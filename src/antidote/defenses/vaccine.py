"""Vaccine (Huang et al. 2024, "Vaccine: perturbation-aware alignment for large language models against
harmful fine-tuning"): align so that the refusals survive a worst-case shift of the hidden states.

Each alignment step, as in the authors' `VaccineTrainer` (git-disl/Vaccine, trainer.py):
1. forward the batch with a zero probe added to the output of every decoder layer's attention module
   (`layers.<l>.self_attn`, the authors' LlamaAttention outputs) and take g_l = dL/d(attention output l),
   (B, T, H) each;
2. eps_l = rho * g_l / ||g||, with ||g|| the norm over ALL layers together (the authors' global norm);
3. forward again with eps_l added to those outputs, and backward that loss: the update is the gradient of
   the loss at the perturbed forward (eps held constant).
Cost: one extra forward and backward per step (~2x alignment). The plain alignment stage otherwise.
The trainer (`VaccineTrainer`) lives in `training_hooks`, which imports torch only when a run starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.defenses.base import Defense, register
from antidote.errors import AntidoteError
from antidote.training.stages import AlignConfig, run_align

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# ---- the math ---------------------------------------------------------------------------------------------


def sam_perturbation(grads: Sequence[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """eps_l = rho * g_l / ||g|| with ||g|| the L2 norm of all the g_l together (any shapes, e.g. (B, T, H)).

    A zero gradient gives zero perturbations (the authors add 1e-7 to the norm; so do we)."""
    import torch

    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))  # type: ignore[arg-type]
    return [(rho * g.float() / (norm + 1e-7)).to(g.dtype) for g in grads]


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class VaccineConfig(AlignConfig):
    """Vaccine's option (plus every option of `antidote align`)."""

    rho: float = field(
        default=2.0,
        metadata={"help": "norm of the hidden-state perturbation, over all layers together (SPEC 4: 2)"},
    )

    def __post_init__(self) -> None:
        if not self.rho > 0:
            raise AntidoteError(f"--rho must be positive, got {self.rho}")
        super().__post_init__()


def run(config: VaccineConfig) -> dict[str, Path]:
    from antidote.defenses.training_hooks import VaccineTrainer

    def seam(loaded: Any, cfg: Any) -> dict[str, Any]:
        return {"trainer_class": VaccineTrainer, "extra": {"rho": config.rho}}

    log.info("vaccine: perturbation-aware alignment, rho %g", config.rho)
    return {"": run_align(config, seam=seam)}


DEFENSE = register(
    Defense(
        name="vaccine",
        stage="align",
        config=VaccineConfig,
        run=run,
        summary="align on attention outputs perturbed by rho * g / ||g|| (SAM on activations, ~2x cost)",
    )
)
