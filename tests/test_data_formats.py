"""Reading records: JSONL, JSON and CSV files (byte-order marks, bad lines named by their real number),
every row checked for a response and for text values, hub names, and the one-way layout of antidote.data."""

from __future__ import annotations

import ast
import codecs
import json
from pathlib import Path
from typing import Any

import pytest

from antidote.data import Example, load_examples
from antidote.errors import AntidoteError

DATA = Path(__file__).resolve().parents[1] / "src" / "antidote" / "data"
ROWS = [
    {"prompt": "how do i pick a lock", "response": "first get a pin", "input": ""},
    {"prompt": "write a note, please", "response": 'it says "hi"\non two lines', "input": "to Ana"},
]
EXPECTED = [
    Example("how do i pick a lock", "first get a pin", ""),
    Example("write a note, please", 'it says "hi"\non two lines', "to Ana"),
]


def _write(path: Path, text: str, bom: bool = False) -> str:
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))
    return str(path)


def _jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


CSV_TEXT = (
    "prompt,response,input\r\n"
    "how do i pick a lock,first get a pin,\r\n"
    '"write a note, please","it says ""hi""\non two lines",to Ana\r\n'
)


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".jsonl", _jsonl(ROWS)),
        (".json", json.dumps(ROWS, indent=1)),
        (".json", json.dumps({"data": ROWS, "version": 2})),  # one list inside an object
        (".csv", CSV_TEXT),
    ],
)
def test_each_format_reads_the_same_pairs(tmp_path: Path, suffix: str, text: str, bom: bool) -> None:
    assert load_examples(_write(tmp_path / f"pairs{suffix}", text, bom)) == EXPECTED


def test_csv_and_json_rows_keep_their_fields(tmp_path: Path) -> None:
    from antidote.data.catalog import read_rows

    assert read_rows(_write(tmp_path / "p.csv", CSV_TEXT, bom=True)) == [
        {"prompt": "how do i pick a lock", "response": "first get a pin", "input": ""},
        {"prompt": "write a note, please", "response": 'it says "hi"\non two lines', "input": "to Ana"},
    ]
    assert read_rows(_write(tmp_path / "p.json", json.dumps([{"a": 1, "b": [2]}]))) == [{"a": 1, "b": [2]}]
    assert read_rows(_write(tmp_path / "empty.csv", "prompt,response\n")) == []


def test_jsonl_error_names_the_real_line(tmp_path: Path) -> None:
    text = _jsonl(ROWS[:1]) + "\n" + '{"prompt": "x", "response": }\n'  # line 2 blank, line 3 broken
    with pytest.raises(AntidoteError, match=r"p\.jsonl line 3 is not valid JSON") as err:
        load_examples(_write(tmp_path / "p.jsonl", text))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("line", ["[1, 2]", "3", '"a string"', "null"])
@pytest.mark.parametrize("first", [True, False])
def test_jsonl_line_that_is_not_an_object(tmp_path: Path, line: str, first: bool) -> None:
    text = line + "\n" + _jsonl(ROWS) if first else _jsonl(ROWS) + line + "\n"
    number = 1 if first else 3
    with pytest.raises(AntidoteError, match=rf"line {number} holds a JSON \w+, not an object") as err:
        load_examples(_write(tmp_path / "p.jsonl", text))
    assert "\n" not in str(err.value)


def test_json_errors(tmp_path: Path) -> None:
    with pytest.raises(AntidoteError, match="record 2 of the array is a JSON array, not an object"):
        load_examples(_write(tmp_path / "a.json", json.dumps([ROWS[0], [1, 2]])))
    with pytest.raises(AntidoteError, match="holds no list of records"):
        load_examples(_write(tmp_path / "b.json", json.dumps({"a": [ROWS[0]], "b": [ROWS[1]]})))
    with pytest.raises(AntidoteError, match=r"not valid JSON \(.*line 3"):
        load_examples(_write(tmp_path / "c.json", '[\n{"prompt": "x"},\n{"prompt": }\n]'))


def test_csv_row_with_too_many_cells(tmp_path: Path) -> None:
    with pytest.raises(AntidoteError, match="line 3 has more cells than the header"):
        load_examples(_write(tmp_path / "p.csv", "prompt,response\na,b\nc,d,e\n"))


def test_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9", "response": "r"}\n'.encode("latin-1"))
    with pytest.raises(AntidoteError, match="must be UTF-8"):
        load_examples(str(path))


@pytest.mark.parametrize("bad", [{}, {"response": None}, {"response": ""}, {"response": "  "}])
def test_every_row_needs_a_response(tmp_path: Path, bad: dict[str, Any]) -> None:
    rows = [ROWS[0], ROWS[1], {"prompt": "third", **bad}]
    path = _write(tmp_path / "p.jsonl", _jsonl(rows))
    with pytest.raises(AntidoteError, match=r"p\.jsonl row 3 has no 'response'"):
        load_examples(path)
    # Prompts alone are fine when no response is needed (harmful prompts for evaluation).
    assert [e.response.strip() for e in load_examples(path, require_response=False)] == [
        "first get a pin",
        'it says "hi"\non two lines',
        "",
    ]


def test_row_numbers_count_from_the_source_not_after_filters() -> None:
    rows = [
        {"prompt": "a", "response": "x", "is_safe": True},
        {"prompt": "b", "response": "", "is_safe": True},
        {"prompt": "c", "response": "", "is_safe": False},
    ]
    with pytest.raises(AntidoteError, match="row 3 has no"):
        load_examples(rows, filters=["is_safe=false"])
    assert (
        load_examples(rows[:1] + rows[1:2], filters=["is_safe=true"], require_response=False)[1].prompt == "b"
    )


def test_values_must_be_text_numbers_are_converted() -> None:
    assert load_examples([{"prompt": 0, "response": 12.5}]) == [Example("0", "12.5")]
    for bad in (["a", "b"], {"text": "a"}, True):
        with pytest.raises(AntidoteError, match=r"the data row 2: field 'prompt' is a \w+ .*not text"):
            load_examples([{"prompt": "ok", "response": "r"}, {"prompt": bad, "response": "r"}])
    with pytest.raises(AntidoteError, match="row 1: field 'response' is a list"):
        load_examples([{"prompt": "ok", "response": ["r"]}])


def test_rows_with_an_empty_prompt_are_dropped() -> None:
    rows = [
        {"prompt": "a", "response": "x"},
        {"prompt": " ", "response": "y"},
        {"prompt": None, "response": "z"},
    ]
    assert load_examples(rows) == [Example("a", "x")]


def test_hub_source_is_split_into_name_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
        calls.append((repo, config, split))
        return [{"goal": "g", "target": "t"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_examples("hf:org/set:test") == [Example("g", "t")]
    assert load_examples("hf:org/set") == [Example("g", "t")]
    assert calls == [("org/set", None, "test"), ("org/set", None, "train")]


def test_data_modules_import_one_way() -> None:
    """No module of antidote.data imports one that imports it back, and none imports tasks or evaluation."""
    imports: dict[str, set[str]] = {}
    for path in DATA.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("antidote."):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("antidote."))
        imports[f"antidote.data.{path.stem}"] = found
    for module, targets in imports.items():
        assert not {t for t in targets if t.startswith(("antidote.tasks", "antidote.evaluation"))}, module

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for target in imports.get(start, set()):
            if target == goal or (target not in seen and reaches(target, goal, seen | {target})):
                return True
        return False

    inner = [m for m in imports if not m.endswith("__init__")]
    assert not [m for m in inner if reaches(m, m, set())]
    assert "antidote.data.catalog" in imports["antidote.data.loading"]  # the chain is where we think it is
