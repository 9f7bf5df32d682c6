"""LoX (Perin et al. 2025, "LoX: low-rank extrapolation robustifies LLM safety against fine-tuning"):
extrapolate the top-k subspace of the alignment delta.

For every 2-D weight (1-D weights are left alone, as in the authors' script), with the alignment delta
V = W_aligned - W_base and its SVD V = U S V'^T (singular values in decreasing order):
    Proj_k(V) = U_k U_k^T V = U_k S_k V'_k^T         (the rank-k truncation; k = 0 means V itself)
    W_out = W_ft + alpha * Proj_k(V)                  with W_ft = W_aligned + dW, the fine-tuned weight
The paper applies W_aligned + alpha * Proj_k(V) to the aligned model before fine-tuning; the update does
not depend on W, so as a post-fine-tuning defense it is the same addition made after the attack. Only the
top-k left and right singular subspaces of V change: (I - U_k U_k^T) (W_out - W_ft) = 0 and
(W_out - W_ft) (I - V'_k V'_k^T) = 0. Weights whose V is zero are untouched.
Data-free. Writes a full model (the adapter is merged) and `lox_report.json`.

Defaults: alpha 1 (the authors' script's default coefficient); k 6, a few top ranks (their script's
default k = 0 extrapolates the full delta). Choose both on validation data for your model.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

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

REPORT_FILE = "lox_report.json"


# ---- the math ---------------------------------------------------------------------------------------------


def low_rank_part(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Proj_k(delta) = U_k U_k^T delta, the best rank-k approximation of delta (out, in), in float32 on
    delta's device. rank 0, or a rank at least min(out, in), returns delta itself (in float32)."""
    import torch

    d = delta.float()
    if rank == 0 or rank >= min(d.shape):
        return d
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def lox_update(aligned: torch.Tensor, base: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """alpha * Proj_k(W_aligned - W_base). aligned, base: (out, in). Returns (out, in) float32."""
    return alpha * low_rank_part(aligned.float() - base.to(aligned.device).float(), rank)


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class LoXConfig(WeightEditConfig):
    """LoX's options (plus the inputs every weight-editing defense reads)."""

    METHOD: ClassVar[str] = "lox"

    rank: int = field(
        default=6, metadata={"help": "k, the top ranks of the alignment delta to extrapolate; 0 = all"}
    )
    alpha: float = field(default=1.0, metadata={"help": "extrapolation coefficient (the authors' default 1)"})
    targets: str | None = field(
        default=None,
        metadata={"help": "regex over weight names to extrapolate (default: every 2-D weight)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 0:
            raise AntidoteError(
                f"--rank must be 0 (full delta) or a positive number of ranks, got {self.rank}"
            )
        if not math.isfinite(self.alpha):
            raise AntidoteError(f"--alpha must be a finite number, got {self.alpha}")
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as err:
                raise AntidoteError(
                    f"--targets {self.targets!r} is not a valid regular expression ({err})"
                ) from err


def run(config: LoXConfig) -> dict[str, Path]:
    import torch

    from antidote.outputs import atomic_output_dir

    out = check_output(config)
    loaded = load_finetuned(config)
    dense = dense_parameters(loaded)
    pattern = re.compile(config.targets) if config.targets else None
    chosen = {n: p.shape for n, p in dense.items() if p.dim() == 2 and (pattern is None or pattern.search(n))}
    if not chosen:
        raise AntidoteError(
            f"--targets {config.targets!r} matches no 2-D weight; names look like: {next(iter(dense))}"
        )
    base = read_base_weights(config, {n: p.shape for n, p in dense.items()}, chosen)
    changed: list[str] = []

    def update(name: str) -> torch.Tensor | None:
        weight = dense[name]
        v_base = base.pop(name)
        if torch.equal(weight.detach(), v_base.to(weight.device, weight.dtype)):
            return None  # alignment did not touch this weight
        changed.append(name)
        return lox_update(weight, v_base, config.rank, config.alpha)

    def finetune(name: str, delta: torch.Tensor) -> torch.Tensor:
        extra = update(name) if name in base else None
        return delta if extra is None else delta + extra

    with torch.no_grad():
        model = fold_adapter(loaded, finetune)
        for name in list(base):
            extra = update(name)
            if extra is not None:
                weight = dense[name]
                weight.copy_((weight.float() + extra).to(weight.dtype))
    log.info(
        "lox: extrapolated the top-%d subspace of %d weights' alignment delta", config.rank, len(changed)
    )
    report = {"method": "lox", "extrapolated": changed, "config": config_record(config)}
    with atomic_output_dir(out, config.overwrite) as tmp:
        save_full_model(tmp, model, loaded, config)
        write_report(tmp, REPORT_FILE, report)
    return {"": out}


DEFENSE = register(
    Defense(
        name="lox",
        stage="post",
        config=LoXConfig,
        run=run,
        summary="add alpha x the rank-k part of the alignment delta W_aligned - W_base (LoX; data-free)",
        needs_base=True,
    )
)
