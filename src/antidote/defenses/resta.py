"""RESTA (Bhardwaj, Anh and Poria 2024, "Language models are Homer Simpson! Safety re-alignment of
fine-tuned language models through task arithmetic"): add the safety vector back to the fine-tuned model.

For every weight of the model (1-D ones too, as task arithmetic does), with V = W_aligned - W_base the
safety vector and dW the fine-tuning update (the adapter's B A * scale; zero outside the LoRA layers):
    W_out = W_aligned + DARE(dW) + gamma * V          (dare_on: finetune, the paper's use of DARE)
    W_out = W_aligned + dW + gamma * DARE(V)          (dare_on: safety)
With `drop_rate` 0 (DARE off) both are W_out = W_ft + gamma * V.

DARE (Yu et al. 2024, "drop and rescale"): every entry is dropped with probability p and the kept ones
are scaled by 1 / (1 - p), so the expected delta is unchanged; each tensor draws its own seeded mask.
Data-free. Writes a full model (the adapter is merged) and `resta_report.json`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from antidote.defenses.base import Defense, register
from antidote.defenses.weight_edit import (
    WeightEditConfig,
    check_output,
    config_record,
    dense_parameters,
    fold_adapter,
    load_finetuned,
    read_base_weights,
    save_full_model,
    write_report,
)
from antidote.errors import AntidoteError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

REPORT_FILE = "resta_report.json"
DARE_ON = ("finetune", "safety")


# ---- the math ---------------------------------------------------------------------------------------------


def dare_keep(shape: Sequence[int], drop_rate: float, seed: int, device: Any = "cpu") -> torch.Tensor:
    """DARE's keep mask: bool of `shape`, each entry False with probability `drop_rate`, drawn on the CPU
    from `seed` (the same mask on any device)."""
    from antidote.realignment.scores import random_score

    return random_score(shape, seed, device) >= drop_rate


def dare(delta: torch.Tensor, drop_rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each entry of `delta` with probability `drop_rate` and scale the kept ones by 1 / (1 - p).

    delta: any shape, float. Returns (the sparsified delta, of delta's shape on its device; the bool keep
    mask). With drop_rate 0 every entry is kept and the delta is returned as it is.
    """
    keep = dare_keep(delta.shape, drop_rate, seed, delta.device)
    if drop_rate == 0:
        return delta, keep
    return delta * keep / (1.0 - drop_rate), keep


def safety_vector(aligned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """V = W_aligned - W_base in float32. aligned, base: the same shape."""
    return aligned.float() - base.to(aligned.device).float()


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class RestaConfig(WeightEditConfig):
    """RESTA's options (plus the inputs every weight-editing defense reads)."""

    METHOD: ClassVar[str] = "resta"

    gamma: float = field(
        default=1.0, metadata={"help": "scale of the safety vector W_aligned - W_base added to the model"}
    )
    drop_rate: float = field(
        default=0.0, metadata={"help": "DARE drop probability p in [0, 1); 0 turns DARE off"}
    )
    dare_on: str = field(
        default="finetune",
        metadata={
            "help": "what DARE sparsifies: finetune (the fine-tuning delta, as RESTA does) or safety "
            "(the safety vector)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the DARE drop masks"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isfinite(self.gamma):
            raise AntidoteError(f"--gamma must be a finite number, got {self.gamma}; RESTA's default is 1")
        if not 0.0 <= self.drop_rate < 1.0:
            raise AntidoteError(f"--drop-rate is a probability in [0, 1), got {self.drop_rate}; 0 is no DARE")
        if self.dare_on not in DARE_ON:
            raise AntidoteError(f"unknown --dare-on {self.dare_on!r}; choose one of {', '.join(DARE_ON)}")


def run(config: RestaConfig) -> dict[str, Path]:
    import torch

    from antidote.outputs import atomic_output_dir

    out = check_output(config)
    loaded = load_finetuned(config)
    dense = dense_parameters(loaded)
    base = read_base_weights(config, {name: p.shape for name, p in dense.items()})
    index = {name: i for i, name in enumerate(dense)}
    p = config.drop_rate
    kept = {"entries": 0, "kept": 0}

    def seed_of(name: str) -> int:
        from antidote.realignment.scores import tensor_seed

        return tensor_seed(config.seed, index[name])

    def sparsify(name: str, delta: torch.Tensor) -> torch.Tensor:
        if p == 0:
            return delta
        sparse, keep = dare(delta, p, seed_of(name))
        kept["entries"] += keep.numel()
        kept["kept"] += int(keep.sum())
        return sparse

    def safety(name: str) -> torch.Tensor:
        v = safety_vector(dense[name], base.pop(name))
        if config.dare_on == "safety":
            v = sparsify(name, v)
        return config.gamma * v

    def finetune(name: str, delta: torch.Tensor) -> torch.Tensor:
        if config.dare_on == "finetune":
            delta = sparsify(name, delta)
        return delta + safety(name)

    with torch.no_grad():
        model = fold_adapter(loaded, finetune)  # the LoRA layers: W_aligned + DARE?(dW) + gamma V
        for name in list(base):  # every other weight: W_aligned + gamma V
            weight = dense[name]
            weight.copy_((weight.float() + safety(name)).to(weight.dtype))
    report = {
        "method": "resta",
        "dare": {"drop_rate": p, "on": config.dare_on, **kept} if p else None,
        "tensors": len(dense),
        "config": config_record(config),
    }
    log.info("resta: added %g x the safety vector to %d tensors", config.gamma, len(dense))
    with atomic_output_dir(out, config.overwrite) as tmp:
        save_full_model(tmp, model, loaded, config)
        write_report(tmp, REPORT_FILE, report)
    return {"": out}


DEFENSE = register(
    Defense(
        name="resta",
        stage="post",
        config=RestaConfig,
        run=run,
        summary="add gamma x the safety vector W_aligned - W_base to the merged fine-tuned model, optional "
        "DARE (data-free)",
        needs_base=True,
    )
)
