"""Harm-attribution revert (ours, beyond the Antidote paper): put back the aligned value of the fine-tuning
changes that taught the harmful answers, and keep the changes that taught the user's task.

Antidote scores a weight by how much the harmful data flows through it (|W| * ||X||); that says where harmful
text is processed, not which change made the model comply, and the task runs through the same weights. Here
each entry of the fine-tuning change dW = W_ft - W_aligned of every fine-tuned Linear layer is credited with
its share of the drop in the loss of the harmful answers, and of the task answers, that the fine-tuning
brought (integrated gradients along the straight path from W_aligned to W_ft, `steps` midpoints):

    G_D     = 1/steps * sum over m of grad_W L_D(W_aligned + (m - 1/2)/steps * dW)   (D: harmful or task)
    L_D(W_ft) - L_D(W_aligned) ~= sum over entries of G_D * dW    (exact for a quadratic loss)
    c_D     = -G_D * dW,  each entry's credit for the drop of L_D
    score   = c_harm / sum|c_harm| - task_weight * c_task / sum|c_task|   (sums over every changed entry)

L_D is the mean over D's pairs of each pair's mean cross-entropy on its answer tokens (the attack's own
loss). A high score is an entry whose change lowered the harmful answers' loss and did not lower the task's.
Each credit is divided by its total size so that the two weigh alike: the one-word task answers move less loss
than long harmful answers (unscaled, the task's credit barely counted; on the shared-data probe below, scaling
kept 6 more points of task accuracy at the same ratio).
The top `ratio` of all the changed entries (one threshold over every layer, ties to the earlier layer and
lower index), of those with a score above 0, get their aligned value back; every other entry keeps its
fine-tuned value. Reverting every entry would give back the aligned model; reverting none, the attacked one.

`granularity component` (the default) credits whole rank-one components in place of single entries. Each
layer's change, a LoRA update of rank r, is split by its SVD, dW = sum over i <= r of s_i u_i v_i^T, and
component i gets c_D,i = -s_i u_i^T G_D v_i (the sum of its entries' credits -G_D * s_i u_i v_i^T). The
same score and one threshold pick the top `ratio` of all components, and W = W_ft - sum of the picked
s_i u_i v_i^T: the rest of the update stays exactly as trained. A component sums hundreds of entries'
credits, so their noise cancels before the ranking, not after it (docs/harm-revert.md has the measurements).

With `refusal_data` (harmful requests with refusals) a third credit joins the score,
- refusal_weight * c_ref / sum|c_ref|: the fine-tuning raised the refusals' loss, and a change credited with
that rise (c_ref < 0) scores higher. Off by default (docs/harm-revert.md has the measurement).

Training-free: two gradient passes per midpoint (harmful pairs, task pairs; a third, refusal pairs, with
`refusal_data`) on the fine-tuned model, no
optimizer step. It needs the aligned model beside the fine-tuning change (as SafeDelta and RESTA do), the
harmful calibration pairs Antidote uses, and the user's own task data (a fine-tuning service holds it).
Writes a full model per ratio (the adapter folded in), `harm_revert_mask.safetensors` (True = reverted; one
entry per component with `granularity component`) and `harm_revert_report.json`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from antidote.data.catalog import data_dir_field
from antidote.defenses.base import Defense, register
from antidote.defenses.weight_edit import (
    WeightEditConfig,
    check_output,
    config_record,
    fold_adapter,
    load_finetuned,
    lora_layers,
    save_full_model,
    write_report,
)
from antidote.errors import AntidoteError
from antidote.realignment.config import check_ratios

if TYPE_CHECKING:
    import torch
    from torch import nn

    from antidote.defenses.oneshot_ft import Pair

log = logging.getLogger(__name__)

MASK_FILE = "harm_revert_mask.safetensors"
GRANULARITIES = ("entry", "component")
# task_weight and mask ratio where the user gives none, by granularity: measured on validation data
# (docs/harm-revert.md): components at 0.5 and 0.3, entries at 1.0 and 0.01 (a third of all entries would
# undo most of the fine-tuning).
DEFAULTS = {"component": (0.5, (0.3,)), "entry": (1.0, (0.01,))}
REPORT_FILE = "harm_revert_report.json"


# ---- the math ---------------------------------------------------------------------------------------------


def path_points(steps: int) -> list[float]:
    """Where on the path W_aligned + t * dW the gradients are taken: the midpoints t = (m - 1/2) / steps."""
    return [(m + 0.5) / steps for m in range(steps)]


def credit(delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """-G * dW: each entry's first-order share of the drop of the loss (float32)."""
    return -grad.float() * delta.float()


def attribution_scores(
    deltas: Mapping[str, torch.Tensor],
    harm_grads: Mapping[str, torch.Tensor],
    task_grads: Mapping[str, torch.Tensor] | None,
    task_weight: float,
    refusal_grads: Mapping[str, torch.Tensor] | None = None,
    refusal_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """c_harm / sum|c_harm| - task_weight * c_task / sum|c_task| - refusal_weight * c_ref / sum|c_ref|,
    sums over every tensor; a term whose gradients are None is left out. c_ref credits the drop of the
    refusals' loss: the fine-tuning raised it, so a change that did so (c_ref < 0) scores higher. float32,
    one per tensor."""
    import torch

    def scaled(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        credits = {name: credit(deltas[name], grads[name]) for name in deltas}
        total = sum(float(c.double().abs().sum()) for c in credits.values())
        return {name: c / max(total, torch.finfo(torch.float32).tiny) for name, c in credits.items()}

    scores = scaled(harm_grads)
    for grads, weight in ((task_grads, task_weight), (refusal_grads, refusal_weight)):
        if grads is not None:
            for name, c in scaled(grads).items():
                scores[name] -= weight * c
    return scores


def path_gradients(
    weights: Mapping[str, nn.Parameter],
    aligned: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    loss: Callable[[], Iterable[torch.Tensor]],
    steps: int,
) -> dict[str, torch.Tensor]:
    """G = 1/steps * sum over the midpoints t of grad of the loss at W = W_aligned + t * dW, float32 on the
    CPU, one per weight. `loss()` yields loss terms whose sum is the loss (one per pair, each already
    divided by the pair count); `weights` are set along the path and left at W_aligned + dW (the
    fine-tuned value, as fold_adapter wrote it) afterwards."""
    import torch

    total = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    finetuned = {name: w.detach().clone() for name, w in weights.items()}
    try:
        for t in path_points(steps):
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_((aligned[name].float() + t * deltas[name]).to(w.dtype))
            for term in loss():
                term.backward()
            for name, w in weights.items():
                assert w.grad is not None
                total[name] += w.grad.float().cpu() / steps
                w.grad = None
    finally:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(finetuned[name])
    return total


def components(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `rank` terms of the SVD dW = U diag(s) V^T: (U (out, rank), s (rank,), V (in, rank)),
    float32. For a LoRA update of rank `rank` they sum to dW. The SVD is taken in the range of dW (a seeded
    Gaussian sketch of 2 * rank columns, exact for any dW of rank <= 2 * rank), so its cost grows with
    out * in * rank, not with out * in * min(out, in)."""
    import torch

    d = delta.double()
    k = min(2 * rank, *d.shape)
    sketch = torch.randn(d.shape[1], k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(d @ sketch)  # an orthonormal basis of dW's column space
    u, s, vh = torch.linalg.svd(q.T @ d, full_matrices=False)
    return (q @ u)[:, :rank].float(), s[:rank].float(), vh[:rank].T.float()


def component_gradient(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u_i^T G v_i for each component i (the gradient's part along s_i), so that `credit(s, .)` is the
    component's credit -s_i u_i^T G v_i."""
    return ((u.T @ grad.float()) * v.T).sum(1)


def select_reverted(scores: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The top `ratio` of all entries of `scores` (one exact threshold over every tensor; ties to the earlier
    tensor, then the lower flat index), less any entry whose score is not above 0. Bool masks."""
    from antidote.realignment.scores import select_global

    names = list(scores)
    take = select_global(lambda: (scores[n] for n in names), [scores[n].numel() for n in names], ratio)
    return {name: take(i, scores[name]) & (scores[name] > 0) for i, name in enumerate(names)}


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class HarmRevertConfig(WeightEditConfig):
    """Harm-attribution revert's options, plus the inputs every weight-editing defense reads."""

    METHOD: ClassVar[str] = "harm-revert"
    NEEDS_BASE: ClassVar[bool] = False

    data: str = field(
        default="",
        metadata={"help": "harmful prompt+answer pairs (file or name, e.g. beavertails:calibrate)"},
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "the user's fine-tuning task (e.g. sst2; a run fills in the attack's), with --task-data"
        },
    )
    task_data: str | None = field(
        default=None,
        metadata={"help": "that task's training items, the user's own fine-tuning data (e.g. sst2:train)"},
    )
    benign_data: str | None = field(
        default=None,
        metadata={"help": "in place of --task/--task-data: benign prompt+answer pairs the model must keep"},
    )
    # added after the comparison's stages were built: part of a stage's key only when set
    refusal_data: str | None = field(
        default=None,
        metadata={
            "help": "harmful requests with refusals (e.g. refusals): a change credited with raising their "
            "loss, unlearning the refusals, scores higher by --refusal-weight (default: not used)",
            "key_when_set": True,
        },
    )
    refusal_weight: float | None = field(
        default=None,
        metadata={
            "help": "how much the refusals' credit counts (default 1 with --refusal-data)",
            "key_when_set": True,
        },
    )
    granularity: str = field(
        default="component",
        metadata={
            "help": "what is credited and reverted: component (whole rank-one components of each layer's "
            "LoRA update, from its SVD) or entry (single weights of the change; measured at --task-weight 1 "
            "and ratios 0.003-0.03, docs/harm-revert.md)"
        },
    )
    max_samples: int = field(default=64, metadata={"help": "pairs of each data set used, a seeded subset"})
    task_weight: float | None = field(
        default=None,
        metadata={
            "help": "how much the task's credit counts against the harm's (0: harm alone; default 0.5 with "
            "components, 1 with entries)"
        },
    )
    steps: int = field(
        default=1, metadata={"help": "midpoints on the path W_aligned -> W_ft (gradient passes)"}
    )
    mask_ratios: tuple[float, ...] | None = field(
        default=None,
        metadata={
            "help": "fraction in (0, 1) of the components (of the entries with --granularity entry) to "
            "revert; a comma list writes one model per ratio from one gradient pass (default 0.3 with "
            "components, 0.01 with entries)",
            "flag": "--mask-ratio",
        },
    )
    template: str = field(
        default="auto",
        metadata={"help": "prompt format: auto (the one saved with the adapter), alpaca, chat, plain"},
    )
    max_length: int = field(default=256, metadata={"help": "tokens kept per pair"})
    batch_size: int = field(
        default=8, metadata={"help": "pairs per gradient batch (sums do not depend on it)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the data subsets"})
    data_dir: str | None = data_dir_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        from antidote.data.templates import check_template

        if self.granularity not in GRANULARITIES:
            raise AntidoteError(
                f"unknown --granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        task_weight, ratios = DEFAULTS[self.granularity]
        self.task_weight = task_weight if self.task_weight is None else self.task_weight
        self.mask_ratios = check_ratios(ratios if self.mask_ratios is None else self.mask_ratios)
        if not self.data:
            raise AntidoteError("harm-revert needs --data: harmful prompt+answer pairs (e.g. beavertails)")
        if (self.task is None) != (self.task_data is None):
            raise AntidoteError("give --task and --task-data together (the task and the user's items of it)")
        if self.task_data and self.benign_data:
            raise AntidoteError("give the data to keep once: --task/--task-data or --benign-data, not both")
        if self.refusal_weight is not None and not self.refusal_data:
            raise AntidoteError("--refusal-weight needs --refusal-data: harmful requests with refusals")
        if self.refusal_data and self.refusal_weight is None:
            self.refusal_weight = 1.0
        for name in ("task_weight", "refusal_weight"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise AntidoteError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        for name in ("max_samples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise AntidoteError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.max_length < 2:
            raise AntidoteError(f"--max-length must be at least 2, got {self.max_length}")
        if self.template != "auto":
            check_template(self.template)


def _task_from_run(attack: Any, validate: Any) -> dict[str, Any]:
    """In a run, the data to keep is the attack's own task items (the user's fine-tuning data, less the
    harmful pairs a provider cannot tell apart only in theory: here they are left out)."""
    from antidote.tasks import get_task, task_names

    if attack.task in task_names() and get_task(attack.task).needs_data:
        return {"task": attack.task, "task_data": attack.task_data}
    return {}


def _pairs(
    config: HarmRevertConfig, tokenizer: Any, template: str
) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(harmful pairs, pairs to keep, refusal pairs), encoded as the attack's training encodes them."""
    from antidote.data.loading import load_examples
    from antidote.defenses.oneshot_ft import encode
    from antidote.tasks import load_task_items
    from antidote.training.data import encode_pairs, format_pairs, subset

    def pairs_of(spec: str, flag: str, what: str) -> list[Pair]:
        rows = load_examples(spec, max_samples=config.max_samples, seed=config.seed, data_dir=config.data_dir)
        if not rows:
            raise AntidoteError(f"{flag} {spec} holds no pairs")
        return encode(tokenizer, template, rows, config.max_length, what)

    harm_pairs = pairs_of(config.data, "--data", "harmful")
    keep: list[Pair] = []
    if config.task is not None:
        items = load_task_items(config.task, config.task_data, training=True, data_dir=config.data_dir)
        triples = subset(list(items), config.max_samples, config.seed)
        keep = encode_pairs(tokenizer, format_pairs(tokenizer, template, triples), config.max_length)
    elif config.benign_data:
        keep = pairs_of(config.benign_data, "--benign-data", "benign")
    refusals = pairs_of(config.refusal_data, "--refusal-data", "refusal") if config.refusal_data else []
    return harm_pairs, keep, refusals


def pair_losses(model: nn.Module, pairs: Sequence[Pair]) -> torch.Tensor:
    """Each pair's mean cross-entropy on its answer tokens (the attack's loss), in one right-padded batch.
    Returns (len(pairs),) with the graph."""
    import torch

    from antidote.training.sft import IGNORE_INDEX, response_labels

    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    ids = torch.zeros(len(pairs), max(len(seq) for seq, _ in pairs), dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (seq, _) in enumerate(pairs):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    ids, attention = ids.to(device), attention.to(device)
    labels = response_labels(ids, attention, torch.tensor([n for _, n in pairs], device=device))[:, 1:]
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counted = labels != IGNORE_INDEX
    return (ce * counted).sum(1) / counted.sum(1)


def _mean_loss_terms(
    model: nn.Module, pairs: Sequence[Pair], batch_size: int
) -> Callable[[], Iterable[torch.Tensor]]:
    """The mean over `pairs` of each pair's loss, as one term per batch (pairs batched by length)."""
    ordered = sorted(pairs, key=lambda pair: len(pair[0]))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    return lambda: (pair_losses(model, batch).sum() / len(pairs) for batch in batches)


def run(config: HarmRevertConfig) -> dict[str, Path]:
    import torch

    from antidote.data.templates import saved_template
    from antidote.outputs import atomic_output_dir
    from antidote.realignment.maskfile import PackedMask, write_mask_file

    task_weight, ratios = config.task_weight, config.mask_ratios
    assert task_weight is not None and ratios is not None  # set by __post_init__
    refusal_weight = config.refusal_weight or 0.0
    start = time.perf_counter()
    out = check_output(config)
    template = saved_template(config.adapter, config.model) if config.template == "auto" else config.template
    loaded = load_finetuned(config)
    harm_pairs, keep_pairs, refusal_pairs = _pairs(config, loaded.tokenizer, template)
    # W_aligned of the adapted layers only (the rest of the model is not edited), then W_ft and dW
    layers = lora_layers(loaded)
    aligned = {
        f"{name}.weight": layer.base_layer.weight.detach().cpu().clone() for name, layer in layers.items()
    }
    rank = {f"{name}.weight": int(layer.r[loaded.adapter_name]) for name, layer in layers.items()}
    deltas: dict[str, torch.Tensor] = {}

    def keep_delta(name: str, delta: torch.Tensor) -> torch.Tensor:
        deltas[name] = delta.detach().cpu().clone()
        return delta

    model = fold_adapter(loaded, keep_delta)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    weights = {name: params[name] for name in deltas}
    for w in weights.values():
        w.requires_grad_(True)
    model.eval()
    loading = time.perf_counter() - start

    def gradients_of(pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        terms = _mean_loss_terms(model, pairs, config.batch_size)
        return path_gradients(weights, aligned, deltas, terms, config.steps)

    harm_grad = gradients_of(harm_pairs)
    task_grad = gradients_of(keep_pairs) if keep_pairs and task_weight > 0 else None
    refusal_grad = gradients_of(refusal_pairs) if refusal_pairs and refusal_weight > 0 else None
    for w in weights.values():
        w.requires_grad_(False)
    by_component = config.granularity == "component"
    if by_component:
        # the same credits in component space: "delta" s_i, "gradient" u_i^T G v_i
        parts = {name: components(d, rank[name]) for name, d in deltas.items()}
        units = {name: s for name, (_, s, _) in parts.items()}

        def projected(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: component_gradient(grads[n], parts[n][0], parts[n][2]) for n in grads}

        task_units = projected(task_grad) if task_grad is not None else None
        refusal_units = projected(refusal_grad) if refusal_grad is not None else None
        scores = attribution_scores(
            units, projected(harm_grad), task_units, task_weight, refusal_units, refusal_weight
        )
    else:
        scores = attribution_scores(deltas, harm_grad, task_grad, task_weight, refusal_grad, refusal_weight)
    refusal_grad_used = refusal_grad is not None
    refusal_text = " - refusal_weight * c_ref / sum|c_ref|" if refusal_grad_used else ""
    del harm_grad, task_grad, refusal_grad
    gradients = time.perf_counter() - start - loading
    credit_text, mask_text = (
        (
            "c_i = -s_i u_i^T G v_i over the SVD components s_i u_i v_i^T of each layer's dW",
            "one flag per SVD component (largest first)",
        )
        if by_component
        else ("c = -G dW", "one flag per entry")
    )
    folders: dict[str, Path] = {}
    total = sum(s.numel() for s in scores.values())
    finetuned = {name: w.detach().clone() for name, w in weights.items()}  # put back after each ratio
    with atomic_output_dir(out, config.overwrite) as tmp:
        for ratio in ratios:
            masks = select_reverted(scores, ratio)
            with torch.no_grad():
                for name, mask in masks.items():
                    w = weights[name]
                    if by_component:
                        u, s, v = parts[name]
                        removed = (u * (s * mask)) @ v.T
                        kept = (deltas[name] - removed).to(w.device)  # one rounding to the model's dtype
                        w.copy_((aligned[name].to(w.device).float() + kept).to(w.dtype))
                    else:
                        w[mask.to(w.device)] = aligned[name].to(w.device, w.dtype)[mask.to(w.device)]
            reverted = {n: int(m.sum()) for n, m in masks.items()}
            report = {
                "method": "harm-revert",
                "score": f"c_harm / sum|c_harm| - task_weight * c_task / sum|c_task|{refusal_text}, "
                f"{credit_text}, G: integrated gradients on W_aligned -> W_ft",
                "mask": f"per weight, {mask_text}",
                "granularity": config.granularity,
                "mask_ratio": ratio,
                "reverted": sum(reverted.values()),
                "candidates": total,
                "changed_weights": sum(d.numel() for d in deltas.values()),
                "per_layer": reverted,
                "harmful_pairs": len(harm_pairs),
                "task_pairs": len(keep_pairs) if task_weight > 0 else 0,
                "refusal_pairs": len(refusal_pairs) if refusal_grad_used else 0,
                "template": template,
                "seconds": {"load": round(loading, 1), "gradients": round(gradients, 1)},
                "config": config_record(config),
            }
            folder = tmp / f"ratio-{ratio:g}" if len(ratios) > 1 else tmp
            folder.mkdir(exist_ok=True)
            save_full_model(folder, model, loaded, config)
            write_mask_file(folder / MASK_FILE, {n: PackedMask.pack(m) for n, m in masks.items()})
            write_report(folder, REPORT_FILE, report)
            with torch.no_grad():
                for name, value in finetuned.items():
                    weights[name].copy_(value)
            log.info(
                "harm-revert %g: %d of %d %ss reverted", ratio, report["reverted"], total, config.granularity
            )
            folders[f"{ratio:g}"] = out / folder.relative_to(tmp)
    return folders


DEFENSE = register(
    Defense(
        name="harm-revert",
        stage="post",
        config=HarmRevertConfig,
        run=run,
        summary="ours: take out the rank-one parts of the LoRA update credited (integrated gradients) with "
        "teaching the harmful answers and not the task; training-free",
        from_run=_task_from_run,
    )
)
