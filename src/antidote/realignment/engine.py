"""Antidote realignment: calibrate on harmful data, score every target weight, prune the top fraction.

A run is a straight loop: `prepare` (load the model, targets, reference, data; check them) ->
`calibrate` (one forward pass) -> for each mask ratio: `prune` (score, select, apply one tensor at a
time) -> save -> `restore`. The steps compose for power users: `load_model` -> `tokenize_examples` ->
`find_targets` -> `collect_statistics` -> `compute_masks` -> `apply_masks` -> `save_realigned`.

Public entry points: `realign()` (one ratio, returns the model and its masks), `realign_sweep()` (one
output per ratio from one calibration pass) and `run_realign()` (a whole config: the CLI, the pipeline).
With `sequential`, `run_realign` and `realign_sweep` stream the model block by block from disk
(`sequential.py`); launched with several processes, calibration is data-parallel (`distributed.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from antidote.data.catalog import check_source
from antidote.errors import AntidoteError
from antidote.memory import peak_memory
from antidote.models import LoadedModel, load_model, wrap_model
from antidote.outputs import atomic_output_dir
from antidote.realignment.calibrate import (
    Parallel,
    Statistics,
    collect_statistics,
    resolve_compute_dtype,
)
from antidote.realignment.config import RealignConfig
from antidote.realignment.distributed import data_parallel, run_digest, weights_digest
from antidote.realignment.maskfile import PackedMask
from antidote.realignment.reference import reference_weights
from antidote.realignment.save import (
    build_report,
    ratio_folder,
    save_realigned,
    write_report,
    write_sweep_report,
)
from antidote.realignment.scores import SCORES
from antidote.realignment.steps import (
    Records,
    SweepResult,
    Timer,
    apply_masks,
    check_finite_statistics,
    check_finite_weights,
    checked_output,
    compute_masks,
    iter_masks,
    load_sequences,
    restore_masks,
    target_scores,
)
from antidote.realignment.targets import find_targets, saved_name

__all__ = [  # the steps re-exported here keep `engine.compute_masks` etc. where users found them
    "Calibration",
    "Prepared",
    "Pruned",
    "RealignResult",
    "SweepResult",
    "apply_masks",
    "calibrate",
    "check_finite_statistics",
    "check_finite_weights",
    "compute_masks",
    "iter_masks",
    "prepare",
    "prune",
    "realign",
    "realign_sweep",
    "restore",
    "restore_masks",
    "run_realign",
    "target_scores",
]

log = logging.getLogger(__name__)

# What happens to the in-memory model after a ratio's output is saved: its weights are restored (the
# next ratio starts from the fine-tuned model), kept pruned (returned to the caller), or discarded
# (nobody uses it again, so a merge may consume it instead of copying it).
Then = Literal["restore", "keep", "discard"]


@dataclass
class RealignResult:
    """What one realignment (one mask ratio) produced. `masks`: saved weight name -> bool (out, in),
    True = pruned. `model` holds the realigned weights in memory; `output` is the written folder, if any."""

    model: nn.Module
    tokenizer: Any
    masks: dict[str, torch.Tensor]
    report: dict[str, Any]
    output: Path | None = None


@dataclass
class Prepared:
    """Everything calibration and pruning need, loaded and checked.

    targets: module name -> Linear to prune; saved_names: module name -> the weight's saved name;
    sequences / benign_sequences: token ids per sample; reference: module name -> the aligned model's
    weight (out, in) on the CPU, for `action="revert"`.
    """

    loaded: LoadedModel
    targets: dict[str, nn.Linear]
    saved_names: dict[str, str]
    sequences: list[list[int]]
    benign_sequences: list[list[int]] | None = None
    reference: dict[str, torch.Tensor] | None = None


@dataclass
class Calibration:
    """Input statistics of every target on the harmful data (and on the benign data, if scored)."""

    harmful: Statistics
    benign: Statistics | None = None


@dataclass
class Pruned:
    """One ratio's masks, applied to the model. masks: module name -> packed bool (out, in);
    old: module name -> the masked entries' values before (1-D), only when asked for."""

    ratio: float
    masks: dict[str, PackedMask]
    old: dict[str, torch.Tensor] = field(default_factory=dict)


# ---- the steps of a run --------------------------------------------------------------------------------


def prepare(
    config: RealignConfig,
    model: LoadedModel | None = None,
    records: Records | None = None,
    timer: Timer | None = None,
) -> Prepared:
    """Load and check everything before calibration: the model (unless given), the targets (a
    `--targets` pattern that matches no Linear layer stops here), the reference and the data."""
    timer = timer or Timer()
    if records is None and SCORES[config.score].needs_data:  # a missing file is said before the weights load
        check_source(config.data, "--data file")
        if SCORES[config.score].needs_benign and config.benign_data:
            check_source(config.benign_data, "--benign-data file")
    with timer.phase("load"):
        loaded = model or load_model(
            config.model,
            adapter=config.adapter,
            dtype=config.dtype,
            device=config.device,
            trust_remote_code=config.trust_remote_code,
        )
    targets = find_targets(loaded.model, adapter_name=loaded.adapter_name, pattern=config.targets)
    check_finite_weights(targets)
    reference = None
    if config.action == "revert" and config.reference:
        with timer.phase("reference"):
            reference = reference_weights(
                config.reference, targets, dtype=config.dtype, trust_remote_code=config.trust_remote_code
            )
    with timer.phase("data"):
        sequences, benign_sequences = load_sequences(config, loaded.tokenizer, records)
    return Prepared(
        loaded=loaded,
        targets=targets,
        saved_names={name: saved_name(name, loaded.adapter_name) for name in targets},
        sequences=sequences,
        benign_sequences=benign_sequences,
        reference=reference,
    )


def calibrate(
    config: RealignConfig,
    prepared: Prepared,
    timer: Timer | None = None,
    parallel: Parallel | None = None,
) -> Calibration:
    """One forward pass over the harmful data (and one over the benign data, if the score needs it).
    With `parallel`, each process runs its share and all get the same statistics."""
    timer = timer or Timer()
    model = prepared.loaded.model
    pad_id = prepared.loaded.tokenizer.pad_token_id or 0
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    compute_dtype = resolve_compute_dtype(config.compute_dtype, device)

    def statistics(sequences: list[list[int]], desc: str) -> Statistics:
        stats = collect_statistics(
            model,
            prepared.targets,
            sequences,
            batch_size=config.batch_size,
            pad_id=pad_id,
            compute_dtype=compute_dtype,
            desc=desc,
            parallel=parallel,
        )
        check_finite_statistics(stats)
        return stats

    if not SCORES[config.score].needs_data:
        return Calibration(Statistics({}, samples=0, tokens=0, compute_dtype="none"))
    with timer.phase("calibrate"):
        harmful = statistics(prepared.sequences, "calibrating")
        benign = None
        if prepared.benign_sequences is not None:
            benign = statistics(prepared.benign_sequences, "benign")
    return Calibration(harmful, benign)


def prune(
    config: RealignConfig, prepared: Prepared, calibration: Calibration, ratio: float, *, keep_old: bool
) -> Pruned:
    """Score, select and apply the masks of one ratio, one target tensor at a time."""
    pruned = Pruned(ratio, {})
    for name, mask in iter_masks(
        prepared.targets,
        calibration.harmful,
        ratio,
        score=config.score,
        granularity=config.granularity,
        benign=calibration.benign,
        reference=prepared.reference,
        seed=config.seed,
    ):
        pruned.old.update(
            apply_masks(prepared.targets, {name: mask}, reference=prepared.reference, keep_old=keep_old)
        )
        pruned.masks[name] = PackedMask.pack(mask)
    return pruned


def restore(prepared: Prepared, pruned: Pruned) -> None:
    """Undo `prune(..., keep_old=True)`: the targets hold their fine-tuned weights again."""
    for name, packed in pruned.masks.items():
        restore_masks(prepared.targets, {name: packed.unpack()}, pruned.old)


# ---- orchestration --------------------------------------------------------------------------------------


@dataclass
class _Run:
    prepared: Prepared
    reports: list[dict[str, Any]]
    last: Pruned  # the last ratio's masks
    output: Path | None


def _run(config: RealignConfig, model: LoadedModel | None, records: Records | None, last: Then) -> _Run:
    """prepare -> calibrate -> for each ratio: prune, save, then restore (`last` for the last ratio).
    Under a multi-process launch, every process calibrates its share; rank 0 alone goes on."""
    with data_parallel() as parallel:
        if parallel is not None:
            config = dataclasses.replace(config, device=parallel.device(config.device))
        leader = parallel is None or parallel.leader
        out = checked_output(config) if leader else None
        timer = Timer()
        prepared = prepare(config, model, records, timer)
        if parallel is not None:  # every process must calibrate the same thing
            parallel.check_same(
                "settings or data", run_digest(config, prepared.sequences, prepared.benign_sequences)
            )
            parallel.check_same("model weights", weights_digest(prepared.targets))
        calibration = calibrate(config, prepared, timer, parallel)
        if not leader:
            return _Run(prepared, [], Pruned(0.0, {}), None)
        return _prune_and_save(config, prepared, calibration, out, timer, last)


def _prune_and_save(
    config: RealignConfig,
    prepared: Prepared,
    calibration: Calibration,
    out: Path | None,
    timer: Timer,
    last: Then,
) -> _Run:
    ratios = config.mask_ratios
    reports = []
    writing = atomic_output_dir(out, config.overwrite, what="antidote realign") if out else None
    with writing or contextlib.nullcontext() as tmp:
        for i, ratio in enumerate(ratios):
            then: Then = last if i == len(ratios) - 1 else "restore"
            with timer.phase("prune"):
                pruned = prune(config, prepared, calibration, ratio, keep_old=then == "restore")
            masks = {prepared.saved_names[name]: m for name, m in pruned.masks.items()}
            report = build_report(
                config,
                ratio,
                prepared.loaded,
                masks,
                calibration.harmful,
                seconds=timer.seconds,
                memory=peak_memory(),
            )
            if tmp is not None:
                folder = tmp / ratio_folder(ratio) if len(ratios) > 1 else tmp
                with timer.phase("save"):
                    folder.mkdir(exist_ok=True)
                    save_realigned(
                        folder,
                        prepared.loaded,
                        masks,
                        report,
                        merge=config.merge,
                        keep_model=then != "discard",
                    )
                report["seconds"], report["memory"] = dict(timer.seconds), peak_memory()
                write_report(folder, report)  # again, now with the time the save took
            if then == "restore":
                restore(prepared, pruned)
            total = report["pruned_total"]
            log.info("alpha %g: pruned %d of %d weights", ratio, total["pruned"], total["total"])
            reports.append(report)
        if tmp is not None and len(ratios) > 1:
            write_sweep_report(tmp, reports)
    return _Run(prepared, reports, pruned, out)


def run_realign(
    config: RealignConfig, model: LoadedModel | None = None, records: Records | None = None
) -> SweepResult:
    """Run a whole config (the CLI and the pipeline): one calibration pass, then one output per mask
    ratio (`output/alpha-<ratio>/` when there are several). A model passed in is used up: it ends
    pruned at the last ratio, or merged into its base model with `merge`. With `config.sequential`,
    the model is streamed from disk block by block and `model` must be None."""
    if config.push_to_hub and not config.output:
        raise AntidoteError("--push-to-hub uploads the written model: give --output DIR too")
    if config.sequential:
        result = _sequential(config, model, records)
    else:
        run = _run(config, model, records, last="discard")
        result = SweepResult(run.reports, run.output)
    if config.push_to_hub and result.reports and result.output is not None:  # rank 0 wrote it
        from antidote.realignment.save import push_to_hub

        log.info("pushed to %s", push_to_hub(result.output, config.push_to_hub))
    return result


def realign(
    model: Any, data: str | Records = "", *, mask_ratio: float = 0.1, **options: Any
) -> RealignResult:
    """Realign a fine-tuned model: prune the weights most important on harmful data.

    model: a model spec (HF folder, hub id, .gguf, `smollm2-135m-instruct`), a `LoadedModel`, or a
    transformers/PEFT model object (then `tokenizer=` too, unless it was loaded from a local folder).
    data: harmful prompt+answer pairs (file path, `hf:NAME`, or a list of dicts).
    options: any `RealignConfig` field (score, granularity, action, adapter, output, ...).
    Returns the realigned model (in memory, and in `output` when given), its masks and report.
    """
    loaded, records, config = _config(model, data, (mask_ratio,), options)
    if config.sequential:
        raise AntidoteError(
            "realign() returns the model in memory, which sequential=True never holds; use "
            "realign_sweep(..., sequential=True, output=DIR) or run_realign"
        )
    run = _run(config, loaded, records, last="keep")
    masks = {run.prepared.saved_names[name]: m.unpack() for name, m in run.last.masks.items()}
    model_out = run.prepared.loaded
    return RealignResult(model_out.model, model_out.tokenizer, masks, run.reports[0], run.output)


def realign_sweep(
    model: Any,
    data: str | Records = "",
    *,
    mask_ratios: Sequence[float] = (0.01, 0.05, 0.1),
    **options: Any,
) -> SweepResult:
    """One calibration pass, one output per mask ratio (`output/alpha-<ratio>/`). Returns the reports;
    the masks are on disk, not kept in memory. The in-memory model is left as it was (merges are made
    on copies)."""
    loaded, records, config = _config(model, data, tuple(mask_ratios), options)
    if config.sequential:
        return _sequential(config, loaded, records)
    run = _run(config, loaded, records, last="restore")
    return SweepResult(run.reports, run.output)


def _sequential(config: RealignConfig, model: LoadedModel | None, records: Records | None) -> SweepResult:
    if model is not None:
        raise AntidoteError(
            "sequential realignment reads the model from disk block by block; pass its folder "
            "or name, not a loaded model"
        )
    from antidote.realignment.sequential import run_sequential

    return run_sequential(config, records)


def _config(
    model: Any, data: str | Records, ratios: tuple[float, ...], options: dict[str, Any]
) -> tuple[LoadedModel | None, list[Mapping[str, Any]] | None, RealignConfig]:
    """The Python API's arguments -> (the loaded model if given, in-memory records if given, config)."""
    options = dict(options)
    tokenizer = options.pop("tokenizer", None)
    if isinstance(model, str | Path):
        if tokenizer is not None:
            raise AntidoteError("tokenizer= goes with a model object; a named model brings its own")
        loaded = None
    else:
        loaded = wrap_model(model, tokenizer)
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
    return loaded, records, config
