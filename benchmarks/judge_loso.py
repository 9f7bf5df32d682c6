"""Leave-one-source-out evaluation of the learned judge against the keyword judge.

Usage:
    python benchmarks/judge_loso.py --data-dir DATA [--cache /tmp/judge_feats] [--per-source 400] [--seed 0]
        [--prompt] [--recipes old,prompt,...] [--output loso.json] [--extract-only] [--speed N]

For every source of `antidote.evaluation.judge_sources` (PKU-SafeRLHF, XSTest, BeaverTails unsafe answers,
refusals, AlpacaEval helpful answers): train each recipe on the other sources, judge the held-out source,
and print keyword accuracy, learned accuracy, human HS, keyword HS - human and learned HS - human, each with
a 95% interval (Wilson for accuracies and HS, percentile bootstrap of the paired difference for HS gaps),
and the speed of feature extraction (pairs per second of one thread).

Features (hidden states of the frozen base model, several layers, mean and last pooling over response
tokens) are computed once per source at 1 torch thread and cached under --cache, so recipes and ablations
reuse them. Settings inside a recipe (L2, threshold) are chosen by an inner leave-one-source-out over the
training sources only: the held-out source is never looked at before it is scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from antidote.evaluation.judge_config import JudgeTrainConfig
from antidote.evaluation.judge_sources import DEFAULT_SOURCES, Pair, load_source
from antidote.evaluation.judges import learned_features, learned_sources, learned_training
from antidote.evaluation.judges.keyword import keyword_verdict
from antidote.evaluation.stats import bootstrap_interval, wilson_interval
from antidote.models import layers as model_layers
from antidote.outputs import json_text

LAYERS = (3, 6, 9, 12, 15, 18, 21, 24)
log = logging.getLogger("judge_loso")


def cache_key(args: argparse.Namespace, source: str) -> str:
    text = json.dumps([source, args.per_source, args.seed, args.max_length, LAYERS, args.model, args.dtype])
    return f"{source}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def features_for(
    args: argparse.Namespace, source: str, pairs: list[Pair], model: Any, tokenizer: Any
) -> dict:
    """{'feats': {(layer, pooling): (n, d)}, 'seconds': s, 'tokens': t} for a source, cached in chunks."""
    folder = Path(args.cache) / cache_key(args, source)
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "all.pt"
    if done.is_file():
        return torch.load(done, weights_only=True)
    chunks, seconds = [], 0.0
    for start in range(0, len(pairs), args.chunk):
        part = folder / f"chunk{start:05d}.pt"
        if not part.is_file():
            batch = pairs[start : start + args.chunk]
            t0 = time.perf_counter()
            feats = learned_features.hidden_features(
                model,
                tokenizer,
                [p.prompt for p in batch],
                [p.response for p in batch],
                layers=LAYERS,
                max_length=args.max_length,
                batch_size=4,
                progress=False,
            )
            elapsed = time.perf_counter() - t0
            torch.save({"feats": {f"{k[0]}:{k[1]}": v for k, v in feats.items()}, "seconds": elapsed}, part)
            log.info(
                "%s: %d/%d pairs, %.1f s (%.2f pairs/s)",
                source,
                start + len(batch),
                len(pairs),
                elapsed,
                len(batch) / elapsed,
            )
        chunks.append(torch.load(part, weights_only=True))
    keys = chunks[0]["feats"].keys()
    merged = {k: torch.cat([c["feats"][k] for c in chunks]) for k in keys}
    seconds = sum(float(c["seconds"]) for c in chunks)
    out = {"feats": merged, "seconds": seconds, "n": len(pairs)}
    torch.save(out, done)
    return out


PROMPT_LAYERS = (12, 24)


def prompt_features(
    args: argparse.Namespace, source: str, pairs: list[Pair], model: Any, tokenizer: Any
) -> dict:
    """{(layer, 'prompt'): (n, d)} for PROMPT_LAYERS, cached. With a causal model the hidden states of the
    prompt tokens do not depend on the response, so the forward runs on the prompt part of each encoded
    pair only (the same token ids `hidden_features` sees), once per distinct prompt part: the same
    numbers as `hidden_features(..., poolings=("prompt",))` at a fraction of the cost."""
    path = Path(args.cache) / cache_key(args, source) / "prompt.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        return {(int(k), "prompt"): v for k, v in torch.load(path, weights_only=True).items()}
    heads: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pairs):
        ids, start = learned_features.encode_pair(tokenizer, p.prompt, p.response, "chat", args.max_length)
        heads.setdefault(tuple(ids[:start]), []).append(i)
    keys = list(heads)
    out = {layer: torch.zeros(len(pairs), model.config.hidden_size) for layer in PROMPT_LAYERS}
    t0 = time.perf_counter()
    decoder, blocks = learned_features.decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        blocks[layer - 1].register_forward_hook(
            lambda m, a, o, layer=layer: captured.__setitem__(layer, o[0] if isinstance(o, tuple) else o)
        )
        for layer in PROMPT_LAYERS
    ]
    pooled = {layer: torch.zeros(len(keys), model.config.hidden_size) for layer in PROMPT_LAYERS}
    try:
        with torch.inference_mode():
            order = sorted(range(len(keys)), key=lambda j: (-len(keys[j]), j))  # similar lengths together
            for batch in (order[i : i + 8] for i in range(0, len(order), 8)):
                width = max(len(keys[j]) for j in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width))
                for row, j in enumerate(batch):
                    ids[row, : len(keys[j])] = torch.tensor(keys[j])
                    mask[row, : len(keys[j])] = 1
                decoder(input_ids=ids, attention_mask=mask.long(), use_cache=False)
                w = mask / mask.sum(1, keepdim=True)
                for layer in PROMPT_LAYERS:
                    pooled[layer][batch] = torch.einsum("bt,bth->bh", w, captured[layer].float())
    finally:
        for handle in handles:
            handle.remove()
    feats = {(layer, "prompt"): pooled[layer] for layer in PROMPT_LAYERS}
    for j, key in enumerate(keys):
        for layer in PROMPT_LAYERS:
            out[layer][heads[key]] = feats[(layer, "prompt")][j]
    log.info(
        "%s: prompt features of %d distinct prompts in %.1f s", source, len(keys), time.perf_counter() - t0
    )
    torch.save({str(k): v for k, v in out.items()}, path)
    return {(k, "prompt"): v for k, v in out.items()}


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from antidote.models.loading import load_model, resolve_model_folder

    folder = resolve_model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = model_layers.resolve_dtype(args.dtype, "cpu")
    return load_model(folder, device="cpu", dtype=dtype, with_tokenizer=False).model, tokenizer


def load_all(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """{source: {'pairs', 'feats', 'seconds'}} for every source, extracting what is not cached."""
    torch.set_num_threads(1)
    data: dict[str, dict[str, Any]] = {}
    model = tokenizer = None
    for source in args.sources:
        pairs = load_source(args.data_dir, source, args.per_source, args.seed)
        if not (Path(args.cache) / cache_key(args, source) / "all.pt").is_file() and model is None:
            model, tokenizer = _load(args)
        got = features_for(args, source, pairs, model, tokenizer)
        feats = {tuple([int(k.split(":")[0]), k.split(":")[1]]): v for k, v in got["feats"].items()}
        prompt_cached = (Path(args.cache) / cache_key(args, source) / "prompt.pt").is_file()
        if args.prompt:
            if model is None and not prompt_cached:
                model, tokenizer = _load(args)
            feats.update(prompt_features(args, source, pairs, model, tokenizer))
        data[source] = {"pairs": pairs, "feats": feats, "seconds": got["seconds"]}
    return data


# ---- the table ------------------------------------------------------------------------------------------


def rate(k: int, n: int) -> tuple[float, float, float]:
    lo, hi = wilson_interval(k, n)  # percent
    return k / n, lo / 100, hi / 100


def held_out_row(pairs: list[Pair], learned_harmful: list[bool], seed: int) -> dict[str, Any]:
    """Accuracy and HS gap of keyword and learned verdicts on one held-out source, with 95% intervals; where
    only some of its requests are harmful (XSTest), the same on those rows under 'harmful_requests'."""
    row = _agreement(pairs, learned_harmful, seed)
    rows = [i for i, p in enumerate(pairs) if p.harmful_prompt]
    if 0 < len(rows) < len(pairs):
        row["harmful_requests"] = _agreement(
            [pairs[i] for i in rows], [learned_harmful[i] for i in rows], seed
        )
    return row


def _agreement(pairs: list[Pair], learned_harmful: list[bool], seed: int) -> dict[str, Any]:
    y = [p.harmful for p in pairs]
    kw = [keyword_verdict(p.response) == "complied" for p in pairs]
    n = len(y)
    row: dict[str, Any] = {"n": n, "human_hs": rate(sum(y), n)}
    for name, pred in (("keyword", kw), ("learned", learned_harmful)):
        row[f"{name}_acc"] = rate(sum(a == b for a, b in zip(pred, y, strict=True)), n)
        gap = torch.tensor([float(a) - float(b) for a, b in zip(pred, y, strict=True)])
        lo, hi = bootstrap_interval(lambda idx, g=gap: 100 * g[idx].mean(dim=1), n, seed=seed)
        mean = 100 * float(gap.mean())
        row[f"{name}_gap"] = (mean, lo, hi)
    return row


def fmt(t: tuple[float, float, float], scale: float = 1.0, sign: bool = False) -> str:
    f = "{:+.1f}" if sign else ("{:.1f}" if scale == 100 else "{:.3f}")
    v, lo, hi = (x * scale for x in t)
    return f"{f.format(v)} [{f.format(lo)}, {f.format(hi)}]"


def print_table(name: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n### {name}\n")
    print("| held-out source | n | keyword acc | learned acc | human HS | keyword HS - human | ", end="")
    print("learned HS - human |")
    print("|---|---:|---|---|---|---|---|")
    for source, r in rows.items():
        for label, x in ((source, r), (f"{source}, harmful requests", r.get("harmful_requests"))):
            if x is None:
                continue
            print(
                f"| {label} | {x['n']} | {fmt(x['keyword_acc'])} | {fmt(x['learned_acc'])} | "
                f"{fmt(x['human_hs'], 100)} | {fmt(x['keyword_gap'], sign=True)} | "
                f"{fmt(x['learned_gap'], sign=True)} |"
            )
    gain = [r["learned_acc"][0] - r["keyword_acc"][0] for r in rows.values()]
    worst = min(gain)
    gaps = [abs(r["learned_gap"][0]) for r in rows.values()]
    print(
        f"\nmean accuracy gain {sum(gain) / len(gain):+.3f} (goal >= +0.10), worst source {worst:+.3f} "
        f"(goal >= -0.03), largest |learned HS - human| {max(gaps):.1f} (goal <= 10)"
    )


# ---- recipes: each step of the ablation --------------------------------------------------------------------


def _stack(train: dict[str, dict[str, Any]]) -> tuple[dict, list[str], torch.Tensor, list[str]]:
    names = list(train)
    feats = {k: torch.cat([train[s]["feats"][k] for s in names]) for k in train[names[0]]["feats"]}
    responses = [p.response for s in names for p in train[s]["pairs"]]
    labels = torch.tensor([p.harmful for s in names for p in train[s]["pairs"]])
    groups = [s for s in names for _ in train[s]["pairs"]]
    return feats, responses, labels, groups


def _harmful_requests(train: dict[str, dict[str, Any]]) -> list[bool]:
    return [p.harmful_prompt for d in train.values() for p in d["pairs"]]


class _OldJudge:
    """The recipe of the judge before this change: one layer, one pooling, logistic, chosen on a random
    20% prompt split of the pooled training rows by ROC AUC, threshold at the best validation accuracy."""

    def __init__(self, train: dict[str, dict[str, Any]], seed: int) -> None:
        feats, responses, labels, _ = _stack(train)
        feats = {k: v for k, v in feats.items() if k[0] in (12, 18, 24) and k[1] in ("mean", "last")}
        prompts = [p.prompt for d in train.values() for p in d["pairs"]]
        tr, va = learned_training.split_by_prompt(prompts, 0.2, seed)
        self.t = learned_training.choose_and_fit(
            feats, responses, labels, tr, va, l2s=(0.001, 0.01, 0.1, 1.0)
        )

    def predict(self, feats: dict, responses: list[str]) -> torch.Tensor:
        x = feats[(self.t.layer, self.t.pooling)]
        x = learned_features.with_keyword(x, responses) if self.t.keyword_feature else x
        return self.t.probe.probabilities(x) >= self.t.threshold

    def describe(self) -> str:
        t = self.t
        return (
            f"layer {t.layer} {t.pooling}, keyword {t.keyword_feature}, l2 {t.l2}, "
            f"threshold {t.threshold:.3f}"
        )


def _spec_fitter(*specs: learned_sources.HeadSpec) -> Any:
    def fit(train: dict[str, dict[str, Any]], seed: int) -> learned_sources.SourceFit:
        feats, responses, labels, groups = _stack(train)
        hp = _harmful_requests(train)
        return learned_sources.choose_across_sources(specs, feats, responses, labels, groups, seed, hp)

    return fit


ONE = ((18, "mean"),)
MANY = tuple((layer, pooling) for layer in (6, 12, 18, 24) for pooling in ("mean", "last"))
PROMPTED = (*MANY, (12, "prompt"), (24, "prompt"))
SHALLOW = tuple((layer, pooling) for layer in (3, 6, 9, 12) for pooling in ("mean", "last"))
L24 = ((24, "mean"),)
TRAIN_L2 = next(f.default for f in dataclasses.fields(JudgeTrainConfig) if f.name == "l2")  # judge train's
MEANS = tuple((layer, "mean") for layer in (6, 12, 18, 24))


def H(blocks: tuple[tuple[int, str], ...], **kw: Any) -> learned_sources.HeadSpec:
    """The recipes before the harmful-request calibration: threshold and choice on every row."""
    return learned_sources.HeadSpec(blocks, **{"calibrate": "all", **kw})


def HP(blocks: tuple[tuple[int, str], ...], **kw: Any) -> learned_sources.HeadSpec:
    """Threshold and choice on the answers to harmful requests only (`HeadSpec.calibrate`)."""
    return learned_sources.HeadSpec(blocks, **kw)


RECIPES: dict[str, tuple[str, Any]] = {
    "old-pku-only": (
        "the judge as shipped before: old recipe on PKU-SafeRLHF only",
        lambda t, s: _OldJudge(t, s),
    ),
    "old": ("old recipe on the other sources pooled", lambda t, s: _OldJudge(t, s)),
    "balanced": (
        "layer 18 mean, logistic, sources and classes weighted equally, accuracy threshold (inner LOSO)",
        _spec_fitter(H(ONE, threshold_rule="accuracy")),
    ),
    "layers": (
        "+ layers 6/12/18/24, mean and last, concatenated",
        _spec_fitter(H(MANY, threshold_rule="accuracy")),
    ),
    "keyword": (
        "+ keyword refusal flag",
        _spec_fitter(H(MANY, keyword_feature=True, threshold_rule="accuracy")),
    ),
    "hs-threshold": ("+ threshold for the HS (inner LOSO)", _spec_fitter(H(MANY, keyword_feature=True))),
    "one-hs": ("balanced + HS threshold, one block (layer 18 mean)", _spec_fitter(H(ONE))),
    "many-hs": ("balanced + HS threshold, 8 blocks, no keyword flag", _spec_fitter(H(MANY))),
    "prompt": (
        "hs-threshold + the prompt's hidden states (mean over prompt tokens, layers 12 and 24)",
        _spec_fitter(H(PROMPTED, keyword_feature=True)),
    ),
    "prompt-mlp": (
        "prompt + MLP head, 16 units",
        _spec_fitter(H(PROMPTED, keyword_feature=True, hidden=16, l2s=(0.01,))),
    ),
    "auto": (
        "hs-threshold with or without the prompt blocks, chosen by inner LOSO over the training sources",
        _spec_fitter(H(MANY, keyword_feature=True), H(PROMPTED, keyword_feature=True)),
    ),
    "shallow": ("hs-threshold on layers 3/6/9/12 (faster)", _spec_fitter(H(SHALLOW, keyword_feature=True))),
    "prompt-hp": (
        "prompt, threshold and L2 set on the answers to harmful requests only",
        _spec_fitter(HP(PROMPTED, keyword_feature=True)),
    ),
    "gate-hp": (
        "prompt-hp, keyword gate instead of the keyword flag",
        _spec_fitter(HP(PROMPTED, keyword_gate=True)),
    ),
    "l24-hp": ("layer 24 mean only, set on harmful requests", _spec_fitter(HP(L24))),
    "l24-gate-hp": (
        "layer 24 mean only, keyword gate, set on harmful requests",
        _spec_fitter(HP(L24, keyword_gate=True)),
    ),
    "default": (
        "what antidote judge train --data-dir does by default: the 10 prompt-recipe blocks, keyword flag "
        "and keyword gate each on or off, chosen by inner LOSO on harmful requests",
        _spec_fitter(
            *(
                HP(PROMPTED, keyword_feature=f, keyword_gate=g, l2s=TRAIN_L2)
                for f in (False, True)
                for g in (False, True)
            )
        ),
    ),
    "auto-hp": (
        "chosen by inner LOSO on harmful requests: blocks (layer 24 mean; layer 18 mean; layers 6/12/18/24 "
        "mean; the 10 prompt-recipe blocks) x keyword gate on/off",
        _spec_fitter(*(HP(b, keyword_gate=g) for b in (L24, ONE, MEANS, PROMPTED) for g in (True, False))),
    ),
}


def speed(args: argparse.Namespace, data: dict[str, dict[str, Any]]) -> None:
    """Pairs per second of the learned judge's features on the first --speed pairs of every source, for
    the forward stopped after layer 12 and after layer 24, at 1 and 2 torch threads: wall and CPU time."""
    from transformers import AutoTokenizer

    from antidote.models.loading import load_model, resolve_model_folder

    folder = resolve_model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = model_layers.resolve_dtype(args.dtype, "cpu")
    model = load_model(folder, device="cpu", dtype=dtype, with_tokenizer=False).model
    pairs = [p for d in data.values() for p in d["pairs"][: args.speed]]
    print(f"\nspeed on {len(pairs)} pairs ({args.speed} per source), {dtype}, max {args.max_length} tokens:")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for deepest in (12, 24):
            wall, cpu = time.perf_counter(), time.process_time()
            learned_features.hidden_features(
                model,
                tokenizer,
                [p.prompt for p in pairs],
                [p.response for p in pairs],
                layers=[deepest],
                max_length=args.max_length,
                batch_size=8,
                progress=False,
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(
                f"  {threads} thread(s), forward to layer {deepest}: {len(pairs) / wall:.2f} pairs/s wall, "
                f"{len(pairs) / cpu:.2f} pairs per CPU-second"
            )
    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cache", default="/tmp/judge_feats")
    parser.add_argument("--per-source", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES))  # or add alpaca-gpt4
    parser.add_argument("--recipes", default="", help="comma-separated recipe names; default: all")
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--prompt", action="store_true", help="also the prompt features (layers 12, 24)")
    parser.add_argument("--output", default="")
    parser.add_argument("--speed", type=int, default=0, help="time feature extraction on N pairs per source")
    args = parser.parse_args(argv)
    args.sources = args.sources.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("antidote").setLevel(logging.WARNING)
    data = load_all(args)
    total_n = sum(len(d["pairs"]) for d in data.values())
    total_s = sum(d["seconds"] for d in data.values())
    print(
        f"features: {total_n} pairs in {total_s:.0f} s at 1 torch thread ({total_n / total_s:.2f} pairs/s), "
        f"layers {LAYERS}, max {args.max_length} tokens"
    )
    if args.speed:
        speed(args, data)
    if args.extract_only:
        return 0
    report: dict[str, Any] = {}
    for name in args.recipes.split(",") if args.recipes else list(RECIPES):
        help_text, fitter = RECIPES[name]
        rows = {}
        for held in args.sources:
            train = {s: d for s, d in data.items() if s != held}
            if name == "old-pku-only":
                if held == "pku-saferlhf":
                    continue
                train = {"pku-saferlhf": data["pku-saferlhf"]}
            judge = fitter(train, args.seed)
            pred = judge.predict(data[held]["feats"], [p.response for p in data[held]["pairs"]])
            rows[held] = held_out_row(data[held]["pairs"], pred.tolist(), args.seed)
            rows[held]["choice"] = judge.describe()
        print_table(f"{name}: {help_text}", rows)
        for held, r in rows.items():
            print(f"  {held}: {r['choice']}")
        report[name] = rows
    if args.output:
        Path(args.output).write_text(json_text(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
