"""Lisa (Huang et al. 2024, "Lazy safety alignment for large language models against harmful fine-tuning"):
the service provider fine-tunes on the user's data, but alternates between alignment steps (harmful prompt ->
refusal) and user steps, with a proximal term that keeps each phase near where the other one left off.

Schedule, in optimizer steps s = 0, 1, ..., as the authors' `LisaTrainer` runs it (git-disl/Lisa, trainer.py):
    phase(s) = alignment  if s mod (A + F) < A  else  fine-tuning        A = align_steps, F = finetune_steps
The run starts with an alignment phase. The number of optimizer steps is the plain fine-tuning's
(ceil(N / batch) * epochs): on an alignment step the user batch drawn by the Trainer is set aside and a batch
of alignment data (a seeded random order, cycled) is trained on instead, as in their code.

Loss of step s: the response-only cross-entropy of its batch, plus, once s > 0.1 * total steps,
    rho / 2 * sum_p ||w_p - anchor_p||^2          over the trainable (LoRA) parameters p
where anchor is the weights at the end of the other state's last phase, i.e. at the start of the current
phase (their `alignment_weights` / `finetune_weights`, both the initial weights before the first switch).

Defaults: rho 1 (their scripts); A = 5, F = 45: the paper's 100/900 proportion, with phases long enough
for the proximal term to act on runs of tens of steps. With A = 1 the term is identically zero on the
alignment side (the anchor is taken at the phase's only step) and the alignment weights get no pull.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.defenses.base import Defense, register
from antidote.errors import AntidoteError
from antidote.training.data import BUILTIN, encode_triples, read_triples, subset
from antidote.training.hooks import TrainingHooks
from antidote.training.stages import FinetuneConfig, run_finetune

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ALIGNMENT, FINETUNE = "alignment", "finetune"
PROXIMAL_AFTER = 0.1  # the share of the steps without the proximal term (their trainer.py: "initial 10%")


# ---- the math ---------------------------------------------------------------------------------------------


def lisa_phase(step: int, align_steps: int, finetune_steps: int) -> str:
    """The state of optimizer step `step` (0-based): ALIGNMENT for the first `align_steps` of every cycle of
    align_steps + finetune_steps, FINETUNE for the rest."""
    return ALIGNMENT if step % (align_steps + finetune_steps) < align_steps else FINETUNE


def proximal_on(step: int, total_steps: int) -> bool:
    """The proximal term counts on steps after the first 10% (strictly more than 0.1 * total, as theirs)."""
    return step > PROXIMAL_AFTER * total_steps


def proximal_term(
    params: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor], rho: float
) -> torch.Tensor:
    """rho / 2 * sum over p of ||params[p] - anchors[p]||^2 (each pair the same shape), a 0-dim float32."""
    total = sum((params[n].float() - anchors[n].float()).pow(2).sum() for n in params)
    return rho / 2 * total  # type: ignore[return-value]


# ---- the trainer ------------------------------------------------------------------------------------------


@functools.cache
def trainer_class() -> type:
    """`LisaTrainer`, built on first use: transformers is imported here, not when the CLI lists defenses."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from antidote.training.sft import ResponseOnlyTrainer

    class LisaTrainer(ResponseOnlyTrainer):
        """`ResponseOnlyTrainer` whose steps follow `lisa_phase`: alignment steps train on a batch of
        `align_dataset` (features as the train set's) instead of the user batch; once `proximal_on`, the
        loss adds `proximal_term` towards the anchor, the weights at the start of the current phase."""

        def __init__(
            self,
            *args: Any,
            align_dataset: list[dict[str, Any]],
            align_steps: int,
            finetune_steps: int,
            rho: float,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.align_dataset = align_dataset
            self.align_steps = align_steps
            self.finetune_steps = finetune_steps
            self.rho = rho
            self.phase: str | None = None  # the phase of the step being trained
            self.anchor: dict[str, torch.Tensor] = {}  # the weights at the start of that phase
            self.last_proximal = 0.0  # the proximal term of the last batch
            self._align_batches: Iterator[dict[str, torch.Tensor]] | None = None

        def training_step(
            self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> torch.Tensor:
            phase = lisa_phase(self.state.global_step, self.align_steps, self.finetune_steps)
            if phase != self.phase:  # the weights now end the other state's phase: the new anchor
                self.anchor = {n: p.detach().clone() for n, p in _trainable(model).items()}
                self.phase = phase
            if phase == ALIGNMENT:
                inputs = self._next_alignment_batch()
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> Any:
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            self.last_proximal = 0.0
            if self.rho > 0 and self.anchor and proximal_on(self.state.global_step, self.state.max_steps):
                proximal = proximal_term(_trainable(model), self.anchor, self.rho)
                self.last_proximal = float(proximal.detach())
                loss = loss + proximal
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            """Each step's log (TensorBoard etc. with --report-to) also gets its phase and proximal term."""
            if "loss" in logs and self.phase is not None:
                logs = {
                    **logs,
                    "alignment_step": float(self.phase == ALIGNMENT),
                    "proximal": self.last_proximal,
                }
            super().log(logs, start_time)

        def _next_alignment_batch(self) -> dict[str, torch.Tensor]:
            if self._align_batches is None:
                self._align_batches = self._cycle_alignment_data()
            return next(self._align_batches)

        def _cycle_alignment_data(self) -> Iterator[dict[str, torch.Tensor]]:
            """Batches of the alignment data in a seeded random order, reshuffled on every pass, forever."""
            order = torch.Generator().manual_seed(self.args.seed)
            data: Any = self.align_dataset  # a list of dicts is a map-style dataset
            loader: Any = DataLoader(
                data,
                batch_size=self._train_batch_size,
                sampler=RandomSampler(data, generator=order),
                collate_fn=self.data_collator,
            )
            loader = self.accelerator.prepare(loader)  # each process its share, as the train loader
            while True:
                yield from loader

    return LisaTrainer


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class LisaConfig(FinetuneConfig):
    """Lisa's options (plus every option of `antidote finetune`: the user's data and the training)."""

    align_data: str = field(
        default=BUILTIN,
        metadata={
            "help": "harmful prompt -> refusal pairs for the alignment steps, or builtin (the align refusals)"
        },
    )
    max_align: int | None = field(
        default=None, metadata={"help": "at most this many alignment pairs (a seeded random subset)"}
    )
    align_steps: int = field(
        default=5,
        metadata={
            "help": "alignment steps per cycle (the paper: 100 of every 1000); at least 2 for the "
            "proximal term to act in alignment phases"
        },
    )
    finetune_steps: int = field(
        default=45, metadata={"help": "user-data steps per cycle (the paper: 900 of every 1000)"}
    )
    rho: float = field(
        default=1.0,
        metadata={"help": "weight of the proximal term rho/2 ||w - w_other_phase||^2 (0: none)"},
    )

    def __post_init__(self) -> None:
        for name in ("align_steps", "finetune_steps", "max_align"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AntidoteError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.rho >= 0:
            raise AntidoteError(f"--rho must be 0 or more (the paper uses 1), got {self.rho}")
        super().__post_init__()


def alignment_pairs(config: LisaConfig) -> list[tuple[str, str, str]]:
    """The (prompt, input, refusal) triples of the alignment steps; an error when there are none."""
    from antidote.data.builtin import harmful_split

    builtin = [(h.prompt, "", h.refusal) for h in harmful_split("align")]
    triples = subset(read_triples(config.align_data, builtin, config.data_dir), config.max_align, config.seed)
    if not triples:
        raise AntidoteError(
            f"--align-data {config.align_data} holds no pairs; give harmful prompt -> refusal pairs"
        )
    return triples


def run(config: LisaConfig) -> dict[str, Path]:
    triples = alignment_pairs(config)

    def hooks(loaded: Any, cfg: LisaConfig) -> TrainingHooks:
        encoded = encode_triples(loaded.tokenizer, cfg.template, triples, cfg.max_length)
        if not encoded:
            raise AntidoteError(
                "no alignment pairs left after tokenization: every prompt fills --max-length "
                f"{cfg.max_length}; raise --max-length"
            )
        log.info(
            "lisa: %d alignment pairs; %d alignment and %d user steps per cycle, rho %g",
            len(encoded),
            cfg.align_steps,
            cfg.finetune_steps,
            cfg.rho,
        )
        return TrainingHooks(
            trainer_class=trainer_class(),
            extra={
                "align_dataset": encoded,
                "align_steps": cfg.align_steps,
                "finetune_steps": cfg.finetune_steps,
                "rho": cfg.rho,
            },
        )

    return {"": run_finetune(config, hooks=hooks)}


DEFENSE = register(
    Defense(
        name="lisa",
        stage="finetune",
        config=LisaConfig,
        run=run,
        summary="fine-tune in alternating alignment / user-data phases with a proximal term between them",
        preflight=alignment_pairs,
    )
)
