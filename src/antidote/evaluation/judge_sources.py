"""Labelled (prompt, response) pairs from several sources, for training and testing the learned judge.

The learned judge must agree with people on answers from sources it never saw, so it is trained on several
sources at once and measured leave-one-source-out (train on the others, test on the held-out one). A
source here is one folder-relative recipe over a local data folder (`--data-dir`); where its label is not a
human judgement it follows from how the set was built:

- `pku-saferlhf` (`judge/saferlhf_sample_4000.jsonl`): PKU-SafeRLHF answers, human safe/unsafe labels
  (CC-BY-NC-4.0: a judge trained on it must not be shipped).
- `xstest` (`judge/xstest_v2_completions_5models.jsonl`): XSTest v2 answers of 5 models to safe and unsafe
  prompts, human labels; every harmful row is kept, the safe rows are a seeded sample. `harmful_prompt`
  is XSTest's own `prompt_unsafe` mark (its safe prompts only sound harmful).
- `beavertails-unsafe` (`harmful_qa/beavertails_30k_train_*`): answers BeaverTails' annotators marked
  unsafe: harmful. Rows whose prompt occurs in the PKU-SafeRLHF file are dropped (same organisation,
  overlapping prompts: they would leak across the leave-one-source-out split).
- `refusals` (`refusals/advbench_llama2chat_refusals.jsonl`,
  `refusals/safety_tuned_llamas_safety_only.jsonl`): Llama-2-chat refusals of AdvBench requests and
  Safety-Tuned-LLaMAs' safe answers (often a correction rather than a refusal wording): safe.
- `alpaca-benign` (`benign/alpaca_eval_*.jsonl`): helpful AlpacaEval answers of text-davinci-003 and
  GPT-4 to harmless requests: safe.
- `alpaca-gpt4` (`benign/alpaca_gpt4_en_demo_1k.jsonl`): GPT-4's answers to Alpaca instructions (other
  requests than AlpacaEval's): safe. A second source of helpful answers to harmless requests, so that
  neither is the only one when the other is held out. Not among the default judge's sources.

hh-rlhf (`harmful_qa/hh_rlhf_harmless_base_test.jsonl`) is not a source: it holds preference pairs (chosen
vs rejected), not absolute labels, and its "chosen" answers are often harmful too.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError

SOURCES = ("pku-saferlhf", "xstest", "beavertails-unsafe", "refusals", "alpaca-benign", "alpaca-gpt4")
DEFAULT_SOURCES = SOURCES[:5]  # what the default judge is trained on (docs/judges.md)
# sources whose licence forbids shipping anything derived from them (weights included)
NON_COMMERCIAL = ("pku-saferlhf", "beavertails-unsafe", "alpaca-benign", "alpaca-gpt4")
_FILES = {
    "pku-saferlhf": ("judge/saferlhf_sample_4000.jsonl",),
    "xstest": ("judge/xstest_v2_completions_5models.jsonl",),
    "beavertails-unsafe": (
        "harmful_qa/beavertails_30k_train_unsafe_200.jsonl",
        "harmful_qa/beavertails_30k_train_sample140_artkit.jsonl",
    ),
    "refusals": (
        "refusals/advbench_llama2chat_refusals.jsonl",
        "refusals/safety_tuned_llamas_safety_only.jsonl",
    ),
    "alpaca-benign": (
        "benign/alpaca_eval_text_davinci_003.jsonl",
        "benign/alpaca_eval_gpt4_1106_preview.jsonl",
    ),
    "alpaca-gpt4": ("benign/alpaca_gpt4_en_demo_1k.jsonl",),
}


@dataclass
class Pair:
    prompt: str
    response: str
    harmful: bool
    source: str
    harmful_prompt: bool = True  # the request itself is harmful (the only kind our HS prompts are)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _rows(data_dir: Path, name: str) -> list[dict[str, Any]]:
    path = data_dir / name
    if not path.is_file():
        raise AntidoteError(f"{path} is missing; --data-dir must be the labelled data folder holding {name}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _text(row: dict[str, Any], *keys: str) -> str:
    for key in keys:
        if isinstance(row.get(key), str):
            return str(row[key])
    raise AntidoteError(f"a row has none of the fields {', '.join(keys)}: {sorted(row)[:8]}")


def _harmful_request(row: dict[str, Any]) -> bool:
    """XSTest's own mark of its harmful prompts (`prompt_unsafe`: true/false, or the strings); a row
    without it (PKU-SafeRLHF's) is an answer to a harmful request. Anything else is refused."""
    mark = row.get("prompt_unsafe", True)
    if isinstance(mark, str) and mark.strip().lower() in ("true", "false"):
        return mark.strip().lower() == "true"
    if not isinstance(mark, bool):
        raise AntidoteError(
            f"prompt_unsafe must be true or false, got {mark!r} in a row of {row.get('prompt')!r}"
        )
    return mark


def _sample(pairs: list[Pair], n: int | None, rng: random.Random) -> list[Pair]:
    return pairs if n is None or n >= len(pairs) else rng.sample(pairs, n)


def source_files(source: str) -> tuple[str, ...]:
    """The files (relative to the data folder) that a source reads."""
    return _FILES[source]


def load_source(data_dir: str | Path, source: str, n: int | None = None, seed: int = 0) -> list[Pair]:
    """Up to n pairs of one source (a seeded sample; all when n is None), deduplicated by (prompt,
    response)."""
    if source not in SOURCES:
        raise AntidoteError(f"unknown judge source {source!r}; choose from {', '.join(SOURCES)}")
    root = Path(data_dir).expanduser()
    rng = random.Random(f"{seed}:{source}")
    files = _FILES[source]
    if source in ("pku-saferlhf", "xstest"):
        pairs = [
            Pair(
                r["prompt"],
                r["response"],
                str(r["label"]).lower() in ("harmful", "unsafe", "1"),
                source,
                _harmful_request(r),
            )
            for r in _rows(root, files[0])
        ]
        if source == "xstest" and n is not None:  # harmful rows are rare (6%): keep all, sample the safe
            harmful = [p for p in pairs if p.harmful]
            safe = [p for p in pairs if not p.harmful]
            pairs = _sample(harmful, n, rng) + _sample(safe, max(n - len(harmful), 0), rng)
            rng.shuffle(pairs)
            return _dedupe(pairs)
    elif source == "beavertails-unsafe":
        seen = {_norm(r["prompt"]) for r in _rows(root, _FILES["pku-saferlhf"][0])}
        pairs = [
            Pair(_text(r, "prompt", "instruction"), _text(r, "response", "output"), True, source)
            for f in files
            for r in _rows(root, f)
        ]
        pairs = [p for p in pairs if _norm(p.prompt) not in seen]
    elif source == "alpaca-gpt4":  # instructions with an input get it appended, as a user would write them
        pairs = [
            Pair(f"{r['instruction']}\n\n{r['input']}".strip(), r["output"], False, source, False)
            for r in _rows(root, files[0])
        ]
    else:  # refusals, alpaca-benign: two files, half of n from each

        def read(f: str) -> list[Pair]:
            if f.startswith("refusals/advbench"):
                return [
                    Pair(
                        re.sub(r"^\[INST\]\s*|\s*\[/INST\]$", "", r["prompt"].strip()),
                        r["response"].strip(),
                        False,
                        source,
                    )
                    for r in _rows(root, f)
                ]
            harmful_prompt = source == "refusals"  # AlpacaEval's requests are harmless
            return [
                Pair(r["instruction"], r["output"], False, source, harmful_prompt) for r in _rows(root, f)
            ]

        first = _sample(_dedupe(read(files[0])), None if n is None else (n + 1) // 2, rng)
        second = _sample(_dedupe(read(files[1])), None if n is None else n - len(first), rng)
        return first + second
    return _sample(_dedupe(pairs), n, rng)


def _dedupe(pairs: list[Pair]) -> list[Pair]:
    keys, out = set(), []
    for p in pairs:
        key = (_norm(p.prompt), _norm(p.response))
        if key not in keys and p.response.strip():
            keys.add(key)
            out.append(p)
    return out
