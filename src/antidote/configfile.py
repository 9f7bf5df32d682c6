"""The one reader of YAML config files: `--config FILE.yaml` of every command and the sections of run configs.

`read_yaml_mapping(path)` reads a file safely (no Python objects, aliases limited, UTF-8 with or without a
byte-order mark); `config_from_mapping(cls, mapping, where)` turns a mapping into a config dataclass, naming
any unknown key or value of the wrong type in one line.

Keys may be written as the field name (`mask_ratios`), with dashes (`mask-ratios`), or as the command-line
flag (`mask-ratio`, `mask_ratio`). Values are checked against the field's annotation:

| annotation          | accepted                                                    |
|---------------------|-------------------------------------------------------------|
| bool                | true / false (not 'no', 0 or "false")                       |
| int                 | an integer (not 3.0, not "3")                               |
| float               | a finite number, or a string that is one (`1e-4`: YAML reads it as text)   |
| str                 | text (quote numbers: `"2024"`)                              |
| list[str]           | a list of text, or one text                                 |
| tuple[float, ...]   | a number, a comma string `0.01,0.05`, or a list of numbers   |
| dict[str, ...]      | a mapping                                                   |
| X | None            | null, or what X accepts                                     |
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError

MAX_NODES = 10_000  # values in a config once aliases are expanded: a config is a few dozen


def _count_nodes(node: Any, memo: dict[int, int], active: set[int]) -> int:
    """Number of nodes of a composed YAML document with every alias expanded (shared nodes counted
    each time they are referenced), computed without expanding."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise AntidoteError("recursive")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_count_nodes(child, memo, active) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_count_nodes(k, memo, active) + _count_nodes(v, memo, active) for k, v in node.value)
    active.discard(key)
    memo[key] = total
    return total


def _duplicate_key(node: Any) -> tuple[str, int] | None:
    """The first key written twice in one mapping of a composed YAML document, with its line (1-based);
    None if there is none. YAML loaders keep the last value silently: a second `defenses:` would drop the
    first one's defenses without a word."""
    import yaml

    seen: set[int] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in keys:
                        return key.value, key.start_mark.line + 1
                    keys.add(key.value)
                todo += [key, value]
        elif isinstance(current, yaml.SequenceNode):
            todo += current.value
    return None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (keys as text, as written). An empty file gives {}.

    Refused in one line: a missing file, text that is not UTF-8, invalid YAML, anything but a mapping at
    the top, a key given twice in one mapping, and documents whose aliases expand to more than MAX_NODES
    values ("billion laughs").
    """
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise AntidoteError(f"config file {path} not found")
    try:
        text = file.read_bytes().decode("utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as err:
        raise AntidoteError(
            f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    except OSError as err:
        raise AntidoteError(f"cannot read config file {path}: {err.strerror or err}") from err
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        try:
            size = _count_nodes(node, {}, set())
        except AntidoteError as err:
            raise AntidoteError(f"config file {path} has a recursive alias; write the values out") from err
        if size > MAX_NODES:
            raise AntidoteError(
                f"config file {path} expands to more than {MAX_NODES:,} values (YAML aliases?); "
                "write the values out"
            )
        duplicate = _duplicate_key(node)
        if duplicate is not None:
            raise AntidoteError(
                f"config file {path} gives {duplicate[0]} twice (again on line {duplicate[1]}); YAML would "
                "keep only the last: merge them into one"
            )
        data = loader.construct_document(node)
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise AntidoteError(f"config file {path} is not valid YAML ({first})") from err
    except RecursionError as err:
        raise AntidoteError(f"config file {path} is nested too deeply") from err
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise AntidoteError(
            f"config file {path} must be a mapping of option: value, not {type(data).__name__}"
        )
    return {str(k): v for k, v in data.items()}


# ---- mapping -> dataclass -------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(annotation: Any, value: Any) -> tuple[bool, Any, str]:
    """(accepted, value to use, what was expected) for a value against a field annotation."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return True, None, "null"
        expected = []
        for arg in args:
            if arg is type(None):
                continue
            ok, converted, what = _check_value(arg, value)
            if ok:
                return True, converted, what
            expected.append(what)
        return False, value, " or ".join(expected) + (" or null" if type(None) in args else "")
    if annotation is Any:
        return True, value, "any value"
    if annotation is bool:
        return isinstance(value, bool), value, "true or false"
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if annotation is float:
        return _float(value)
    if annotation is str:
        return isinstance(value, str), value, "text (put numbers in quotes)"
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list):
            checked = [_check_value(item, v) for v in items]
            if all(ok for ok, _, _ in checked):
                return True, [v for _, v, _ in checked], "a list"
            return False, value, "a list of " + next(what for ok, _, what in checked if not ok)
        return False, value, "a list of " + _check_value(item, object())[2]
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis and args[0] is float:
            return _ratios(value)
        return isinstance(value, (list, tuple)), value, "a list"
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value, "a mapping of option: value"
    if isinstance(annotation, type):
        return isinstance(value, annotation), value, annotation.__name__
    return True, value, "any value"


def _float(value: Any) -> tuple[bool, Any, str]:
    what = "a number"
    if isinstance(value, bool):
        return False, value, what
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        try:
            number = float(value.strip())
        except ValueError:
            return False, value, what
    else:
        return False, value, what
    if not math.isfinite(number):  # NaN, inf: a learning rate of inf trains a model of NaN
        return False, value, "a finite number"
    return True, number, what


def _ratios(value: Any) -> tuple[bool, Any, str]:
    """A number, a comma string or a list of numbers; the value is passed on as given."""
    what = "a number or a comma list like 0.01,0.05"
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    if not isinstance(items, (list, tuple)) or not items:
        return False, value, what
    return all(_float(v)[0] for v in items), value, what


def _non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """(where, value) of the first NaN or infinite float in `value` (a number, or lists, tuples and dicts of
    them; `where` grows by `.key` / `[i]` on the way down), else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    if isinstance(value, dict):
        items: Iterable[tuple[str, Any]] = ((f".{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for step, item in items:
        found = _non_finite(item, where + step)
        if found is not None:
            return found
    return None


def check_finite_fields(config: Any, *, as_flags: bool = True) -> None:
    """Refuse a config dataclass whose numbers include NaN or an infinity, whatever they came from (the
    command line, a YAML file or Python): a learning rate of inf trains a model of NaN without any error.
    Called by every config built from the command line or YAML, and by the training configs'
    validation. as_flags: name a field by its flag (`--lr`), else by its key (`lr`, `align.lr`)."""
    for f in dataclasses.fields(config):
        found = _non_finite(getattr(config, f.name, None))
        if found is not None:
            where, bad = found
            name = str(f.metadata.get("flag", "--" + f.name.replace("_", "-"))) if as_flags else f.name
            raise AntidoteError(
                f"{name}{where} is {bad}, not a finite number; give an ordinary number like 0.1"
            )


def field_aliases(cls: type) -> dict[str, str]:
    """Every accepted spelling of a key (dashes read as underscores) -> the field name."""
    aliases = {}
    for f in dataclasses.fields(cls):
        aliases[f.name] = f.name
        flag = f.metadata.get("flag")
        if flag:
            aliases[str(flag).lstrip("-").replace("-", "_")] = f.name
    return aliases


def values_from_mapping(
    cls: type, mapping: Mapping[str, Any], where: str, *, exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """Field name -> checked value for each key of `mapping`; `where` starts every error message.

    exclude: fields that may not be given here (e.g. those a pipeline sets itself).
    """
    if not isinstance(mapping, Mapping):
        raise AntidoteError(f"{where} must be a mapping of option: value, not {type(mapping).__name__}")
    excluded = set(exclude)
    aliases = {k: v for k, v in field_aliases(cls).items() if v not in excluded}
    hints = typing.get_type_hints(cls)
    named: list[tuple[str, str, Any]] = []  # (field, key as written, value)
    unknown = []
    for key, value in mapping.items():
        name = aliases.get(str(key).replace("-", "_"))
        if name is None:
            unknown.append(_short(str(key))[1:-1])
        else:
            named.append((name, str(key), value))
    if unknown:
        valid = sorted(f.name for f in dataclasses.fields(cls) if f.name not in excluded)
        raise AntidoteError(
            f"{where} has unknown keys: {', '.join(sorted(unknown))}; valid keys: {', '.join(valid)}"
        )
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for name, key, value in named:
        if name in given:
            raise AntidoteError(f"{where} gives {name} twice (as {given[name]} and {key}); keep one")
        given[name] = key
        ok, converted, expected = _check_value(hints[name], value)
        if not ok:
            raise AntidoteError(f"{where}: {key}: {_short(value)} is not {expected}")
        values[name] = converted
    return values


def config_from_mapping(
    cls: type, mapping: Mapping[str, Any], where: str, *, exclude: Iterable[str] = (), **fixed: Any
) -> Any:
    """Build the dataclass `cls` from a mapping (see the module docstring for keys and values).

    fixed: field values set by the caller; they win over the mapping.
    """
    values = values_from_mapping(cls, mapping, where, exclude=exclude)
    try:
        config = cls(**{**values, **fixed})
    except TypeError as err:  # a required field is missing
        raise AntidoteError(f"{where}: {err}") from err
    try:
        check_finite_fields(config, as_flags=False)
    except AntidoteError as err:
        raise AntidoteError(f"{where}: {err}") from err
    return config
