"""`antidote judge train`: featurise labelled pairs with the frozen base model, fit the learned judge and
write its folder (atomically). One --data file: `learned_training.choose_and_fit` on a validation split by
prompt. Several sources (--data-dir, or --data A,B,...): `learned_sources.choose_across_sources`,
leave-one-source-out. The options are `judge_config.JudgeTrainConfig`."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.errors import AntidoteError

if TYPE_CHECKING:
    from antidote.evaluation.judge_config import JudgeEvalConfig, JudgeTrainConfig
    from antidote.evaluation.judge_sources import Pair

log = logging.getLogger(__name__)


def read_labelled(config: JudgeEvalConfig | JudgeTrainConfig, data: str | None = None) -> Any:
    """The labelled pairs of `data` (default: config.data), read with the config's label options."""
    from antidote.evaluation.agreement import load_labelled, parse_labels

    return load_labelled(
        config.data if data is None else data,
        label_field=config.label_field,
        harmful_labels=parse_labels(config.harmful_labels),
        safe_labels=parse_labels(config.safe_labels),
    )


def run_judge_train(config: JudgeTrainConfig) -> dict[str, Any]:
    """Featurise, choose on the validation split, fit, and write the judge folder (atomically); several
    sources go to `run_judge_train_sources`."""
    import torch

    from antidote import __version__
    from antidote.evaluation.judges import learned, learned_training
    from antidote.models.loading import resolve_model_folder
    from antidote.outputs import atomic_output_dir, check_output_dir

    if config.data_dir or "," in config.data:
        return run_judge_train_sources(config)
    data = read_labelled(config)  # the input is checked before any folder is made
    folder = resolve_model_folder(config.model)
    if not config.output:
        config.output = str(learned.default_judge_folder())
        learned.default_judge_folder().parent.mkdir(parents=True, exist_ok=True)
    out = check_output_dir(config.output, config.overwrite, inputs=(config.data,))
    rows = learned_training.sample_by_prompt(data.prompts, config.max_samples or len(data), config.seed + 1)
    prompts = [data.prompts[i] for i in rows]
    responses = [data.responses[i] for i in rows]
    labels = torch.tensor([data.harmful[i] for i in rows])
    train_idx, val_idx = learned_training.split_by_prompt(prompts, config.validation_fraction, config.seed)
    for name, idx in (("training", train_idx), ("validation", val_idx)):
        if len(idx) < 2 or len({bool(labels[i]) for i in idx}) < 2:
            raise AntidoteError(
                f"the {name} split of {config.data} ({len(idx)} rows) lacks one class; give more rows "
                "or change --validation-fraction"
            )
    features, meta, timing = featurise(config, folder, prompts, responses, config.layers, config.poolings)
    keyword = {"auto": (False, True), "yes": (True,), "no": (False,)}[config.keyword_feature]
    trained = learned_training.choose_and_fit(
        features, responses, labels, train_idx, val_idx, l2s=config.l2, keyword_options=keyword
    )
    meta = {
        **meta,
        "training": {
            "data": str(Path(config.data).expanduser().resolve()),
            "rows": len(rows),
            "rows_in_file": len(data),
            "train_rows": len(train_idx),
            "validation_rows": len(val_idx),
            "validation_prompts": len({" ".join(prompts[i].split()) for i in val_idx}),
            "seed": config.seed,
            "label_field": config.label_field,
            "harmful_labels": config.harmful_labels,
            "safe_labels": config.safe_labels,
            "candidate_layers": list(config.layers),
            **timing,
        },
        "antidote_version": __version__,
        "config": asdict(config),
    }
    with atomic_output_dir(out, config.overwrite) as tmp:
        learned_training.save_judge(tmp, trained, meta)
    return json.loads((out / learned.JUDGE_FILE).read_text())


def training_sources(config: JudgeTrainConfig) -> list[Pair]:
    """The labelled pairs of every source: the built-in recipes of --data-dir, or one source per file of
    --data (named by the file's stem), each a seeded sample of --per-source pairs."""
    from antidote.evaluation.judge_sources import Pair, load_source

    if config.data_dir:
        return [
            p for s in config.sources for p in load_source(config.data_dir, s, config.per_source, config.seed)
        ]
    pairs: list[Pair] = []
    for file in (f.strip() for f in config.data.split(",") if f.strip()):
        data = read_labelled(config, file)
        rows = [
            Pair(p, r, bool(h), Path(file).stem)
            for p, r, h in zip(data.prompts, data.responses, data.harmful, strict=True)
        ]
        if len(rows) > config.per_source:
            rows = random.Random(f"{config.seed}:{file}").sample(rows, config.per_source)
        pairs.extend(rows)
    return pairs


def run_judge_train_sources(config: JudgeTrainConfig) -> dict[str, Any]:
    """Several sources: featurise every pair once, choose the head and L2 and set the threshold by
    leave-one-source-out over the training sources (`learned_sources.choose_across_sources`), fit on all of
    them, and write the judge folder (atomically)."""
    import torch

    from antidote import __version__
    from antidote.evaluation.judges import learned, learned_sources
    from antidote.models.loading import resolve_model_folder
    from antidote.outputs import atomic_output_dir, check_output_dir

    inputs = tuple(f.strip() for f in config.data.split(",") if f.strip())
    pairs = training_sources(config)  # the input is checked before any folder is made
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.source] = counts.get(p.source, 0) + 1
    labels = torch.tensor([p.harmful for p in pairs])
    if len(counts) < 2 or len(set(labels.tolist())) < 2:
        raise AntidoteError(
            f"training on several sources needs at least 2 sources and both classes; got {counts} with "
            f"{int(labels.sum())} harmful rows"
        )
    folder = resolve_model_folder(config.model)
    if not config.output:
        config.output = str(learned.default_judge_folder())
        learned.default_judge_folder().parent.mkdir(parents=True, exist_ok=True)
    out = check_output_dir(config.output, config.overwrite, inputs=(*inputs, config.data_dir or None))
    blocks = [(int(b.split(":")[0]), b.split(":")[1]) for b in config.blocks]
    choices = {"auto": (False, True), "yes": (True,), "no": (False,)}
    specs = [
        learned_sources.HeadSpec(tuple(blocks), keyword_feature=k, hidden=h, l2s=config.l2, keyword_gate=gate)
        for h in config.hidden
        for k in choices[config.keyword_feature]
        for gate in choices[config.keyword_gate]
    ]
    poolings = sorted({pooling for _, pooling in blocks})
    layer_numbers = sorted({layer for layer, _ in blocks})
    prompts, responses = [p.prompt for p in pairs], [p.response for p in pairs]
    features, meta, timing = featurise(config, folder, prompts, responses, layer_numbers, poolings)
    fit = learned_sources.choose_across_sources(
        specs,
        features,
        responses,
        labels,
        [p.source for p in pairs],
        config.seed,
        [p.harmful_prompt for p in pairs],
    )
    meta = {
        **meta,
        "training": {
            "data": str(Path(config.data_dir).expanduser().resolve()) if config.data_dir else list(inputs),
            "sources": counts,
            "harmful_rows": int(labels.sum()),
            "seed": config.seed,
            **timing,
        },
        "antidote_version": __version__,
        "config": asdict(config),
    }
    with atomic_output_dir(out, config.overwrite) as tmp:
        learned_sources.save_source_judge(tmp, fit, meta)
    return json.loads((out / learned.JUDGE_FILE).read_text())


def featurise(
    config: JudgeTrainConfig,
    folder: str,
    prompts: list[str],
    responses: list[str],
    layers: Sequence[int],
    poolings: Sequence[str],
) -> tuple[dict[tuple[int, str], Any], dict[str, Any], dict[str, Any]]:
    """The base model's features of the pairs (`learned_features.hidden_features`), the judge record's
    fields that describe that model and layout, and the featurising time (all threads' CPU time beside the
    wall time: under contention wall > CPU / threads)."""
    import torch
    from transformers import AutoTokenizer

    from antidote.evaluation.judges import learned, learned_features
    from antidote.models import layers as model_layers
    from antidote.models.loading import load_model

    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = model_layers.resolve_dtype(config.dtype, config.device)
    loaded = load_model(folder, device=config.device, dtype=dtype, with_tokenizer=False)
    _, blocks = model_layers.decoder_layers(loaded.model)
    start, cpu_start = time.perf_counter(), time.process_time()
    features = learned_features.hidden_features(
        loaded.model,
        tokenizer,
        prompts,
        responses,
        layers=layers,
        prompt_format=config.prompt_format,
        max_length=config.max_length,
        batch_size=config.batch_size,
        poolings=poolings,
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    log.info("featurised %d pairs in %.1f s (%.1f CPU s)", len(prompts), seconds, cpu_seconds)
    given = Path(config.model).expanduser()
    meta = {
        "base_model": str(given.resolve()) if given.exists() else config.model,
        "base_model_key": learned.weights_key(folder),
        "num_layers": len(blocks),
        "prompt_format": config.prompt_format,
        "prompt_format_key": learned_features.prompt_format_key(tokenizer, config.prompt_format),
        "max_length": config.max_length,
        "dtype": dtype,
    }
    timing = {
        "featurise_seconds": round(seconds, 1),
        "featurise_cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return features, meta, timing
