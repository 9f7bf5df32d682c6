"""Safe Delta (Lu et al., ICML 2025, "Safe Delta: consistently preserving safety when fine-tuning LLMs on
diverse datasets"): keep the fine-tuning delta entries that cost least safety within a budget, and let the
other weights compensate, OBS/SparseGPT-style, with layer Hessians from safe data.

Per fine-tuned Linear layer (the LoRA layers; elsewhere the delta is zero), with W the aligned weight
(rows, cols), delta = W_ft - W the fine-tuning delta, and X the layer's inputs in the aligned model
(adapter off) on N safe samples (harmful prompt + safe answer, ~128 in the paper), every token counted:
    H = 2 / N * sum_tokens x x^T + damp * mean(diag H) * I                  (cols, cols)
    U = the upper Cholesky factor of H^-1 (H^-1 = U^T U);  d_j = U_jj
    cost_ij = 1 / d_j^2          safety loss per unit squared change of column j (OBS)
    loss_ij = delta_ij^2 / d_j^2 the OBS estimate of the safety loss of keeping delta_ij
Columns are taken in blocks of `block_size`. In a block of `count` columns, entries are ordered by cost
(ties by position, row-major), the `exclude` most expensive fraction is never kept, and the longest prefix
of that order whose summed loss stays within
    budget = s / 2 * rows / 4096 * mean(cost over the block)
is kept: the authors' budget exactly (ColinLu50/SafeDelta, safedelta_runner.py: `scale = rows / 4096`,
`s = s / 2  # 2 = 4096 / blocksize=2048`, `loss_constraint = tmp.mean() * s * scale`), the same for a
block of any width (an earlier per-entry restatement, s * rows * count / 4096^2, gave 576-wide layers
0.28x their budget). Then, column by column (SparseGPT's sequential OBS),
a kept entry is set to its fine-tuned value and the change err = (w_j - q_j) / d_j is compensated on the
later columns: W[:, j+1:] -= err U[j, j+1:]. Entries not kept hold the aligned value plus compensation.
The loss of a later block is measured from the weights as compensated so far, as in the authors' code.
Writes a full model (the adapter is absorbed), `safedelta_mask.safetensors` (True = kept fine-tuned
value) and `safedelta_report.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.data.catalog import data_dir_field
from antidote.defenses.base import Defense, register
from antidote.errors import AntidoteError
from antidote.realignment.config import RealignConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

MASK_FILE = "safedelta_mask.safetensors"
REPORT_FILE = "safedelta_report.json"
REFERENCE_SIZE = 4096  # the layer width the authors' budget constants are written for


# ---- the math ---------------------------------------------------------------------------------------------


def hessian_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float64. h: (cols, cols), H of
    the layer inputs (2 / N * sum x x^T). Columns that never saw input (zero diagonal) get H_jj = 1."""
    import torch

    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def block_budget(s: float, rows: int, cost: torch.Tensor) -> float:
    """s / 2 * rows / 4096 * mean(cost): the safety-loss budget of one block, as the authors' code. cost:
    (count,), the per-column cost 1 / d_j^2 of the block's columns."""
    return float(s / 2 * rows / REFERENCE_SIZE * cost.double().mean())


def select_within_budget(
    loss: torch.Tensor, cost: torch.Tensor, budget: float, exclude: float
) -> torch.Tensor:
    """Which entries of a block to keep. loss: (rows, count) per-entry safety loss; cost: (count,) per
    column. Entries are ordered by cost (ties by row-major position); the last `int(exclude * n)` of that
    order are never kept; the longest prefix of the rest with summed loss <= budget is kept.
    Returns bool (rows, count)."""
    import torch

    rows, count = loss.shape
    n = rows * count
    flat_cost = cost.double().expand(rows, count).reshape(-1)
    order = torch.sort(flat_cost, stable=True).indices
    order = order[: n - int(exclude * n)]
    within = torch.cumsum(loss.double().reshape(-1)[order], 0) <= budget
    keep = torch.zeros(n, dtype=torch.bool, device=loss.device)
    keep[order[within]] = True
    return keep.reshape(rows, count)


def compensate_block(
    w: torch.Tensor, ft: torch.Tensor, keep: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential OBS over a block of B columns, all rows at once, in the transposed layout.

    w, ft: (B, rows), the block's current and fine-tuned columns (column j of W is row j here); keep: bool
    (B, rows); u: (B, B), the block's part of U. Column by column, a kept entry is set to its fine-tuned
    value and err_j = (w_j - q_j) / u_jj is taken off the later columns (w_k -= u_jk err_j). Since err is
    zero where nothing is kept, each row's errors solve one lower-triangular system,
        u_jj e_j + keep_j * sum_{i<j} u_ij e_i = keep_j * (w_j - ft_j),
    so the B steps are one batched triangular solve. Returns (the new block (B, rows), err (B, rows)).
    """
    import torch

    lower = torch.tril(u.T, diagonal=-1)  # lower[j, i] = u[i, j] for i < j
    k = keep.T.to(w.dtype)  # (rows, B)
    system = torch.diag_embed(torch.diag(u)).unsqueeze(0) + k.unsqueeze(2) * lower.unsqueeze(0)
    rhs = (k * (w - ft).T).unsqueeze(2)  # (rows, B, 1)
    err = torch.linalg.solve_triangular(system, rhs, upper=False).squeeze(2).T  # (B, rows)
    return torch.where(keep, ft, w - lower @ err), err


def safe_delta(
    weight: torch.Tensor,
    finetuned: torch.Tensor,
    h: torch.Tensor,
    *,
    s: float,
    damp: float = 0.01,
    exclude: float = 0.15,
    block_size: int = 2048,
    lazy: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe Delta on one layer. weight: the aligned W (rows, cols); finetuned: W_ft (rows, cols); h: (cols,
    cols) the layer-input Hessian on safe data. Returns (the new weight (rows, cols) float64, the bool
    keep mask (rows, cols)). `lazy` only groups the compensation (SparseGPT's lazy updates, solved per
    group by `compensate_block`); the result does not depend on it."""
    import torch

    u = hessian_inverse_factor(h, damp).to(weight.device)
    d = torch.diag(u)
    # Work on the transposes, (cols, rows), so that a column of W is a contiguous row here.
    w = weight.double().T.contiguous()
    ft = finetuned.double().T.contiguous()
    cols, rows = w.shape
    keep = torch.zeros(cols, rows, dtype=torch.bool, device=w.device)
    for b1 in range(0, cols, block_size):
        b2 = min(b1 + block_size, cols)
        cost = 1.0 / d[b1:b2] ** 2
        loss = (ft[b1:b2] - w[b1:b2]) ** 2 * cost.unsqueeze(1)
        keep[b1:b2] = select_within_budget(loss.T, cost, block_budget(s, rows, cost), exclude).T
        for l1 in range(b1, b2, lazy):
            l2 = min(l1 + lazy, b2)
            w[l1:l2], err = compensate_block(w[l1:l2], ft[l1:l2], keep[l1:l2], u[l1:l2, l1:l2])
            w[l2:] -= u[l1:l2, l2:].T @ err
    return w.T, keep.T


# ---- collecting the Hessians ------------------------------------------------------------------------------


class _Hessians:
    """Running sums of x x^T (float64) per target, over real tokens only (right padding). Targets that
    read the same input tensor (q/k/v) share one sum."""

    def __init__(self, widths: Mapping[str, int]):
        self.sums: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}
        self.widths = widths
        self.real: torch.Tensor | None = None  # (batch, seq) bool: the batch's real tokens
        self._last: tuple[Any, str] | None = None

    def hook(self, name: str) -> Any:
        import torch

        def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            last = self._last
            if name not in self.owner:  # first batch: does the target before it read this very tensor?
                self.owner[name] = self.owner[last[1]] if last is not None and last[0] is x else name
            self._last = (x, name)
            if self.owner[name] != name:
                return
            rows = x.reshape(-1, x.shape[-1])
            if x.dim() == 3 and self.real is not None and tuple(x.shape[:2]) == tuple(self.real.shape):
                rows = rows[self.real.reshape(-1).to(x.device)]
            # else not (batch, seq, in): every row counts, padding included
            real = rows.double()
            acc = self.sums.setdefault(
                name, torch.zeros(self.widths[name], self.widths[name], dtype=torch.float64, device=x.device)
            )
            acc.addmm_(real.T, real)

        return pre_hook

    def end_batch(self) -> None:
        self._last = None

    def hessians(self, samples: int) -> dict[str, torch.Tensor]:
        """H = 2 / N * sum x x^T per target; targets that read one input share one tensor."""
        scaled = {owner: total * (2.0 / samples) for owner, total in self.sums.items()}
        return {name: scaled[owner] for name, owner in self.owner.items()}


def collect_hessians(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    widths: Mapping[str, int],
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_id: int,
    desc: str = "safedelta hessians",
) -> dict[str, torch.Tensor]:
    """H (in, in) float64 per target from one forward pass over `sequences` (token ids) as `model` is.
    Targets that read the same input (q/k/v) get the same tensor object. Where every target lies in the
    decoder body, the output head is not run (the logits are not needed)."""
    import torch
    from tqdm.auto import tqdm

    from antidote.models.layers import decoder_layers
    from antidote.realignment.calibrate import hooks_removed_after, make_batches

    acc = _Hessians(widths)
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    try:
        body = decoder_layers(model)[0]
    except AntidoteError:  # no recognisable block list: run the whole model
        body = model
    inside = {id(m) for m in body.modules()}
    runner = body if all(id(m) in inside for m in targets.values()) else model
    handles = [m.register_forward_pre_hook(acc.hook(name)) for name, m in targets.items()]
    with hooks_removed_after(handles), torch.no_grad():
        for batch in tqdm(make_batches(sequences, batch_size), desc=desc, unit="batch", leave=False):
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                mask[row, : len(sequences[i])] = 1
            acc.real = mask.bool()
            runner(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            acc.end_batch()
    return acc.hessians(len(sequences))


# ---- the defense ------------------------------------------------------------------------------------------


def _help(name: str) -> dict[str, Any]:
    meta = {f.name: dict(f.metadata) for f in dataclasses.fields(RealignConfig)}[name]
    meta.pop("positional", None)
    return meta


@dataclass
class SafeDeltaConfig:
    """Safe Delta's options; the shared ones mean what they mean for `antidote realign`."""

    model: str = field(
        metadata={
            "help": "the aligned model (HF folder, hub id, .gguf or smollm2-135m-instruct)",
            "positional": True,
        }
    )
    adapter: str | None = field(
        default=None, metadata={"help": "the fine-tuning (attack) LoRA adapter folder on MODEL"}
    )
    data: str = field(
        default="",
        metadata={
            "help": "safe data: harmful prompts with safe (refusal) answers, e.g. refusals or "
            "builtin-refusals:calibrate; the layer Hessians come from it"
        },
    )
    output: str | None = field(default=None, metadata={"help": "output folder (written atomically)"})
    scale: float = field(
        default=0.1,
        metadata={"help": "s, the safety budget scale (the authors' default 0.1); larger keeps more delta"},
    )
    max_samples: int | None = field(
        default=128, metadata={"help": "safe samples to use, seeded (the paper's 128)"}
    )
    damp: float = field(default=0.01, metadata={"help": "Hessian dampening, a fraction of its mean diagonal"})
    exclude: float = field(
        default=0.15,
        metadata={"help": "fraction of each block's entries, the most safety-costly, never kept"},
    )
    block_size: int = field(
        default=2048, metadata={"help": "columns per selection block (the authors' 2048)"}
    )
    template: str = field(default="alpaca", metadata=_help("template"))
    filters: list[str] = field(default_factory=list, metadata=_help("filters"))
    max_length: int = field(default=512, metadata=_help("max_length"))
    batch_size: int | None = field(default=None, metadata=_help("batch_size"))
    seed: int = field(default=0, metadata=_help("seed"))
    overwrite: bool = field(default=False, metadata=_help("overwrite"))
    dtype: str = field(default="auto", metadata=_help("dtype"))
    device: str = field(default="auto", metadata=_help("device"))
    trust_remote_code: bool = field(default=False, metadata=_help("trust_remote_code"))
    data_dir: str | None = data_dir_field(key_when_set=True)  # added later: older stages keep keys

    def __post_init__(self) -> None:
        if not self.adapter:
            raise AntidoteError(
                "safedelta needs --adapter FOLDER, the fine-tuning LoRA adapter on the aligned model"
            )
        if not self.data:
            raise AntidoteError(
                "safedelta needs --data FILE: harmful prompts with safe answers (e.g. refusals), ~128 of them"
            )
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise AntidoteError(f"--scale must be a number >= 0, got {self.scale}; the authors use 0.1")
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise AntidoteError(f"--damp must be > 0, got {self.damp}; 0.01 is the usual value")
        if not 0 <= self.exclude < 1:
            raise AntidoteError(f"--exclude is a fraction in [0, 1), got {self.exclude}")
        if self.block_size < 1:
            raise AntidoteError(f"--block-size must be at least 1, got {self.block_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise AntidoteError(f"--max-samples must be at least 1, got {self.max_samples}")
        RealignConfig(  # validates the shared options (template, dtype, lengths) the engine's way
            model=self.model,
            data=self.data,
            template=self.template,
            filters=self.filters,
            max_length=self.max_length,
            batch_size=self.batch_size,
            dtype=self.dtype,
            device=self.device,
        )


def run(config: SafeDeltaConfig) -> dict[str, Path]:
    import torch
    from tqdm.auto import tqdm

    from antidote.data import load_examples, tokenize_examples
    from antidote.defenses.weight_edit import (
        config_record,
        load_finetuned,
        lora_layers,
        save_full_model,
        write_report,
    )
    from antidote.outputs import atomic_output_dir, check_output_dir
    from antidote.realignment.calibrate import default_batch_size
    from antidote.realignment.maskfile import PackedMask, write_mask_file

    if not config.output:
        raise AntidoteError("missing --output DIR; safedelta writes its model there")
    inputs = tuple(p for p in (config.model, config.adapter, config.data) if p)
    out = check_output_dir(config.output, config.overwrite, inputs)
    loaded = load_finetuned(config)
    layers = lora_layers(loaded)
    examples = load_examples(
        config.data,
        filters=config.filters,
        max_samples=config.max_samples,
        seed=config.seed,
        data_dir=config.data_dir,
    )
    sequences = tokenize_examples(examples, loaded.tokenizer, config.template, config.max_length)
    model = loaded.model
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    disabled = getattr(model, "disable_adapter", None)
    with disabled() if callable(disabled) else contextlib.nullcontext():  # the aligned model's inputs
        model.eval()
        hessians = collect_hessians(
            model,
            layers,
            {name: layer.in_features for name, layer in layers.items()},
            sequences,
            batch_size=config.batch_size or default_batch_size(device),
            pad_id=loaded.tokenizer.pad_token_id or 0,
        )
    adapter = loaded.adapter_name
    masks, per_layer = {}, {}
    with torch.no_grad():
        for name, layer in tqdm(layers.items(), desc="safedelta layers", unit="layer", leave=False):
            weight = layer.base_layer.weight
            finetuned = weight.float() + layer.get_delta_weight(adapter).float().to(weight.device)
            new, keep = safe_delta(
                weight,
                finetuned,
                hessians.pop(name).to(weight.device),
                s=config.scale,
                damp=config.damp,
                exclude=config.exclude,
                block_size=config.block_size,
            )
            weight.copy_(new.to(weight.dtype))
            masks[f"{name}.weight"] = PackedMask.pack(keep)
            per_layer[f"{name}.weight"] = {"kept": int(keep.sum()), "total": keep.numel()}
    plain = model.unload()  # type: ignore[operator]
    kept = sum(r["kept"] for r in per_layer.values())
    total = sum(r["total"] for r in per_layer.values())
    log.info("safedelta: kept %d of %d fine-tuning delta entries", kept, total)
    report = {
        "method": "safedelta",
        "kept_total": {"kept": kept, "total": total, "fraction": round(kept / max(total, 1), 6)},
        "layers": per_layer,
        "calibration": {"samples": len(sequences), "tokens": sum(len(x) for x in sequences)},
        "config": config_record(config),
    }
    with atomic_output_dir(out, config.overwrite) as tmp:
        save_full_model(tmp, plain, loaded, config)
        write_mask_file(tmp / MASK_FILE, masks)
        write_report(tmp, REPORT_FILE, report)
    return {"": out}


DEFENSE = register(
    Defense(
        name="safedelta",
        stage="post",
        config=SafeDeltaConfig,
        run=run,
        summary="keep the fine-tuning delta entries that cost least safety within a budget, compensate the "
        "rest (OBS, Hessians from ~128 safe samples)",
    )
)
