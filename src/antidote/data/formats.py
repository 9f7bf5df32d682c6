"""Records of one local file: JSON Lines, a JSON array of objects, or CSV with a header row.

Files are UTF-8, with or without a byte-order mark. Every record comes back as a dict; anything else is
refused with the line (JSONL) or position (JSON) of the first bad record.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError

SUFFIXES = (".jsonl", ".json", ".csv")  # any other suffix is read as JSON Lines
MAX_CSV_FIELD = 64 << 20  # characters in one CSV cell (Python's csv module stops at 128 KiB by default)


def _lone_surrogate(record: Any) -> str | None:
    """A string of `record` holding a lone UTF-16 surrogate (JSON's "\\ud800" escape: not Unicode, so it
    cannot be tokenized or written back as UTF-8), else None."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return repr(err.object[err.start : err.end])
    return None


def _loads(text: str) -> Any:
    """json.loads, with nesting too deep for Python's parser turned into a JSONDecodeError."""
    try:
        return json.loads(text)
    except RecursionError as err:
        raise json.JSONDecodeError("nested too deeply", text, 0) from err


def read_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of `path`: .csv (header row), .json (array, or an object holding one array), else JSONL."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is dropped
    except (OSError, UnicodeDecodeError) as err:
        raise AntidoteError(f"cannot read data file {path} ({err}); it must be UTF-8 text") from err
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return parse_csv(text, str(path))
    if suffix == ".json":
        return parse_json(text, str(path))
    return parse_jsonl(text, str(path))


def parse_jsonl(text: str, label: str) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped. Errors name the file's own line number."""
    rows = []
    # split("\n"), not splitlines(): U+2028 and friends may appear inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = _loads(line)
        except json.JSONDecodeError as err:
            raise AntidoteError(
                f"{label} line {number} is not valid JSON ({err.msg}, column {err.colno}); fix that line"
            ) from err
        if not isinstance(record, dict):
            raise AntidoteError(
                f"{label} line {number} holds a JSON {_kind(record)}, not an object; each line must be "
                'one record like {"prompt": ..., "response": ...}'
            )
        bad = _lone_surrogate(record) if "\\u" in line else None
        if bad:
            raise AntidoteError(
                f"{label} line {number} holds a lone surrogate {bad}, which is not a Unicode character; "
                "fix that line (write the character itself, or both halves of its pair)"
            )
        rows.append(record)
    return rows


def parse_json(text: str, label: str) -> list[dict[str, Any]]:
    """A JSON array of objects, or an object whose only list value is that array ({"data": [...]})."""
    try:
        data = _loads(text)
    except json.JSONDecodeError as err:
        raise AntidoteError(
            f"{label} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno}); fix the file"
        ) from err
    bad = _lone_surrogate(data) if "\\u" in text else None
    if bad:
        raise AntidoteError(f"{label} holds a lone surrogate {bad}, which is not a Unicode character; fix it")
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise AntidoteError(f"{label} holds no list of records; expected a JSON array of objects")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise AntidoteError(
                f"{label}: record {index + 1} of the array is a JSON {_kind(record)}, not an object; "
                "expected a JSON array of objects"
            )
    return data


def parse_csv(text: str, label: str) -> list[dict[str, Any]]:
    """Rows keyed by the header; quoted newlines stay inside fields. Every value is a string."""
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    limit = csv.field_size_limit(MAX_CSV_FIELD)  # a long answer is an ordinary cell
    try:
        for row in reader:
            if None in row:  # more cells than header fields
                raise AntidoteError(
                    f"{label} line {reader.line_num} has more cells than the header "
                    f"({len(reader.fieldnames or [])} fields); quote cells that hold commas"
                )
            rows.append(row)
    except csv.Error as err:
        raise AntidoteError(
            f"{label} line {reader.line_num + 1} is not valid CSV ({err}); fix that line"
        ) from err
    finally:
        csv.field_size_limit(limit)
    return rows


def _kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
