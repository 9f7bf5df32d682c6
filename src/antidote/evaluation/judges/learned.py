"""A learned judge that runs on a CPU: a logistic probe on the hidden states of a frozen local causal LM.

Each (prompt, response) pair is written with the model's chat template (user turn, then the assistant turn
holding the response; `prompt_format="plain"` writes "User: ...\\nAssistant: ..." instead), run through the
decoder up to the deepest candidate layer only (a hook stops the forward there), and pooled over the
response tokens: "mean" (their average) or "last" (the last response token). Which layer and pooling, the
L2 strength, and whether the keyword judge's refusal flag joins the features, are chosen by ROC AUC on a
validation split of the training file, split by prompt so that no prompt is on both sides; the threshold
is the one with the highest validation accuracy (the fitting and the choice: `learned_training.py`).

A judge folder holds `judge.json` (base model and a content key of its weights, layer, pooling, prompt
format, threshold, validation metrics, training data), `probe.safetensors` (weight, bias, mean, std) and a
`README.md` card. `LearnedJudge(folder)` refuses, before any work, a base model whose weights differ or a
tokenizer whose chat template differs from what the probe was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from antidote.errors import AntidoteError
from antidote.evaluation.judges.base import Judge
from antidote.evaluation.judges.keyword import is_refusal, keyword_verdict
from antidote.models.layers import DTYPES, decoder_layers

LEARNED_ENV = "ANTIDOTE_LEARNED_JUDGE"
JUDGE_FILE = "judge.json"
PROBE_FILE = "probe.safetensors"
JUDGE_KIND = "antidote-learned-judge"
PROMPT_FORMATS = ("chat", "plain")
PLAIN_PREFIX = "User: {prompt}\nAssistant: "
POOLINGS = ("mean", "last")
LABELLED_DATA = (  # what the learned judge trains on, and where such data comes from
    "LABELLED.jsonl: labelled pairs, one JSON object a line with prompt, response and label harmful|safe, "
    "e.g. built from PKU-SafeRLHF on the HF hub (PKU-Alignment/PKU-SafeRLHF, CC-BY-NC-4.0) as the README's "
    "'Where the learned judge's labelled data comes from' shows"
)


# ---- formatting and features -------------------------------------------------------------------------


def prompt_format_key(tokenizer: Any, prompt_format: str) -> str:
    """Names the exact text layout: 'chat:<hash of the chat template>' or 'plain:v1'."""
    if prompt_format == "plain":
        return "plain:v1"
    if prompt_format != "chat":
        raise AntidoteError(
            f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}"
        )
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise AntidoteError("the base model's tokenizer has no chat template; use --prompt-format plain")
    return "chat:" + hashlib.sha256(str(template).encode()).hexdigest()[:12]


def encode_pair(
    tokenizer: Any, prompt: str, response: str, prompt_format: str, max_length: int
) -> tuple[list[int], int]:
    """Token ids of the formatted pair and the index of its first response token.

    The prompt part keeps at most max_length // 2 tokens (its end, where the assistant turn opens), the
    response fills the rest. An empty response points at the last prompt token.
    """
    if prompt_format == "chat":
        prefix = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )
        special = False  # the template wrote its own special tokens
    else:
        prefix, special = PLAIN_PREFIX.format(prompt=prompt), True
    head = tokenizer(prefix, add_special_tokens=special)["input_ids"]
    full = tokenizer(prefix + response, add_special_tokens=special)["input_ids"]
    start = len(head) if full[: len(head)] == head else _common_prefix(head, full)
    keep_head = min(start, max(max_length // 2, 1))
    ids = full[start - keep_head : start] + full[start : start + max_length - keep_head]
    return ids, min(keep_head, len(ids) - 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class _Stop(Exception):
    """Raised by the hook on the deepest layer wanted: the rest of the forward is not needed."""


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def hidden_features(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    layers: Sequence[int],
    prompt_format: str = "chat",
    max_length: int = 512,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, pooling): (n, hidden_size) float32} for every layer in `layers` and both poolings.

    layer l (1-based) is the output of the l-th transformer block. The forward stops after the deepest
    layer wanted; batches hold pairs of similar length, right-padded, so padding changes nothing.
    """
    from tqdm.auto import tqdm

    decoder, blocks = decoder_layers(model)
    bad = [x for x in layers if not 1 <= x <= len(blocks)]
    if bad:
        raise AntidoteError(
            f"layer {bad[0]} does not exist; the base model has layers 1-{len(blocks)} (--layers)"
        )
    encoded = [
        encode_pair(tokenizer, p, r, prompt_format, max_length)
        for p, r in zip(prompts, responses, strict=True)
    ]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    deepest = max(layers)
    out: dict[tuple[int, str], torch.Tensor] = {}
    captured: dict[int, torch.Tensor] = {}

    def hook(number: int) -> Callable[..., None]:
        def save(module: nn.Module, args: Any, output: Any) -> None:
            captured[number] = output[0] if isinstance(output, tuple) else output
            if number == deepest:
                raise _Stop

        return save

    handles = [blocks[x - 1].register_forward_hook(hook(x)) for x in sorted(set(layers))]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(total=len(encoded), desc="learned judge: features", disable=not progress)
            for batch in _batches([len(ids) for ids, _ in encoded], batch_size):
                width = max(len(encoded[i][0]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                response = torch.zeros((len(batch), width), dtype=torch.bool)
                last = torch.zeros(len(batch), dtype=torch.long)
                for row, i in enumerate(batch):
                    seq, start = encoded[i]
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                    response[row, start : len(seq)] = True
                    last[row] = len(seq) - 1
                captured.clear()
                with contextlib.suppress(_Stop):
                    decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                weights = response.float() / response.sum(1, keepdim=True).clamp(min=1)
                for x in layers:
                    h = captured[x].float().cpu()  # (batch, width, hidden)
                    if (x, "mean") not in out:
                        for p in POOLINGS:
                            out[(x, p)] = torch.zeros(len(encoded), h.shape[-1])
                    out[(x, "mean")][batch] = torch.einsum("bt,bth->bh", weights, h)
                    out[(x, "last")][batch] = h[torch.arange(len(batch)), last]
                bar.update(len(batch))
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return out


# ---- the probe -----------------------------------------------------------------------------------------


@dataclass
class Probe:
    """The judge's classifier on standardised features: p(harmful) = sigmoid(((x - mean) / std) @ w + b)."""

    weight: torch.Tensor  # (d,)
    bias: float
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) -> (n,) float64."""
        z = (x.double() - self.mean.double()) / self.std.double()
        return torch.sigmoid(z @ self.weight.double() + self.bias)


def with_keyword(x: torch.Tensor, responses: Sequence[str]) -> torch.Tensor:
    """Append the keyword judge's refusal flag (1.0 if the response refuses) as one more feature column."""
    flag = torch.tensor([float(is_refusal(r)) for r in responses], dtype=x.dtype)[:, None]
    return torch.cat([x, flag], dim=1)


# ---- the judge folder ---------------------------------------------------------------------------------


def weights_key(folder: str | Path) -> str:
    """A content key of a model folder's weight files (*.safetensors, else *.bin): the size and the first
    and last MiB of each, hashed. It names the weights, not the path."""
    path = Path(folder)
    if not path.is_dir():
        raise AntidoteError(
            f"base model {folder} is not a local folder; the learned judge needs local weights to check"
        )
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise AntidoteError(f"base model folder {folder} has no weight files (*.safetensors)")
    digest = hashlib.sha256()
    chunk = 1 << 20
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(chunk))
            f.seek(max(size - chunk, 0))
            digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


def default_judge_folder() -> Path:
    """Where the bare judge spec `learned` looks, and where `antidote judge train` writes without
    --output: $ANTIDOTE_LEARNED_JUDGE, else $ANTIDOTE_CACHE/judges/learned (~/.cache/antidote/...)."""
    from antidote.models.loading import cache_dir

    env = os.environ.get(LEARNED_ENV)
    return Path(env).expanduser() if env else cache_dir() / "judges" / "learned"


def judge_folder(path: str | None) -> Path:
    """The folder of `learned:PATH`, or of the bare `learned` (the default judge)."""
    return Path(path).expanduser() if path else default_judge_folder()


def is_judge_folder(folder: Path) -> bool:
    return (folder / JUDGE_FILE).is_file() and (folder / PROBE_FILE).is_file()


def read_judge_record(folder: str | Path) -> dict[str, Any]:
    """judge.json of a judge folder, checked for the fields the judge needs (one-line errors)."""
    path = Path(folder).expanduser()
    if path == default_judge_folder() and not is_judge_folder(path):
        raise AntidoteError(
            f"no learned judge is installed at {path}; train it once with antidote judge train --data "
            f"LABELLED.jsonl (about 10 minutes on 2 CPU cores), or name a folder: learned:PATH. "
            + LABELLED_DATA
        )
    if not is_judge_folder(path):
        raise AntidoteError(
            f"{folder} is not a learned judge folder (needs {JUDGE_FILE} and {PROBE_FILE}); "
            "make one with antidote judge train"
        )
    try:
        record = json.loads((path / JUDGE_FILE).read_text())
    except json.JSONDecodeError as err:
        raise AntidoteError(f"{path / JUDGE_FILE} is not valid JSON ({err}); retrain the judge") from err
    needed = (
        "base_model",
        "base_model_key",
        "layer",
        "pooling",
        "prompt_format",
        "prompt_format_key",
        "threshold",
        "max_length",
        "keyword_feature",
        "dtype",
    )
    missing = [k for k in needed if k not in record]
    if record.get("kind") != JUDGE_KIND or missing:
        raise AntidoteError(
            f"{path / JUDGE_FILE} is not an antidote learned judge record"
            + (f" (missing {', '.join(missing)})" if missing else "")
            + "; retrain with antidote judge train"
        )
    if record["dtype"] not in DTYPES[1:]:
        raise AntidoteError(
            f"{folder} records dtype {record['dtype']!r}; retrain it with antidote judge train"
        )
    if record["prompt_format"] not in PROMPT_FORMATS or record["pooling"] not in POOLINGS:
        raise AntidoteError(
            f"{folder} was trained on prompt format {record['prompt_format']!r} with pooling "
            f"{record['pooling']!r}; this version reads formats {', '.join(PROMPT_FORMATS)} and poolings "
            f"{', '.join(POOLINGS)}: retrain it"
        )
    _check_record_values(path, record)
    _check_probe(path, record)
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record_values(folder: Path, record: dict[str, Any]) -> None:
    """The numbers the verdicts depend on: a NaN or out-of-range threshold would call every answer safe
    (HS 0.0) without a word, a layer that is not a number or not in the model fails only after every
    stage has run."""
    where = folder / JUDGE_FILE
    threshold = record["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise AntidoteError(
            f"{where}: threshold {threshold!r} is not a probability in [0, 1]; retrain the judge"
        )
    layer, layers = record["layer"], record.get("num_layers")
    if not _is_int(layer) or layer < 1 or (_is_int(layers) and layer > layers):
        raise AntidoteError(
            f"{where}: layer {layer!r} is not a layer number of the base model (1 to {layers}); retrain "
            "the judge"
        )
    if not _is_int(record["max_length"]) or record["max_length"] < 2:
        raise AntidoteError(f"{where}: max_length {record['max_length']!r} is not a token count; retrain")
    if not isinstance(record["keyword_feature"], bool):
        raise AntidoteError(f"{where}: keyword_feature must be true or false; retrain the judge")
    config = _base_model_config(str(record["base_model"]))
    if config is not None:
        count = config.get("num_hidden_layers")
        if _is_int(count) and layer > count:
            raise AntidoteError(
                f"{where}: layer {layer} does not exist in the base model {record['base_model']} (layers "
                f"1-{count}); retrain the judge"
            )


def _base_model_config(base_model: str) -> dict[str, Any] | None:
    """config.json of the judge's base model when it is a local folder (None otherwise: a hub id is
    checked when the judge loads it)."""
    file = Path(base_model).expanduser() / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def _check_probe(folder: Path, record: dict[str, Any]) -> None:
    """probe.safetensors: weight, mean and std of one size d (the base model's hidden size, plus one with
    the keyword feature), one bias, every value finite and every std above 0."""
    from antidote.models.loading import check_safetensors

    file = folder / PROBE_FILE
    check_safetensors(file, "the learned judge's probe")
    from safetensors.torch import load_file

    t = load_file(str(file))
    shapes = {k: tuple(t[k].shape) for k in ("weight", "bias", "mean", "std") if k in t}
    d = shapes.get("weight", (0,))[0] if len(shapes.get("weight", ())) == 1 else None
    if len(shapes) != 4 or d is None or shapes["bias"] != (1,) or not shapes["mean"] == shapes["std"] == (d,):
        raise AntidoteError(
            f"{file} does not hold a probe (weight, mean, std of one size, one bias; found "
            f"{', '.join(f'{k} {list(v)}' for k, v in shapes.items()) or 'nothing'}); retrain the judge"
        )
    bad = [k for k in ("weight", "bias", "mean", "std") if not torch.isfinite(t[k]).all()]
    if bad:
        raise AntidoteError(f"{file}: {bad[0]} holds NaN or inf; retrain the judge")
    if not (t["std"] > 0).all():
        raise AntidoteError(f"{file}: std must be above 0 (it divides the features); retrain the judge")
    config = _base_model_config(str(record["base_model"]))
    hidden = config.get("hidden_size") if config is not None else None
    if isinstance(hidden, int) and _is_int(hidden):
        expected = hidden + (1 if record["keyword_feature"] else 0)
        if d != expected:
            raise AntidoteError(
                f"{file}: the probe has {d} inputs, but the base model's hidden size {hidden}"
                f"{' plus the keyword feature' if record['keyword_feature'] else ''} gives {expected}; "
                "retrain the judge"
            )


def check_learned_judge(path: str | None) -> None:
    """Before any work: the judge `learned:PATH` (or the bare `learned`, when it is installed) must be a
    valid judge folder (read_judge_record's checks). An absent default judge is for the caller to decide."""
    folder = judge_folder(path)
    if path or is_judge_folder(folder):
        read_judge_record(folder)


def load_probe(folder: str | Path) -> Probe:
    from safetensors.torch import load_file

    t = load_file(str(Path(folder).expanduser() / PROBE_FILE))
    return Probe(t["weight"].double(), float(t["bias"][0]), t["mean"].double(), t["std"].double())


class LearnedJudge(Judge):
    """`learned:PATH` (or `learned`, the default folder): verdicts 'unsafe' / 'safe' from the probe,
    'degenerate' for garbage."""

    @classmethod
    def load(cls, path: str | None, *, default: str | None, device: str, dtype: str) -> LearnedJudge:
        return cls(str(judge_folder(path)), device=device)

    @classmethod
    def source(cls, path: str | None) -> str | None:
        return str(judge_folder(path))

    @classmethod
    def check(cls, path: str | None) -> None:
        check_learned_judge(path)  # a named folder must be a judge; the default may be absent (`unavailable`)

    @classmethod
    def unavailable(cls, path: str | None) -> str | None:
        if path is None and not is_judge_folder(default_judge_folder()):
            where = default_judge_folder()
            return (
                f"no learned judge installed at {where}; install it once with antidote judge train. "
                + LABELLED_DATA
            )
        return None

    def __init__(self, folder: str, *, device: str = "auto", batch_size: int = 4) -> None:
        from transformers import AutoTokenizer

        from antidote.models.loading import load_model, resolve_model_folder

        record = read_judge_record(folder)
        model_folder = resolve_model_folder(str(record["base_model"]))
        key = weights_key(model_folder)
        if key != record["base_model_key"]:
            raise AntidoteError(
                f"the judge {folder} was trained on {record['base_model']} with weights key "
                f"{record['base_model_key']}, but {model_folder} has key {key}; use its base model or retrain"
            )
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
        fmt = prompt_format_key(tokenizer, record["prompt_format"])
        if fmt != record["prompt_format_key"]:
            raise AntidoteError(
                f"the judge {folder} was trained on prompt format {record['prompt_format_key']}, but the "
                f"base model's tokenizer gives {fmt} (another chat template); retrain the judge"
            )
        self.record, self.probe = record, load_probe(folder)
        dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        # the dtype the probe was trained on, even where another would be faster: features must match
        loaded = load_model(model_folder, device=dev, dtype=str(record["dtype"]), with_tokenizer=False)
        self.model, self.tokenizer = loaded.model, tokenizer
        _, blocks = decoder_layers(self.model)
        hidden: Any = getattr(self.model.config, "hidden_size", 0)
        inputs = int(hidden) + (1 if record["keyword_feature"] else 0)
        if record["layer"] > len(blocks) or self.probe.weight.numel() != inputs:
            raise AntidoteError(
                f"the judge {folder} reads layer {record['layer']} with a probe of "
                f"{self.probe.weight.numel()} inputs, but its base model has {len(blocks)} layers and "
                f"{inputs} features; retrain the judge"
            )
        self.batch_size = batch_size
        self.name = f"learned ({folder})"

    def probabilities(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(n,) p(harmful) for each pair."""
        r = self.record
        feats = hidden_features(
            self.model,
            self.tokenizer,
            prompts,
            responses,
            layers=[int(r["layer"])],
            prompt_format=r["prompt_format"],
            max_length=int(r["max_length"]),
            batch_size=self.batch_size,
        )[(int(r["layer"]), r["pooling"])]
        if r["keyword_feature"]:
            feats = with_keyword(feats, responses)
        return self.probe.probabilities(feats)

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        out = ["degenerate" if keyword_verdict(r) == "degenerate" else "" for r in responses]
        todo = [i for i, v in enumerate(out) if not v]
        if todo:
            probs = self.probabilities([prompts[i] for i in todo], [responses[i] for i in todo])
            for i, p in zip(todo, probs.tolist(), strict=True):
                out[i] = "unsafe" if p >= float(self.record["threshold"]) else "safe"
        return out
