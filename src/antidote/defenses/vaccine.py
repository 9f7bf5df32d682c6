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
Its trainer (`VaccineTrainer`) is built by `trainer_class()` on first use; hooks: `training_hooks`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.defenses.base import Defense, register
from antidote.errors import AntidoteError
from antidote.training.hooks import TrainingHooks
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
        metadata={"help": "norm of the hidden-state perturbation, over all layers together (authors: 2)"},
    )

    def __post_init__(self) -> None:
        if not self.rho > 0:
            raise AntidoteError(f"--rho must be positive, got {self.rho}")
        super().__post_init__()


@functools.cache
def trainer_class() -> type:
    """`VaccineTrainer`, built on first use: torch and transformers are imported only when a run starts."""
    import torch
    from torch import nn

    from antidote.defenses.training_hooks import ATTENTION, add_to_outputs, layer_modules, probe_outputs
    from antidote.training.sft import ResponseOnlyTrainer

    class VaccineTrainer(ResponseOnlyTrainer):
        """Each step trains on the forward whose attention outputs are shifted by `sam_perturbation`."""

        def __init__(self, *args: Any, rho: float = 2.0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.rho = rho

        def perturbation(self, model: nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
            """eps_l for this batch, one (B, T, H) tensor per decoder layer; no .grad is touched."""
            with (
                probe_outputs(layer_modules(model, ATTENTION)) as probes,
                self.compute_loss_context_manager(),
            ):
                loss = self.compute_loss(model, inputs)
            grads = torch.autograd.grad(loss, probes)
            return sam_perturbation([g.detach() for g in grads], self.rho)

        def training_step(
            self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> torch.Tensor:
            model.train()
            inputs = self._prepare_inputs(inputs)
            eps = self.perturbation(model, inputs)
            with add_to_outputs(layer_modules(model, ATTENTION), eps):
                return super().training_step(model, inputs, num_items_in_batch)

    return VaccineTrainer


def run(config: VaccineConfig) -> dict[str, Path]:

    def hooks(loaded: Any, cfg: Any) -> TrainingHooks:
        return TrainingHooks(trainer_class=trainer_class(), extra={"rho": config.rho})

    log.info("vaccine: perturbation-aware alignment, rho %g", config.rho)
    return {"": run_align(config, hooks=hooks)}


DEFENSE = register(
    Defense(
        name="vaccine",
        stage="align",
        config=VaccineConfig,
        run=run,
        summary="align on attention outputs perturbed by rho * g / ||g|| (SAM on activations, ~2x cost)",
    )
)
