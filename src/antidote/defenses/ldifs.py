"""LDIFS (Mukhoti et al. 2023, "Fine-tuning can cripple your foundation model; preserving features may be the
cure"): fine-tune on the user's data with a penalty on how far the model's internal features move from the
aligned model's, on the same batch.

Loss of a batch (ids, attention: (B, T)), as the harmful-fine-tuning comparison code runs it
(git-disl/Antidote trainer.py, `LDIFSTrainer`, which the Antidote paper's LDIFS rows come from):
    CE_response(w) + sum_l [ rho/2 * d_l  if rho/2 * d_l < cap  else 0 ]
    d_l = sum_{b, t real} ||MLP_out_l(w)[b, t] - MLP_out_l(w_aligned)[b, t]||^2
MLP_out_l is the output (B, T, D) of decoder layer l's `mlp` module (every layer by default, or `layers`).
A layer's term at or above `layer_cap` (their 0.1; a guard against fp16 overflow that also switches the
penalty off where it is large) is left out of the loss; `layer_cap` 0 keeps every term. The aligned
features come from the same PeftModel with the adapter switched off, under torch.no_grad (no second model
copy): one extra forward per step. At a fresh LoRA (B = 0) the penalty is 0.

Normalisation: a plain sum of squares over real tokens and feature dimensions, as their
`torch.norm(...)**2` per layer; so it grows with batch size and length. Remaining deviation: padding
positions are left out (theirs counts them; their features there depend on the padding width). The LDIFS
authors' own code (CLIP image encoders) L2-normalises features and averages instead of summing; we follow
the comparison the Antidote paper ran. Defaults: rho 1e-4 and the cap 0.1, their scripts'.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.defenses.base import Defense, register
from antidote.errors import AntidoteError
from antidote.training.hooks import TrainingHooks
from antidote.training.stages import FinetuneConfig, run_finetune

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ALL = "all"
# A decoder layer's MLP `<...>.<index>.mlp`: model.layers.N.mlp (Llama, Qwen, Mistral, Gemma), h.N.mlp (GPT-2)
MLP_NAME = re.compile(r"(?:^|\.)(\d+)\.mlp$")


# ---- the math ---------------------------------------------------------------------------------------------


def feature_distance(
    current: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], attention: torch.Tensor
) -> torch.Tensor:
    """sum over layers l, real positions (b, t) and dimensions d of (current[l] - reference[l])^2.

    current, reference: one (B, T, D) tensor per layer, in the same order; attention: (B, T), 1 on real
    tokens, 0 on padding. Returns a 0-dim float32 tensor (differentiable through `current`).
    """
    keep = attention.float()
    total = sum(
        ((c.float() - r.float()).pow(2).sum(-1) * keep).sum() for c, r in zip(current, reference, strict=True)
    )
    return total  # type: ignore[return-value]


def layer_distances(
    current: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], attention: torch.Tensor
) -> list[torch.Tensor]:
    """d_l per layer: the sum over real positions (b, t) and dimensions of (current[l] - reference[l])^2,
    each a 0-dim float32 tensor (differentiable through `current`). Shapes as `feature_distance`."""
    keep = attention.float()
    return [
        ((c.float() - r.float()).pow(2).sum(-1) * keep).sum() for c, r in zip(current, reference, strict=True)
    ]


def ldifs_penalty(distances: Sequence[torch.Tensor], rho: float, cap: float) -> torch.Tensor:
    """sum over layers of rho/2 * d_l, leaving out each term at or above `cap` (cap 0: none left out)."""
    import torch

    terms = [rho / 2 * d for d in distances]
    kept = [t for t in terms if cap <= 0 or float(t.detach()) < cap]
    return sum(kept, torch.zeros((), device=distances[0].device))


def mlp_modules(model: Any, layers: Sequence[int] | None) -> dict[str, Any]:
    """The decoder layers' MLP modules (name -> module, in model order), only `layers` when given."""
    found = {
        name: (int(m.group(1)), module)
        for name, module in model.named_modules()
        if (m := MLP_NAME.search(name))
    }
    if not found:
        raise AntidoteError("ldifs: the model has no modules named <layer index>.mlp to compare features at")
    if layers is None:
        return {name: module for name, (_, module) in found.items()}
    have = {index for index, _ in found.values()}
    missing = sorted(set(layers) - have)
    if missing:
        raise AntidoteError(
            f"--layers {','.join(map(str, missing))}: the model's MLP layers are 0..{max(have)}; "
            "choose among them"
        )
    return {name: module for name, (index, module) in found.items() if index in layers}


@contextlib.contextmanager
def captured_outputs(modules: dict[str, Any]) -> Iterator[list[torch.Tensor]]:
    """Record each module's forward output (the first element when it returns a tuple), in call order;
    the hooks are removed on exit whatever happens."""
    outputs: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [module.register_forward_hook(hook) for module in modules.values()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# ---- the trainer ------------------------------------------------------------------------------------------


@functools.cache
def trainer_class() -> type:
    """`LDIFSTrainer`, built on first use: transformers is imported here, not when the CLI lists defenses."""
    import torch

    from antidote.training.sft import ResponseOnlyTrainer

    class LDIFSTrainer(ResponseOnlyTrainer):
        """`ResponseOnlyTrainer` whose loss adds `ldifs_penalty` of the distances between the MLP outputs of
        the trained model and of the same model with its adapter off (the aligned model)."""

        def __init__(
            self, *args: Any, rho: float, layers: Sequence[int] | None, layer_cap: float = 0.1, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self.rho = rho
            self.layer_cap = layer_cap
            self.modules = mlp_modules(self.accelerator.unwrap_model(self.model), layers)
            self.last_distance: float | None = None  # the feature distance of the last batch

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> Any:
            ids, attention = inputs["input_ids"], inputs["attention_mask"]
            peft_model: Any = self.accelerator.unwrap_model(model)
            with torch.no_grad(), peft_model.disable_adapter(), captured_outputs(self.modules) as aligned:
                peft_model(input_ids=ids, attention_mask=attention, logits_to_keep=1, use_cache=False)
            with captured_outputs(self.modules) as current:
                loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            distances = layer_distances(current, aligned, attention)
            distance = sum(distances, torch.zeros((), device=distances[0].device))
            if not distance.requires_grad and loss.requires_grad:
                raise AntidoteError(
                    "ldifs: the features carry no gradient (activation checkpointing re-runs the layers); "
                    "train without --gradient-checkpointing"
                )
            self.last_distance = float(distance.detach())
            loss = loss + ldifs_penalty(distances, self.rho, self.layer_cap)
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            """Each step's log (and TensorBoard etc. with --report-to) also gets its feature distance."""
            if "loss" in logs and self.last_distance is not None:
                logs = {**logs, "feature_distance": self.last_distance}
            super().log(logs, start_time)

    return LDIFSTrainer


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class LDIFSConfig(FinetuneConfig):
    """LDIFS's options (plus every option of `antidote finetune`: the user's data and the training)."""

    rho: float = field(
        default=1e-4,
        metadata={
            "help": "the penalty is rho/2 x each layer's ||MLP_out(w) - MLP_out(w_aligned)||^2 (their 1e-4)"
        },
    )
    layer_cap: float = field(
        default=0.1,
        metadata={
            "help": "leave out a layer's term rho/2 * d_l when it is at least this (the comparison code's "
            "0.1); 0 keeps every term"
        },
    )
    layers: str = field(
        default=ALL,
        metadata={"help": "comma list of decoder-layer indices whose MLP outputs are compared, or all"},
    )

    def __post_init__(self) -> None:
        if not self.rho >= 0:
            raise AntidoteError(f"--rho must be 0 or more (authors: 1e-4), got {self.rho}")
        if not self.layer_cap >= 0:
            raise AntidoteError(f"--layer-cap must be 0 (no cap) or more, got {self.layer_cap}")
        self.layer_indices  # noqa: B018 (parses --layers: a bad value is an error now, before any loading)
        super().__post_init__()

    @property
    def layer_indices(self) -> tuple[int, ...] | None:
        """The --layers as indices (None: all)."""
        text = str(self.layers).strip()
        if text == ALL:
            return None
        try:
            indices = tuple(int(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise AntidoteError(f"--layers {text!r}: give layer indices like 0,5,10, or all") from None
        if not indices or min(indices) < 0:
            raise AntidoteError(f"--layers {text!r}: give layer indices 0 or more, like 0,5,10, or all")
        return indices


def run(config: LDIFSConfig) -> dict[str, Path]:
    def hooks(loaded: Any, cfg: LDIFSConfig) -> TrainingHooks:
        mlp_modules(loaded.model, cfg.layer_indices)  # a --layers the model lacks: an error before training
        return TrainingHooks(
            trainer_class=trainer_class(),
            extra={"rho": cfg.rho, "layers": cfg.layer_indices, "layer_cap": cfg.layer_cap},
        )

    return {"": run_finetune(config, hooks=hooks)}


DEFENSE = register(
    Defense(
        name="ldifs",
        stage="finetune",
        config=LDIFSConfig,
        run=run,
        summary="fine-tune with a penalty rho/2 * ||MLP outputs - the aligned model's||^2 per layer on each "
        "batch",
    )
)
