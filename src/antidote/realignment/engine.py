"""Antidote realignment: calibrate on harmful data, score every target weight, prune the top fraction.

The public steps compose: `load_model` -> `load_examples`/`tokenize_examples` -> `find_targets` ->
`collect_statistics` -> `compute_masks` -> `apply_masks` -> `save_realigned`. `realign()` runs them all
for one mask ratio; `realign_sweep()` writes one output per ratio from a single calibration pass.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from antidote.data import load_examples, tokenize_examples
from antidote.errors import AntidoteError
from antidote.models import LoadedModel, load_model
from antidote.outputs import atomic_output_dir, check_output_dir
from antidote.realignment.calibrate import Statistics, collect_statistics, resolve_compute_dtype
from antidote.realignment.config import RealignConfig
from antidote.realignment.maskfile import PackedMask, write_mask_file
from antidote.realignment.scores import (
    contrast_score,
    select_global,
    select_rows,
    select_tensor,
    wanda_score,
)
from antidote.realignment.targets import find_targets, saved_name

log = logging.getLogger(__name__)

Records = Sequence[Mapping[str, Any]]
MASK_FILE = "antidote_mask.safetensors"
REPORT_FILE = "realign_report.json"


@dataclass
class RealignResult:
    """What one realignment produced. `masks`: saved weight name -> bool (out, in), True = pruned.
    `model` holds the realigned weights in memory; `output` is the written folder, if any."""

    model: nn.Module
    tokenizer: Any
    masks: dict[str, torch.Tensor]
    report: dict[str, Any]
    output: Path | None = None


class _Timer:
    """Seconds spent per named phase, summed over repeats."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


# ---- steps ------------------------------------------------------------------------------------------


def check_finite_weights(targets: Mapping[str, nn.Linear]) -> None:
    for name, module in targets.items():
        if not torch.isfinite(module.weight).all():
            raise AntidoteError(
                f"weights of {name} contain NaN or inf; the model is corrupt or overflowed "
                "its dtype: reload it with --dtype float32 or re-export it"
            )


def check_finite_statistics(stats: Statistics) -> None:
    for name, s in stats.sq_sums.items():
        if not torch.isfinite(s).all():
            raise AntidoteError(
                f"calibration statistics of {name} are NaN or inf (activations overflowed); "
                "run with --dtype float32 or shorter --max-length"
            )


def reference_weights(
    reference: str, targets: Mapping[str, nn.Linear], *, dtype: str, trust_remote_code: bool
) -> dict[str, torch.Tensor]:
    """The aligned model's weights for each target, same names and shapes (kept on the CPU)."""
    ref = load_model(
        reference, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code, with_tokenizer=False
    )
    ref_modules = dict(ref.model.named_modules())
    weights = {}
    for name, module in targets.items():
        other = ref_modules.get(name)
        if not isinstance(other, nn.Linear) or other.weight.shape != module.weight.shape:
            got = tuple(other.weight.shape) if isinstance(other, nn.Linear) else "missing"
            raise AntidoteError(
                f"--reference {reference} does not match the model at {name} "
                f"({got} vs {tuple(module.weight.shape)}); pass the aligned model it was "
                "fine-tuned from"
            )
        weights[name] = other.weight.detach().clone()
    del ref
    return weights


def target_scores(
    targets: Mapping[str, nn.Linear],
    stats: Statistics,
    *,
    score: str = "wanda",
    benign: Statistics | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, scores (out, in) float32 on the weight's device) per target, computed on the fly.

    With `reference`, scores use the fine-tuning change |W - W_ref| in place of |W|.
    """
    for i, (name, module) in enumerate(targets.items()):
        weight = module.weight.detach()
        if reference is not None:
            weight = weight.float() - reference[name].to(weight.device).float()
        if score == "wanda":
            yield name, wanda_score(weight, stats.sq_sums[name])
        elif score == "magnitude":
            yield name, weight.float().abs()
        elif score == "random":
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            yield name, torch.rand(weight.shape, generator=gen).to(weight.device)
        elif score == "contrast":
            if benign is None:
                raise AntidoteError("--score contrast needs --benign-data FILE")
            yield name, contrast_score(weight, stats.sq_sums[name], benign.sq_sums[name])
        else:
            raise AntidoteError(f"unknown score {score!r}")


def iter_masks(
    targets: Mapping[str, nn.Linear],
    stats: Statistics,
    ratio: float,
    *,
    score: str = "wanda",
    granularity: str = "row",
    benign: Statistics | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (module name, bool mask (out, in) on the weight's device), one target at a time, True for
    the top-`ratio` scores. Only one tensor of scores exists at a time."""

    def scores() -> Iterator[tuple[str, torch.Tensor]]:
        return target_scores(targets, stats, score=score, benign=benign, reference=reference, seed=seed)

    if granularity == "row":
        yield from ((name, select_rows(s, ratio)) for name, s in scores())
    elif granularity == "layer":
        yield from ((name, select_tensor(s, ratio)) for name, s in scores())
    elif granularity == "global":
        sizes = [m.weight.numel() for m in targets.values()]
        take = select_global(lambda: (s for _, s in scores()), sizes, ratio)
        yield from ((name, take(i, s)) for i, (name, s) in enumerate(scores()))
    else:
        raise AntidoteError(f"unknown granularity {granularity!r}")


def compute_masks(
    targets: Mapping[str, nn.Linear], stats: Statistics, ratio: float, **options: Any
) -> dict[str, torch.Tensor]:
    """Module name -> bool mask (out, in) on the CPU; `options` as for `iter_masks`."""
    return {name: mask.cpu() for name, mask in iter_masks(targets, stats, ratio, **options)}


@torch.no_grad()
def apply_masks(
    targets: Mapping[str, nn.Linear],
    masks: Mapping[str, torch.Tensor],
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    keep_old: bool = False,
) -> dict[str, torch.Tensor]:
    """Set masked weights to zero (or to `reference`), in place. With `keep_old`, returns the old values
    of the masked entries per module (1-D), which `restore_masks` puts back; else an empty dict."""
    saved = {}
    for name, mask in masks.items():
        weight = targets[name].weight
        m = mask.to(weight.device)
        if keep_old:
            saved[name] = weight[m].clone()
        if reference is None:
            weight.masked_fill_(m, 0)
        else:
            weight[m] = reference[name].to(weight.device, weight.dtype)[m]
    return saved


@torch.no_grad()
def restore_masks(
    targets: Mapping[str, nn.Linear], masks: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]
) -> None:
    for name, mask in masks.items():
        weight = targets[name].weight
        weight[mask.to(weight.device)] = saved[name]


def peak_rss_mib() -> float:
    """VmHWM from /proc (ru_maxrss is inherited across fork+exec, so a child would report its parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory (MiB)."""
    out = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if torch.cuda.is_available():
        out["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def save_realigned(
    folder: Path,
    loaded: LoadedModel,
    masks: Mapping[str, PackedMask],
    report: Mapping[str, Any],
    *,
    merge: bool = False,
    keep_model: bool = True,
) -> None:
    """Write the model (adapter folder, merged model or full model), the mask file, report and card.

    `keep_model=False` lets a merge reuse the in-memory model (it is destroyed); otherwise a merge
    works on a copy.
    """
    model = loaded.model
    if loaded.adapter and merge:
        merged = (copy.deepcopy(model) if keep_model else model).merge_and_unload()  # type: ignore[operator]
        merged.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    else:
        model.save_pretrained(folder)  # type: ignore[operator]
        if not loaded.adapter:
            loaded.tokenizer.save_pretrained(folder)
    write_mask_file(folder / MASK_FILE, masks)
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(report))


def model_card(report: Mapping[str, Any]) -> str:
    c = report["config"]
    total = report["pruned_total"]
    return f"""---
tags: [antidote, safety, realignment]
---
# Realigned with antidote

This model is `{c["model"]}`{f" with adapter `{c['adapter']}`" if c["adapter"] else ""} after Antidote
realignment (Huang et al., arXiv 2408.09600): every targeted weight was scored by its importance on
harmful prompt+answer pairs and the top {report["mask_ratio"]:.4g} fraction
({report["granularity"]} granularity, `{report["score"]}` score) was {
        "zeroed" if report["action"] == "zero" else "reverted to the reference model"
    }.

- Calibration data: `{c["data"]}`, {report["calibration"]["samples"]} samples,
  {report["calibration"]["tokens"]} tokens, template `{c["template"]}`.
- Pruned: {total["pruned"]} of {total["total"]} targeted weights in {len(report["tensors"])} tensors.
- `{MASK_FILE}` holds the mask of each pruned weight (True = pruned); `{REPORT_FILE}` the full record.

Zeroed weights are stored as zeros: the files are as large as before.
Check the model's harmful score and task accuracy before use: pruning trades some task accuracy for safety.
"""


# ---- orchestration ------------------------------------------------------------------------------------


def _prepare(
    config: RealignConfig, model: LoadedModel | None, records: Records | None, timer: _Timer
) -> tuple[LoadedModel, dict[str, nn.Linear], Statistics, Statistics | None, dict[str, torch.Tensor] | None]:
    with timer.phase("load"):
        loaded = model or load_model(
            config.model,
            adapter=config.adapter,
            dtype=config.dtype,
            device=config.device,
            trust_remote_code=config.trust_remote_code,
        )
    with timer.phase("data"):
        examples = load_examples(
            config.data if records is None else records,
            filters=config.filters,
            max_samples=config.max_samples,
            seed=config.seed,
        )
        sequences = tokenize_examples(examples, loaded.tokenizer, config.template, config.max_length)
        benign_sequences = None
        if config.score == "contrast" and config.benign_data:
            benign = load_examples(config.benign_data, max_samples=config.max_samples, seed=config.seed)
            benign_sequences = tokenize_examples(benign, loaded.tokenizer, config.template, config.max_length)
    targets = find_targets(loaded.model, adapter_name=loaded.adapter_name, pattern=config.targets)
    check_finite_weights(targets)
    pad_id = loaded.tokenizer.pad_token_id or 0
    device = loaded.model.get_input_embeddings().weight.device  # type: ignore[operator]
    compute_dtype = resolve_compute_dtype(config.compute_dtype, device)
    with timer.phase("calibrate"):
        stats = collect_statistics(
            loaded.model,
            targets,
            sequences,
            batch_size=config.batch_size,
            pad_id=pad_id,
            compute_dtype=compute_dtype,
        )
        benign_stats = None
        if benign_sequences is not None:
            benign_stats = collect_statistics(
                loaded.model,
                targets,
                benign_sequences,
                batch_size=config.batch_size,
                pad_id=pad_id,
                compute_dtype=compute_dtype,
                desc="benign",
            )
    check_finite_statistics(stats)
    if benign_stats is not None:
        check_finite_statistics(benign_stats)
    ref = None
    if config.action == "revert" and config.reference:
        with timer.phase("reference"):
            ref = reference_weights(
                config.reference, targets, dtype=config.dtype, trust_remote_code=config.trust_remote_code
            )
    return loaded, targets, stats, benign_stats, ref


def _report(
    config: RealignConfig,
    ratio: float,
    loaded: LoadedModel,
    masks: Mapping[str, PackedMask],
    stats: Statistics,
    timer: _Timer,
) -> dict[str, Any]:
    tensors = {
        name: {"pruned": m.pruned, "total": m.numel, "fraction": round(m.pruned / m.numel, 6)}
        for name, m in masks.items()
    }
    pruned = sum(t["pruned"] for t in tensors.values())
    total = sum(t["total"] for t in tensors.values())
    return {
        "mask_ratio": ratio,
        "score": config.score,
        "granularity": config.granularity,
        "action": config.action,
        "targets": config.targets
        or ("adapter lora_A/lora_B" if loaded.adapter else "all Linear except lm_head"),
        "pruned_total": {"pruned": pruned, "total": total, "fraction": round(pruned / max(total, 1), 6)},
        "tensors": tensors,
        "calibration": {
            "samples": stats.samples,
            "tokens": stats.tokens,
            "compute_dtype": stats.compute_dtype,
        },
        "seconds": dict(timer.seconds),
        "memory": peak_memory(),
        "config": {**config.to_dict(), "model": loaded.source, "resolved_model_folder": loaded.folder},
    }


def run_realign(
    config: RealignConfig,
    model: LoadedModel | None = None,
    records: Records | None = None,
    *,
    keep_masks: bool = True,
) -> list[RealignResult]:
    """Run a whole config: one calibration pass, then one result (and output folder) per mask ratio."""
    out = None
    if config.output:
        inputs = tuple(p for p in (config.model, config.adapter, config.data, config.reference) if p)
        out = check_output_dir(config.output, config.overwrite, inputs)
    timer = _Timer()
    loaded, targets, stats, benign_stats, ref = _prepare(config, model, records, timer)
    names = {name: saved_name(name, loaded.adapter_name) for name in targets}
    sweep = len(config.mask_ratios) > 1
    results = []

    def write(folder: Path) -> None:
        for i, ratio in enumerate(config.mask_ratios):
            last = i == len(config.mask_ratios) - 1
            packed: dict[str, PackedMask] = {}
            old: dict[str, torch.Tensor] = {}
            with timer.phase("prune"):  # score, select and apply one tensor at a time
                for name, mask in iter_masks(
                    targets,
                    stats,
                    ratio,
                    score=config.score,
                    granularity=config.granularity,
                    benign=benign_stats,
                    reference=ref,
                    seed=config.seed,
                ):
                    old.update(apply_masks(targets, {name: mask}, reference=ref, keep_old=not last))
                    packed[names[name]] = PackedMask.pack(mask)
            report = _report(config, ratio, loaded, packed, stats, timer)
            target_dir = folder / f"alpha-{ratio:g}" if sweep else folder
            if out is not None:
                with timer.phase("save"):
                    target_dir.mkdir(exist_ok=True)
                    # A merge destroys the in-memory adapter model: work on a copy unless nobody needs it.
                    keep_model = keep_masks or not last
                    save_realigned(
                        target_dir, loaded, packed, report, merge=config.merge, keep_model=keep_model
                    )
                report["seconds"] = dict(timer.seconds)
                report["memory"] = peak_memory()
                (target_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
            if not last:
                by_saved = {saved: module for module, saved in names.items()}
                for saved, bits in packed.items():
                    restore_masks(targets, {by_saved[saved]: bits.unpack()}, old)
            total = report["pruned_total"]
            log.info("alpha %g: pruned %d of %d weights", ratio, total["pruned"], total["total"])
            masks = {k: m.unpack() for k, m in packed.items()} if keep_masks else {}
            output = out / target_dir.name if sweep and out else out
            results.append(RealignResult(loaded.model, loaded.tokenizer, masks, report, output))

    if out is None:
        write(Path("."))
    else:
        with atomic_output_dir(out, config.overwrite) as tmp:
            write(tmp)
            if sweep:
                summary = [{k: r.report[k] for k in ("mask_ratio", "pruned_total")} for r in results]
                (tmp / "sweep_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def realign(
    model: str | LoadedModel, data: str | Records = "", *, mask_ratio: float = 0.1, **options: Any
) -> RealignResult:
    """Realign a fine-tuned model: prune the weights most important on harmful data.

    model: a model spec (HF folder, hub id, .gguf, `smollm2-135m-instruct`) or a `LoadedModel`.
    data: harmful prompt+answer pairs (file path, `hf:NAME`, or a list of dicts).
    options: any `RealignConfig` field (score, granularity, action, adapter, output, ...).
    Returns the realigned model (in memory, and in `output` when given), its masks and report.
    """
    return _realign(model, data, (mask_ratio,), options, keep_masks=True)[0]


def realign_sweep(
    model: str | LoadedModel,
    data: str | Records = "",
    *,
    mask_ratios: Sequence[float] = (0.01, 0.05, 0.1),
    **options: Any,
) -> list[RealignResult]:
    """One calibration pass, one output per mask ratio (`output/alpha-<ratio>/`). Returns the reports;
    masks are on disk, not kept in memory. The in-memory model ends at the last ratio (with
    `merge=True`, merged into its base model)."""
    return _realign(model, data, tuple(mask_ratios), options, keep_masks=False)


def _realign(
    model: str | LoadedModel,
    data: str | Records,
    ratios: tuple[float, ...],
    options: dict[str, Any],
    keep_masks: bool,
) -> list[RealignResult]:
    loaded = model if isinstance(model, LoadedModel) else None
    records = None if isinstance(data, str) else list(data)
    if loaded is not None and loaded.adapter:
        options = {"adapter": loaded.adapter, **options}
    config = RealignConfig(
        model=loaded.source if loaded else str(model),
        data=data if isinstance(data, str) else "<in-memory records>",
        mask_ratios=ratios,
        **options,
    )
    if loaded is not None and config.adapter and config.adapter != loaded.adapter:
        raise AntidoteError("pass the adapter to load_model(), not to realign(), when giving a loaded model")
    if not config.data:
        raise AntidoteError("no calibration data; pass --data FILE with harmful prompt+answer pairs")
    return run_realign(config, loaded, records, keep_masks=keep_masks)
