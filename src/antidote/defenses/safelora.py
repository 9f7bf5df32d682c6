"""SafeLoRA (Hsu et al. 2024, "Safe LoRA: the silver lining of reducing safety risks when fine-tuning
LLMs"): project the fine-tuning LoRA update of the layers that stray from the alignment direction.

Per LoRA layer, with V = W_aligned - W_base the alignment delta of the layer's weight (out, in):
    C = V V^T / ||V||_F                      (out, out), as the paper and the authors' code define it
    dW = B A * scale                          the layer's fine-tuning update (out, in)
    cos = <vec(C dW), vec(dW)> / (||C dW||_F ||dW||_F)
Which layers are projected (`select`): `number` (the default, as the authors' SafeLoRAConfig:
select_layers_type "number", num_proj_layers 10), the `top_k` layers of lowest cos (all of them when there
are fewer); or `threshold`, those with cos <= `threshold` (the paper's 0.5). Projecting sets B <- C B, so
that dW <- C dW. Other layers keep their adapter as it was.
Data-free. Writes a PEFT adapter on MODEL and `safelora_report.json` (every layer's cos, which moved).

A layer whose alignment delta V is zero (alignment did not touch that weight) has no alignment subspace:
it is left as it is and reported with cos null, as is a layer whose update dW is zero.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from antidote.defenses.base import Defense, register
from antidote.defenses.weight_edit import (
    WeightEditConfig,
    check_output,
    config_record,
    copy_prompt_file,
    dense_parameters,
    load_finetuned,
    lora_layers,
    read_base_weights,
    write_report,
)
from antidote.errors import AntidoteError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SELECT = ("number", "threshold")

REPORT_FILE = "safelora_report.json"


# ---- the math ---------------------------------------------------------------------------------------------


def alignment_projector(v: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F. v: (out, in), the alignment delta. Returns (out, out) float32."""
    v = v.float()
    return (v @ v.T) / v.norm()


def projected_cosine(c: torch.Tensor, delta: torch.Tensor) -> float:
    """Cosine similarity of vec(C @ delta) and vec(delta). c: (out, out); delta: (out, in)."""
    import torch

    a = (c.float() @ delta.float()).reshape(-1)
    b = delta.float().reshape(-1)
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def layers_to_project(cosines: Mapping[str, float], threshold: float, top_k: int | None) -> list[str]:
    """The names to project: cos <= threshold, or (with top_k) the k of lowest cos, ties by name order
    as given. NaN cosines (no alignment delta, or no update) are never chosen."""
    finite = {name: c for name, c in cosines.items() if not math.isnan(c)}
    if top_k is not None:
        lowest = set(sorted(finite, key=lambda name: finite[name])[:top_k])  # stable: ties keep order
        return [name for name in finite if name in lowest]
    return [name for name, c in finite.items() if c <= threshold]


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class SafeLoRAConfig(WeightEditConfig):
    """SafeLoRA's options (plus the inputs every weight-editing defense reads)."""

    METHOD: ClassVar[str] = "safelora"

    select: str = field(
        default="number",
        metadata={
            "help": "which layers to project: number (the --top-k of lowest cos(C dW, dW), the authors' "
            "default) or threshold (cos at most --threshold)"
        },
    )
    threshold: float = field(
        default=0.5,
        metadata={"help": "with --select threshold: project the layers whose cos(C dW, dW) is at most this"},
    )
    top_k: int = field(
        default=10,
        metadata={"help": "with --select number: project the k LoRA layers of lowest cos (the authors' 10)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.threshold <= 1.0 or math.isnan(self.threshold):
            raise AntidoteError(
                f"--threshold is a cosine in [-1, 1], got {self.threshold}; the paper uses 0.5"
            )
        if self.select not in SELECT:
            raise AntidoteError(f"unknown --select {self.select!r}; choose one of {', '.join(SELECT)}")
        if self.top_k < 1:
            raise AntidoteError(f"--top-k must be at least 1 (layers to project), got {self.top_k}")


def run(config: SafeLoRAConfig) -> dict[str, Path]:
    import torch

    from antidote.outputs import atomic_output_dir

    out = check_output(config)
    loaded = load_finetuned(config)
    layers = lora_layers(loaded)
    dense = dense_parameters(loaded)
    names = {module: f"{module}.weight" for module in layers}
    base = read_base_weights(config, {n: p.shape for n, p in dense.items()}, names.values())
    adapter = loaded.adapter_name

    projectors, cosines = {}, {}
    with torch.no_grad():
        for module, layer in layers.items():
            weight = dense[names[module]]
            v = weight.float() - base.pop(names[module]).to(weight.device).float()
            delta = layer.get_delta_weight(adapter).float()
            if v.norm() == 0 or delta.norm() == 0:
                cosines[module] = math.nan
                continue
            projectors[module] = alignment_projector(v)
            cosines[module] = projected_cosine(projectors[module], delta)
        chosen = layers_to_project(
            cosines, config.threshold, config.top_k if config.select == "number" else None
        )
        if config.select == "number" and len(chosen) < config.top_k:
            log.warning(
                "safelora: --top-k %d, but %d layers have an alignment delta and an update: all projected",
                config.top_k,
                len(chosen),
            )
        for module in chosen:
            b = layers[module].lora_B[adapter].weight
            b.copy_((projectors[module].to(b.device) @ b.float()).to(b.dtype))
    skipped = sorted(m for m, c in cosines.items() if math.isnan(c))
    if skipped:
        log.warning(
            "safelora: %d layers have no alignment delta or no update and stay as they are", len(skipped)
        )
    log.info("safelora: projected %d of %d LoRA layers", len(chosen), len(layers))
    report = {
        "method": "safelora",
        "projected": len(chosen),
        "layers": {
            m: {"cos": None if math.isnan(c) else round(c, 6), "projected": m in chosen}
            for m, c in cosines.items()
        },
        "config": config_record(config),
    }
    with atomic_output_dir(out, config.overwrite) as tmp:
        loaded.model.save_pretrained(tmp)  # type: ignore[operator]
        copy_prompt_file(config, tmp)
        write_report(tmp, REPORT_FILE, report)
    return {"": out}


DEFENSE = register(
    Defense(
        name="safelora",
        stage="post",
        config=SafeLoRAConfig,
        run=run,
        summary="project the LoRA update of layers far from the alignment delta (B <- C B; data-free)",
        needs_base=True,
    )
)
