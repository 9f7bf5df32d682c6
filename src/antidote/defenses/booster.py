"""Booster (Huang et al. 2024, "Booster: tackling harmful fine-tuning for large language models via
attenuating harmful perturbation"): align while making one simulated harmful fine-tuning step useless.

Each alignment step, as in the authors' `BoosterAlignmentTrainer` (git-disl/Booster, trainer.py, without its
optional `perturb_aware` SAM part), with f the alignment loss on the batch and h the loss of the model on a
batch of harmful prompt -> harmful answer pairs:
    grad = grad f(w) + lam * (grad h(w) - grad h(w - a * grad h(w) / ||grad h(w)||))
||.|| is the L2 norm over all trained (LoRA) parameters together; lam = 5, a = 0.1 (the authors' code).
The harmful batch is drawn from `harmful_data` (default: the built-in align split's compliant answers),
`batch_size` pairs at a time in a seeded order. Cost: two extra forward+backward passes per step (~3x
alignment).
Its trainer (`BoosterTrainer`) is built by `trainer_class()` on first use; hooks: `training_hooks`.
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
from antidote.training.data import BUILTIN
from antidote.training.hooks import TrainingHooks
from antidote.training.stages import AlignConfig, run_align

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# ---- the math ---------------------------------------------------------------------------------------------


def harmful_shift(grads: Sequence[torch.Tensor], step_size: float) -> list[torch.Tensor]:
    """The simulated harmful step: -a * g_i / ||g|| per parameter, ||g|| over all of them (+1e-7, as the
    authors). grads: the harmful-loss gradients, one tensor per trained parameter (its shape)."""
    import torch

    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))  # type: ignore[arg-type]
    return [(-step_size * g.float() / (norm + 1e-7)).to(g.dtype) for g in grads]


def booster_gradient(
    align: torch.Tensor, harmful: torch.Tensor, harmful_after: torch.Tensor, lam: float
) -> torch.Tensor:
    """grad f + lam * (grad h(w) - grad h(w after the harmful step)), for one parameter (any shape)."""
    return align + lam * (harmful - harmful_after)


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class BoosterConfig(AlignConfig):
    """Booster's options (plus every option of `antidote align`)."""

    harmful_data: str = field(
        default=BUILTIN,
        metadata={
            "help": "harmful prompt -> harmful answer pairs file, or builtin (the align split's answers)"
        },
    )
    lam: float = field(
        default=5.0,
        metadata={"help": "lambda, weight of the harmful-perturbation attenuation (authors: 5)"},
    )
    step_size: float = field(
        default=0.1,
        metadata={"help": "a, norm of the simulated harmful step on the LoRA weights (authors: 0.1)"},
    )

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise AntidoteError(f"--lam must be at least 0, got {self.lam}")
        if not self.step_size > 0:
            raise AntidoteError(f"--step-size must be positive, got {self.step_size}")
        super().__post_init__()


@functools.cache
def trainer_class() -> type:
    """`BoosterTrainer`, built on first use: torch and transformers are imported only when a run starts."""
    import torch
    from torch import nn

    from antidote.defenses.training_hooks import HarmfulBatches
    from antidote.training.sft import ResponseOnlyTrainer

    class BoosterTrainer(ResponseOnlyTrainer):
        """Each step's gradient is `booster_gradient`: the alignment gradient (accumulated into .grad as
        usual) plus lam * (grad h(w) - grad h(w - a g/||g||)) on a harmful batch, computed with
        `torch.autograd.grad` (the weights are shifted in place and restored bit for bit)."""

        def __init__(
            self,
            *args: Any,
            harmful: list[dict[str, Any]],
            lam: float = 5.0,
            step_size: float = 0.1,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.harmful = HarmfulBatches(
                harmful, self.data_collator, self.args.train_batch_size, self.args.seed
            )
            self.lam = lam
            self.step_size = step_size

        def _gradients(
            self, model: nn.Module, batch: dict[str, Any], params: list[nn.Parameter]
        ) -> list[torch.Tensor]:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, batch)
            return [g.detach() for g in torch.autograd.grad(loss, params, allow_unused=False)]

        def harmful_terms(self, model: nn.Module, batch: dict[str, Any]) -> list[torch.Tensor]:
            """grad h(w) - grad h(w - a g/||g||), one tensor per trained parameter."""

            params = [p for p in model.parameters() if p.requires_grad]
            before = self._gradients(model, batch, params)
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, shift in zip(params, harmful_shift(before, self.step_size), strict=True):
                    p.add_(shift)
            try:
                after = self._gradients(model, batch, params)
            finally:
                with torch.no_grad():
                    for p, value in zip(params, saved, strict=True):
                        p.copy_(value)
            return [b - a for b, a in zip(before, after, strict=True)]

        def training_step(
            self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> torch.Tensor:
            model.train()
            terms = self.harmful_terms(model, self._prepare_inputs(self.harmful.next()))
            loss = super().training_step(model, inputs, num_items_in_batch)  # .grad += grad f / accumulation
            scale = self.lam / self.current_gradient_accumulation_steps
            with torch.no_grad():
                params = [p for p in model.parameters() if p.requires_grad]
                for p, term in zip(params, terms, strict=True):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(term.to(p.grad.dtype), alpha=scale)
            return loss

    return BoosterTrainer


def _harmful(config: BoosterConfig) -> list[tuple[str, str, str]]:
    from antidote.defenses.training_hooks import harmful_pairs

    triples = harmful_pairs(config.harmful_data, config.data_dir)
    if not triples:
        raise AntidoteError(
            f"--harmful-data {config.harmful_data} holds no pairs; give harmful prompt -> answer pairs"
        )
    return triples


def preflight(config: BoosterConfig) -> None:
    _harmful(config)


def run(config: BoosterConfig) -> dict[str, Path]:
    from antidote.defenses.training_hooks import encode_harmful

    triples = _harmful(config)

    def hooks(loaded: Any, cfg: Any) -> TrainingHooks:
        features = encode_harmful(loaded, cfg, triples)
        extra = {"harmful": features, "lam": config.lam, "step_size": config.step_size}
        return TrainingHooks(trainer_class=trainer_class(), extra=extra)

    log.info("booster: lam %g, step %g, %d harmful pairs", config.lam, config.step_size, len(triples))
    return {"": run_align(config, hooks=hooks)}


DEFENSE = register(
    Defense(
        name="booster",
        stage="align",
        config=BoosterConfig,
        run=run,
        summary="align while attenuating the loss drop of a simulated harmful step (~3x alignment)",
        preflight=preflight,
    )
)
