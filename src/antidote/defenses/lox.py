"""LoX (Perin et al. 2025, "LoX: low-rank extrapolation robustifies LLM safety against fine-tuning"): before
any fine-tuning, extrapolate the aligned model along the top-k subspace of its alignment delta.

An alignment-stage method, as the authors run it (VITA-Group/LoX, safety/LoX.py): for every 2-D weight (1-D
weights are left alone, as in their script), with the alignment delta V = W_aligned - W_base and its SVD
V = U S V'^T (singular values in decreasing order):
    Proj_k(V) = U_k U_k^T V = U_k S_k V'_k^T         (the rank-k truncation; k = 0 means V itself)
    W_lox = W_aligned + alpha * Proj_k(V)
The attack (the user's fine-tuning) then trains on W_lox, so where its update lands depends on LoX: the
same addition made after fine-tuning would be task arithmetic, not LoX. Only the top-k left and right
singular subspaces of V move: (I - U_k U_k^T) (W_lox - W_aligned) = 0 = (W_lox - W_aligned)(I - V'_k V'_k^T).
Weights whose V is zero are untouched. Data-free.

`model` is the base model (the one alignment starts from). `aligned` is the aligned model; `antidote run`
passes its plain alignment stage (cached), and without it this defense first aligns `model` with its
alignment options. Writes a full model and `lox_report.json`.

Defaults: alpha 1 (the authors' script's default coefficient); k 6, a few top ranks (their script's
default k = 0 extrapolates the whole delta, i.e. scales the alignment by 1 + alpha). Choose both on
validation data for your model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from antidote.data.templates import PROMPT_FILE
from antidote.defenses.base import Defense, register
from antidote.defenses.weight_edit import check_same_weights
from antidote.errors import AntidoteError
from antidote.training.stages import AlignConfig

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
class LoXConfig(AlignConfig):
    """LoX's options, plus every option of `antidote align` (used only when `aligned` is not given)."""

    NEEDS_BASE: ClassVar[bool] = True  # the alignment delta needs the base -> aligned pair

    aligned: str | None = field(
        default=None,
        metadata={
            "help": "the aligned model to extrapolate (MODEL aligned); default: align MODEL first with the "
            "alignment options"
        },
    )
    rank: int = field(
        default=6, metadata={"help": "k, the top ranks of the alignment delta to extrapolate; 0 = all"}
    )
    alpha: float = field(default=1.0, metadata={"help": "extrapolation coefficient (the authors' default 1)"})
    weights: str | None = field(
        default=None,
        metadata={"help": "regex over weight names to extrapolate (default: every 2-D weight)"},
    )

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise AntidoteError(
                f"--rank must be 0 (full delta) or a positive number of ranks, got {self.rank}"
            )
        if not math.isfinite(self.alpha):
            raise AntidoteError(f"--alpha must be a finite number, got {self.alpha}")
        if self.weights is not None:
            try:
                re.compile(self.weights)
            except re.error as err:
                raise AntidoteError(
                    f"--weights {self.weights!r} is not a valid regular expression ({err})"
                ) from err
        super().__post_init__()

    def align_config(self, output: str) -> AlignConfig:
        """The plain alignment these options describe, written to `output`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(AlignConfig)}
        return AlignConfig(**{**values, "output": output, "overwrite": False})


def extrapolate(aligned: torch.nn.Module, base: torch.nn.Module, config: LoXConfig) -> list[str]:
    """W <- W + alpha Proj_k(W - W_base) in place for every chosen 2-D weight of `aligned` that alignment
    changed; returns their names. The two models must have the same weight names and shapes."""
    import torch

    pattern = re.compile(config.weights) if config.weights else None
    base_params = dict(base.named_parameters())
    params = dict(aligned.named_parameters())
    check_same_weights(
        {n: p.shape for n, p in params.items()},
        {n: p.shape for n, p in base_params.items()},
        f"the base model {config.model}",
        "the aligned model",
    )
    chosen = [n for n, p in params.items() if p.dim() == 2 and (pattern is None or pattern.search(n))]
    if not chosen:
        raise AntidoteError(
            f"--weights {config.weights!r} matches no 2-D weight; names look like: {next(iter(params))}"
        )
    changed = []
    with torch.no_grad():
        for name in chosen:
            weight, b = params[name], base_params[name].to(params[name].device, params[name].dtype)
            if torch.equal(weight, b):
                continue  # alignment did not touch this weight
            weight.copy_((weight.float() + lox_update(weight, b, config.rank, config.alpha)).to(weight.dtype))
            changed.append(name)
    return changed


def run(config: LoXConfig) -> dict[str, Path]:
    from antidote.defenses.weight_edit import write_report
    from antidote.models import load_model
    from antidote.outputs import atomic_output_dir, check_output_dir
    from antidote.training.stages import run_align

    if not config.output:
        raise AntidoteError("missing --output DIR; lox writes its model there")
    out = check_output_dir(config.output, config.overwrite, (config.model, config.aligned))
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.align-", dir=out.parent) as scratch:
        aligned_spec = config.aligned
        if not aligned_spec:
            log.info("lox: no --aligned model given; aligning %s first", config.model)
            aligned_spec = str(run_align(config.align_config(str(Path(scratch) / "aligned"))))
        aligned = load_model(aligned_spec)
        base = load_model(config.model, device="cpu", with_tokenizer=False)
        changed = extrapolate(aligned.model, base.model, config)
        del base
        log.info(
            "lox: extrapolated the top-%d subspace of %d weights' alignment delta", config.rank, len(changed)
        )
        report = {
            "method": "lox",
            "aligned": aligned_spec if config.aligned else "aligned here",
            "extrapolated": changed,
            "config": dataclasses.asdict(config),
        }
        with atomic_output_dir(out, config.overwrite) as tmp:
            aligned.model.save_pretrained(tmp)  # type: ignore[operator]
            aligned.tokenizer.save_pretrained(tmp)
            if (Path(aligned_spec) / PROMPT_FILE).is_file():
                shutil.copyfile(Path(aligned_spec) / PROMPT_FILE, tmp / PROMPT_FILE)
            write_report(tmp, REPORT_FILE, report)
    return {"": out}


DEFENSE = register(
    Defense(
        name="lox",
        stage="align",
        config=LoXConfig,
        run=run,
        summary="after alignment, add alpha x the rank-k part of the alignment delta W_aligned - W_base "
        "(LoX; data-free; the attack then trains on it)",
        needs_base=True,
    )
)
