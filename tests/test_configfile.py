"""The YAML config reader: safe reading, alias limits, key spellings and value types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from antidote import configfile
from antidote.configfile import config_from_mapping, read_yaml_mapping, values_from_mapping
from antidote.errors import AntidoteError


@dataclass
class Example:
    """Every kind of annotation the project's configs use."""

    model: str = field(metadata={"positional": True})
    seed: int = 0
    lr: float = 3e-4
    merge: bool = False
    output: str | None = None
    max_samples: int | None = None
    filters: list[str] = field(default_factory=list, metadata={"flag": "--filter"})
    mask_ratios: tuple[float, ...] = field(default=(0.1,), metadata={"flag": "--mask-ratio"})
    section: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] | None = None


def write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def one_line_error(call: Any, *args: Any) -> str:
    with pytest.raises(AntidoteError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


# ---- reading ------------------------------------------------------------------------------------------


def test_reads_a_mapping_with_or_without_bom(tmp_path: Path) -> None:
    text = "model: m\nmask-ratio: 0.05\n"
    assert read_yaml_mapping(write(tmp_path, text)) == {"model": "m", "mask-ratio": 0.05}
    bom = write(tmp_path, "\ufeff".encode() + text.encode(), "bom.yaml")
    assert read_yaml_mapping(bom) == {"model": "m", "mask-ratio": 0.05}
    assert read_yaml_mapping(write(tmp_path, "", "empty.yaml")) == {}
    assert read_yaml_mapping(write(tmp_path, "# only a comment\n", "comment.yaml")) == {}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("- a\n- b\n", "must be a mapping"),
        ("just text\n", "must be a mapping"),
        ("a: [1, 2\n", "not valid YAML"),
        ("a: 1\na: 2\n---\nb: 3\n", "not valid YAML"),
        ("a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        (b"a: \xff\xfe caf\xe9\n", "not UTF-8"),
        ("a: &x [1, *x]\n", "recursive alias"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
)
def test_bad_files_are_refused_in_one_line(content: str | bytes, expected: str, tmp_path: Path) -> None:
    message = one_line_error(read_yaml_mapping, write(tmp_path, content))
    assert expected in message


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in one_line_error(read_yaml_mapping, tmp_path / "none.yaml")


def billion_laughs(levels: int) -> str:
    lines = ['a0: &a0 "lol"']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nseed: *a{levels - 1}\n"


def test_billion_laughs_is_refused_without_expanding(tmp_path: Path) -> None:
    path = write(tmp_path, billion_laughs(10))  # 10**9 strings once expanded: gigabytes if printed
    assert "expands to more than 10,000 values" in one_line_error(read_yaml_mapping, path)


def test_alias_limit_counts_expanded_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # By hand: root mapping 1, keys a and b 2, the anchored list 1 + 3 items = 4, b's list 1 + 2 * 4 = 9.
    path = write(tmp_path, "a: &x [1, 2, 3]\nb: [*x, *x]\n")
    monkeypatch.setattr(configfile, "MAX_NODES", 16)
    assert read_yaml_mapping(path) == {"a": [1, 2, 3], "b": [[1, 2, 3], [1, 2, 3]]}
    monkeypatch.setattr(configfile, "MAX_NODES", 15)
    assert "expands to more than 15 values" in one_line_error(read_yaml_mapping, path)


# ---- keys -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["mask_ratios", "mask-ratios", "mask_ratio", "mask-ratio"])
def test_key_spellings(key: str) -> None:
    assert values_from_mapping(Example, {key: 0.2}, "c.yaml") == {"mask_ratios": 0.2}


def test_filter_flag_name_and_field_name() -> None:
    assert values_from_mapping(Example, {"filter": ["a=b"]}, "w") == {"filters": ["a=b"]}
    assert values_from_mapping(Example, {"filters": "a=b"}, "w") == {"filters": ["a=b"]}


def test_unknown_keys_listed_with_valid_ones() -> None:
    message = one_line_error(values_from_mapping, Example, {"alpah": 0.1, "seed": 1}, "config file c.yaml")
    assert message.startswith("config file c.yaml has unknown keys: alpah; valid keys: ")
    assert "mask_ratios" in message and "seed" in message


def test_same_field_twice_and_excluded_fields() -> None:
    message = one_line_error(values_from_mapping, Example, {"mask_ratio": 0.1, "mask-ratios": 0.2}, "w")
    assert "mask_ratios twice" in message
    with pytest.raises(AntidoteError, match="unknown keys: output"):
        values_from_mapping(Example, {"output": "x"}, "w", exclude=("output",))


# ---- values -----------------------------------------------------------------------------------------------

GOOD = [
    ("seed", 3, 3),
    ("lr", 1, 1.0),  # an int is fine for a float
    ("lr", "1e-4", 1e-4),  # YAML 1.1 reads 1e-4 as text
    ("lr", 2.5e-4, 2.5e-4),
    ("merge", True, True),
    ("output", None, None),
    ("output", "out/", "out/"),
    ("max_samples", None, None),
    ("max_samples", 10, 10),
    ("filters", [], []),
    ("mask_ratios", 0.1, 0.1),
    ("mask_ratios", "0.01,0.05", "0.01,0.05"),
    ("mask_ratios", [0.01, 0.05], [0.01, 0.05]),
    ("section", {"a": 1}, {"a": 1}),
    ("extra", None, None),
]


@pytest.mark.parametrize(("key", "value", "expected"), GOOD)
def test_values_of_the_right_type_are_accepted(key: str, value: Any, expected: Any) -> None:
    got = values_from_mapping(Example, {key: value}, "w")[key]
    assert got == expected and type(got) is type(expected)


BAD = [
    ("seed", "abc", "an integer"),
    ("seed", "3", "an integer"),
    ("seed", 3.0, "an integer"),
    ("seed", True, "an integer"),
    ("lr", "abc", "a number"),
    ("lr", True, "a number"),
    ("lr", float("nan"), "a finite number"),
    ("lr", float("inf"), "a finite number"),  # issue 16: inf trained a model of NaN
    ("lr", "-inf", "a finite number"),
    ("lr", [1], "a number"),
    ("merge", "no", "true or false"),
    ("merge", 0, "true or false"),
    ("output", 3, "text"),
    ("max_samples", "ten", "an integer or null"),
    ("filters", [1, 2], "a list of text"),
    ("filters", {"a": 1}, "a list of text"),
    ("mask_ratios", "abc", "a number or a comma list"),
    ("mask_ratios", "0.1,,0.2", "a number or a comma list"),
    ("mask_ratios", [], "a number or a comma list"),
    ("mask_ratios", True, "a number or a comma list"),
    ("section", [1], "a mapping"),
    ("extra", "x", "a mapping of option: value or null"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD)
def test_values_of_the_wrong_type_are_refused(key: str, value: Any, expected: str) -> None:
    message = one_line_error(values_from_mapping, Example, {key: value}, "config file c.yaml")
    assert message == f"config file c.yaml: {key}: {value!r} is not {expected}" or (
        message.startswith(f"config file c.yaml: {key}: {value!r} is not {expected}")
    )


def test_long_values_are_shortened() -> None:
    message = one_line_error(values_from_mapping, Example, {"seed": "x" * 10_000}, "w")
    assert len(message) < 120 and message.endswith("is not an integer")


def test_config_from_mapping_builds_the_dataclass() -> None:
    config = config_from_mapping(Example, {"seed": 2, "lr": "1e-3"}, "w", model="m")
    assert config == Example(model="m", seed=2, lr=1e-3)
    assert "model" in one_line_error(config_from_mapping, Example, {"seed": 2}, "w")


def test_cli_reads_config_through_the_checked_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from antidote.cli import main

    config = write(tmp_path, "max_prompts: '3'\n")
    assert main(["evaluate", "m", "--config", str(config), "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"antidote: error: config file {config}: max_prompts: '3' is not an integer or null"]
