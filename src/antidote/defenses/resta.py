"""RESTA (Bhardwaj, Anh and Poria 2024, "Language models are Homer Simpson! Safety re-alignment of
fine-tuned language models through task arithmetic"): add the safety vector back to the fine-tuned model.

The safety vector is V = W_aligned - W_unaligned, where the unaligned model is the aligned model fine-tuned
on harmful data (the paper's theta_unaligned; its merge script's "model 3 is the unaligned (harmful)
model"). With dW the fine-tuning update (the adapter's B A * scale; zero outside the LoRA layers):
    W_out = W_aligned + DARE(dW) + gamma * V          (dare_on: finetune, the paper's use of DARE)
    W_out = W_aligned + dW + gamma * DARE(V)          (dare_on: safety)
With `drop_rate` 0 (DARE off) both are W_out = W_ft + gamma * V. When the unaligned model is a LoRA adapter
on the aligned model (as `antidote run` builds it), V = -(its B A * scale) on its LoRA layers and 0
elsewhere; a full unaligned model gives V on every weight.

`antidote run` builds the unaligned model as a cached stage of its own (`resta-unaligned`): the attack's
fine-tuning settings with harmful samples only (`unaligned_samples` of them, default the attack's number of
harmful samples). Standalone, pass it with --unaligned (e.g. `antidote finetune ALIGNED --harmful-ratio 1`).

DARE (Yu et al. 2024, "drop and rescale"): every entry is dropped with probability p and the kept ones
are scaled by 1 / (1 - p), so the expected delta is unchanged; each tensor draws its own seeded mask.
Writes a full model (the adapter is merged) and `resta_report.json`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
    save_full_model,
    write_report,
)
from antidote.errors import AntidoteError
from antidote.training.stages import FinetuneConfig

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


def safety_vector(aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor:
    """V = W_aligned - W_unaligned in float32. aligned, unaligned: the same shape."""
    return aligned.float() - unaligned.to(aligned.device).float()


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class RestaConfig(WeightEditConfig):
    """RESTA's options (plus the inputs every weight-editing defense reads)."""

    METHOD: ClassVar[str] = "resta"
    NEEDS_BASE: ClassVar[bool] = False

    unaligned: str | None = field(
        default=None,
        metadata={
            "help": "the unaligned model: MODEL fine-tuned on harmful data (a LoRA adapter folder on MODEL, "
            "or a full model); the safety vector is MODEL minus it. `antidote run` builds it"
        },
    )
    unaligned_samples: int | None = field(
        default=None,
        metadata={
            "help": "harmful samples `antidote run` fine-tunes MODEL on to build the unaligned model "
            "(default: as many as the attack's harmful samples)"
        },
    )
    gamma: float = field(
        default=1.0,
        metadata={"help": "scale of the safety vector W_aligned - W_unaligned added to the model"},
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
        if self.unaligned_samples is not None and self.unaligned_samples < 1:
            raise AntidoteError(f"--unaligned-samples must be at least 1, got {self.unaligned_samples}")


def unaligned_finetune(config: RestaConfig, attack: FinetuneConfig) -> tuple[str, FinetuneConfig]:
    """The fine-tuning that makes the unaligned model in a run: the attack's settings on harmful samples
    only. Returns ("unaligned", its FinetuneConfig); the pipeline trains it as a cached stage."""
    n = config.unaligned_samples or round(attack.harmful_ratio * attack.num_samples)
    if n < 1:
        raise AntidoteError(
            "resta: the attack has no harmful samples to build the unaligned model from; set "
            "unaligned_samples in its section"
        )
    return "unaligned", replace(attack, harmful_ratio=1.0, num_samples=n, output="")


def read_safety_vector(config: RestaConfig, dense: dict[str, Any]) -> dict[str, torch.Tensor]:
    """V = W_aligned - W_unaligned (CPU float32) by plain weight name, for the weights where it can be
    non-zero: the unaligned adapter's LoRA layers, or every weight of a full unaligned model."""
    from antidote.defenses.weight_edit import lora_layers
    from antidote.models import load_model

    assert config.unaligned is not None
    spec = config.unaligned
    if (Path(spec) / "adapter_config.json").is_file():
        loaded = load_model(
            config.model, adapter=spec, dtype=config.dtype, device="cpu", with_tokenizer=False
        )
        name = loaded.adapter_name
        out = {}
        for module_name, layer in lora_layers(loaded).items():
            if f"{module_name}.weight" not in dense:
                raise AntidoteError(f"--unaligned {spec} adapts {module_name}, which MODEL lacks")
            out[f"{module_name}.weight"] = -layer.get_delta_weight(name).detach().float().cpu()
        return out
    loaded = load_model(spec, dtype=config.dtype, device="cpu", with_tokenizer=False)
    params = dict(loaded.model.named_parameters())
    if set(params) != set(dense) or any(params[n].shape != p.shape for n, p in dense.items()):
        raise AntidoteError(
            f"--unaligned {spec} does not have the aligned model's weights and shapes; pass MODEL "
            "fine-tuned on harmful data (a full model or a LoRA adapter folder on MODEL)"
        )
    return {n: safety_vector(p.detach().cpu(), params[n].detach()) for n, p in dense.items()}


def run(config: RestaConfig) -> dict[str, Path]:
    import torch

    from antidote.outputs import atomic_output_dir

    if not config.unaligned:
        raise AntidoteError(
            "resta needs --unaligned MODEL_OR_ADAPTER: the aligned model fine-tuned on harmful data (make "
            "one with `antidote finetune MODEL --harmful-ratio 1 --output DIR`)"
        )
    out = check_output(config)
    loaded = load_finetuned(config)
    dense = dense_parameters(loaded)
    vectors = read_safety_vector(config, dense)
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
        v = vectors.pop(name).to(dense[name].device)
        if config.dare_on == "safety":
            v = sparsify(name, v)
        return config.gamma * v

    def finetune(name: str, delta: torch.Tensor) -> torch.Tensor:
        if config.dare_on == "finetune":
            delta = sparsify(name, delta)
        return delta + safety(name) if name in vectors else delta

    tensors = len(vectors)
    with torch.no_grad():
        model = fold_adapter(loaded, finetune)  # the LoRA layers: W_aligned + DARE?(dW) + gamma V
        for name in list(vectors):  # every other weight with a safety vector: W_aligned + gamma V
            weight = dense[name]
            weight.copy_((weight.float() + safety(name)).to(weight.dtype))
    report = {
        "method": "resta",
        "dare": {"drop_rate": p, "on": config.dare_on, **kept} if p else None,
        "tensors": tensors,
        "config": config_record(config),
    }
    log.info("resta: added %g x the safety vector to %d tensors", config.gamma, tensors)
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
        summary="add gamma x the safety vector W_aligned - W_unaligned (the aligned model fine-tuned on "
        "harmful data) to the merged fine-tuned model, optional DARE",
        extra_finetune=unaligned_finetune,
    )
)
