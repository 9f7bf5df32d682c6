"""Prompt/response pairs (`Example`) from any data source, finding the fields by name."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from antidote.data.catalog import read_rows
from antidote.errors import AntidoteError

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "instruction", "question", "goal", "forbidden_prompt", "behavior")
RESPONSE_FIELDS = ("response", "output", "answer", "target")
INPUT_FIELD = "input"


@dataclass(frozen=True)
class Example:
    """One calibration pair. `input` is the optional extra context of Alpaca-style data."""

    prompt: str
    response: str
    input: str = ""
    category: str = ""  # the row's `category_field` value, where one was asked for


def _find_field(fields: Iterable[str], wanted: Sequence[str]) -> str | None:
    by_lower = {f.lower(): f for f in fields}
    for name in wanted:
        if name in by_lower:
            return by_lower[name]
    return None


def _matches(row: Mapping[str, Any], field: str, value: str) -> bool:
    got = row.get(field)
    return str(got).strip().lower() == value.strip().lower()


def _text(row: Mapping[str, Any], key: str | None, where: str) -> str:
    """The text of `row[key]`: strings as they are, numbers through str(), missing or null as ""."""
    value = None if key is None else row.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise AntidoteError(
        f"{where}: field {key!r} is a {type(value).__name__} ({str(value)[:40]}), not text; "
        "give it as a string"
    )


def load_examples(
    source: str | Sequence[Mapping[str, Any]],
    *,
    filters: Sequence[str] = (),
    max_samples: int | None = None,
    seed: int = 0,
    require_response: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    category_field: str | None = None,
) -> list[Example]:
    """Load prompt/response pairs.

    source: a file path (.jsonl/.json/.csv), `hf:NAME[:SPLIT]`, a named data set, or a list of dicts.
    filters: `FIELD=VALUE` strings; a row is kept if every field equals its value (case-insensitive,
        so `is_safe=false` matches the boolean False).
    max_samples: keep a random subset of this size (seeded by `seed`), in source order.
    require_response: every kept row must have a non-empty response; the first that has none is named
        (row N = the N-th record of the source, 1-based). Without it responses may be missing.
    data_dir: the folder named data sets are read from (default: $ANTIDOTE_DATA_DIR, else the hub).
    category_field: a field every row must have; its text becomes `Example.category`.

    The fields are found by name in the first record (PROMPT_FIELDS, RESPONSE_FIELDS, `input`). Their values
    must be text: strings are used as they are, numbers are converted with str(), a missing or null value
    is empty; any other type (list, object, boolean) is an error naming the row. Rows with an empty prompt
    are dropped (with a warning).
    """
    rows = read_rows(source, data_dir) if isinstance(source, str) else list(source)
    label = source if isinstance(source, str) else "the data"
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise AntidoteError(f"{label} row {number} is not a record; expected objects with prompt fields")
    if not rows:
        raise AntidoteError(f"{label} holds no records; expected objects with prompt and response fields")
    fields = list(rows[0].keys())
    numbered = list(enumerate(rows, start=1))
    for spec in filters:
        field, sep, value = spec.partition("=")
        if not sep or not field:
            raise AntidoteError(f"filter {spec!r} is not FIELD=VALUE; write e.g. --filter is_safe=false")
        if field not in fields:
            raise AntidoteError(
                f"filter field {field!r} is not in {label}; fields found: {', '.join(fields)}"
            )
        numbered = [(n, r) for n, r in numbered if _matches(r, field, value)]
    prompt_key = _find_field(fields, PROMPT_FIELDS)
    response_key = _find_field(fields, RESPONSE_FIELDS)
    if prompt_key is None or (require_response and response_key is None):
        raise AntidoteError(
            f"no usable fields in {label}: found {', '.join(fields)}; need a prompt field "
            f"({'|'.join(PROMPT_FIELDS)}) and a response field ({'|'.join(RESPONSE_FIELDS)}); rename them"
        )
    input_key = _find_field(fields, (INPUT_FIELD,))
    if category_field is not None and category_field not in fields:
        raise AntidoteError(
            f"category field {category_field!r} is not in {label}; fields found: {', '.join(fields)}"
        )
    examples = []
    for number, row in numbered:
        where = f"{label} row {number}"
        example = Example(
            prompt=_text(row, prompt_key, where),
            response=_text(row, response_key, where),
            input=_text(row, input_key, where),
            category=_text(row, category_field, where),
        )
        if not example.prompt.strip():
            continue
        if require_response and not example.response.strip():
            raise AntidoteError(
                f"{where} has no {response_key!r} (missing or empty); every pair needs a response: "
                "fill it in or remove the row"
            )
        examples.append(example)
    if len(examples) < len(numbered):
        log.warning("%s: %d rows with an empty %s dropped", label, len(numbered) - len(examples), prompt_key)
    if not examples:
        raise AntidoteError(f"{label} has no examples left after filtering; check --filter and the file")
    if max_samples is not None:
        if max_samples < 1:
            raise AntidoteError(f"--max-samples must be at least 1, got {max_samples}")
        if max_samples < len(examples):
            keep = sorted(random.Random(seed).sample(range(len(examples)), max_samples))
            examples = [examples[i] for i in keep]
    return examples
