"""Read prompt/response pairs from JSONL, JSON, CSV or a hub data set, finding the fields by name."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError

PROMPT_FIELDS = ("prompt", "instruction", "question", "goal", "forbidden_prompt", "behavior")
RESPONSE_FIELDS = ("response", "output", "answer", "target")
INPUT_FIELD = "input"


@dataclass(frozen=True)
class Example:
    """One calibration pair. `input` is the optional extra context of Alpaca-style data."""

    prompt: str
    response: str
    input: str = ""


def _find_field(fields: Iterable[str], wanted: Sequence[str]) -> str | None:
    by_lower = {f.lower(): f for f in fields}
    for name in wanted:
        if name in by_lower:
            return by_lower[name]
    return None


def read_rows(source: str) -> list[dict[str, Any]]:
    """Records of a file, `hf:NAME[:SPLIT]`, or a named data set (`antidote.data.sources`)."""
    from antidote.data import sources

    if source.startswith("hf:"):
        return _read_hub(source)
    if sources.is_named(source):
        return sources.read_named(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise AntidoteError(
            f"data file {source} not found; pass a .jsonl, .json or .csv file, hf:NAME[:SPLIT], or a "
            f"named data set: {sources.describe()}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AntidoteError(f"cannot read data file {source} ({err}); it must be UTF-8 text") from err
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return list(csv.DictReader(io.StringIO(text, newline="")))  # quoted newlines stay in fields
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):  # {"data": [...]} or {"instructions": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else data
            if not isinstance(data, list):
                raise AntidoteError(f"{source} holds no list of records; expected a JSON array of objects")
            return data
        return [
            json.loads(line) for line in text.split("\n") if line.strip()
        ]  # not splitlines: U+2028 in strings
    except json.JSONDecodeError as err:
        raise AntidoteError(f"{source} is not valid JSON/JSONL ({err}); fix the file or convert it") from err


def _read_hub(source: str) -> list[dict[str, Any]]:
    name, _, split = source[3:].partition(":")
    try:
        import datasets
    except ImportError as err:
        raise AntidoteError(
            "hf: data needs the `datasets` package; pip install 'antidote-realign[hub]'"
        ) from err
    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as err:  # hub unreachable, unknown name or split
        raise AntidoteError(f"cannot load {source} ({type(err).__name__}: {err}); use a local file") from err


def _matches(row: Mapping[str, Any], field: str, value: str) -> bool:
    got = row.get(field)
    return str(got).strip().lower() == value.strip().lower()


def load_examples(
    source: str | Sequence[Mapping[str, Any]],
    *,
    filters: Sequence[str] = (),
    max_samples: int | None = None,
    seed: int = 0,
    require_response: bool = True,
) -> list[Example]:
    """Load prompt/response pairs.

    source: a file path (.jsonl/.json/.csv), `hf:NAME[:SPLIT]`, or a list of dicts.
    filters: `FIELD=VALUE` strings; a row is kept if every field equals its value (case-insensitive,
        so `is_safe=false` matches the boolean False).
    max_samples: keep a random subset of this size (seeded by `seed`), in source order.
    """
    rows = read_rows(source) if isinstance(source, str) else [dict(r) for r in source]
    label = source if isinstance(source, str) else "the data"
    if not rows or not isinstance(rows[0], Mapping):
        raise AntidoteError(f"{label} holds no records; expected objects with prompt and response fields")
    fields = list(rows[0].keys())
    for spec in filters:
        field, sep, value = spec.partition("=")
        if not sep or not field:
            raise AntidoteError(f"filter {spec!r} is not FIELD=VALUE; write e.g. --filter is_safe=false")
        if field not in fields:
            raise AntidoteError(
                f"filter field {field!r} is not in {label}; fields found: {', '.join(fields)}"
            )
        rows = [r for r in rows if _matches(r, field, value)]
    prompt_key = _find_field(fields, PROMPT_FIELDS)
    response_key = _find_field(fields, RESPONSE_FIELDS)
    if prompt_key is None or (require_response and response_key is None):
        raise AntidoteError(
            f"no usable fields in {label}: found {', '.join(fields)}; need a prompt field "
            f"({'|'.join(PROMPT_FIELDS)}) and a response field ({'|'.join(RESPONSE_FIELDS)}); rename them"
        )
    input_key = _find_field(fields, (INPUT_FIELD,))
    examples = [
        Example(
            prompt=str(r.get(prompt_key) or ""),
            response=str(r.get(response_key) or "") if response_key else "",
            input=str(r.get(input_key) or "") if input_key else "",
        )
        for r in rows
    ]
    examples = [e for e in examples if e.prompt.strip()]
    if not examples:
        raise AntidoteError(f"{label} has no examples left after filtering; check --filter and the file")
    if max_samples is not None:
        if max_samples < 1:
            raise AntidoteError(f"--max-samples must be at least 1, got {max_samples}")
        if max_samples < len(examples):
            keep = sorted(random.Random(seed).sample(range(len(examples)), max_samples))
            examples = [examples[i] for i in keep]
    return examples
