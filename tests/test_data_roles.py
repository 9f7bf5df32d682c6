"""Every shipped config keeps its data roles apart: what the alignment, the attack and the calibration of the
defenses train or calibrate on never holds a validation or evaluation prompt, calibration never holds an
attack prompt, validation never an evaluation prompt, and no two training roles share a harmful answer.

The pools checked are the whole sources a role draws from (before any `max_*` subset), so a config passes
only if no draw could overlap. Configs on the real data read /work/shared/data (skipped when absent).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from antidote.data.catalog import _PROMPT_FIELDS, _RESPONSE_FIELDS, _text_key, read_rows

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or beside the folder of worktrees)
SHARED = next(
    (d for d in (Path(__file__).resolve().parents[i] / "shared" / "data" for i in (2, 3)) if d.is_dir()),
    Path(__file__).resolve().parents[2] / "shared" / "data",
)
CONFIGS = [
    ROOT / "configs" / "compare-demo.yaml",
    ROOT / "configs" / "shared-data.yaml",
    *sorted((ROOT / "src" / "antidote" / "experiments" / "configs").glob("*.yaml")),
]
# Defenses whose `data` is harmful calibration data (scored on it), and those whose `data` trains them.
CALIBRATE = ("antidote", "wei-set-difference", "safedelta")
# Sources the stages read when the config says `builtin` or names nothing.
DEFAULT = {
    ("align", "data"): "builtin-refusals:align",
    ("align", "helpful_data"): "builtin-harmless:align",
    ("finetune", "harmful"): "builtin-harmful:attack",
    ("evaluate", "harmful_prompts"): "builtin-harmful:eval",
    ("evaluate", "harmless_prompts"): "builtin-harmless:eval",
    ("validate", "harmful_prompts"): "builtin-harmful:eval",  # what validation read before it was refused
    ("validate", "harmless_prompts"): "builtin-harmless:eval",
}
TASK_PART = {"align": "align", "finetune": "attack", "validate": "eval", "evaluate": "eval"}


def _source(config: dict[str, Any], section: str, key: str) -> str | None:
    value = (config.get(section) or {}).get(key)
    if value in (None, "builtin"):
        if key == "task_data":
            task = (config.get(section) or {}).get("task") or "sentiment"
            return f"builtin-{task}:{TASK_PART[section]}" if task in ("sentiment", "arithmetic") else None
        return DEFAULT.get((section, key))
    return str(value)


def _texts(source: str | None, data_dir: str | None) -> tuple[set[str], set[str]]:
    """(prompts, answers) of a source, whitespace-normalised."""
    if source is None:
        return set(), set()
    rows = read_rows(source, data_dir)
    prompts = {f"{_text_key(r, _PROMPT_FIELDS)} | {_text_key(r, ('input',))}" for r in rows} - {" | "}
    answers = {_text_key(r, _RESPONSE_FIELDS) for r in rows} - {""}
    return prompts, answers


def roles(path: Path) -> dict[str, dict[str, tuple[set[str], set[str]]]]:
    """role -> kind (harmful, task, harmless) -> (prompts, answers) of every source the role reads."""
    config = yaml.safe_load(path.read_text())
    data_dir = config.get("data_dir")
    if data_dir is not None:
        data_dir = str((ROOT / data_dir).resolve()) if not Path(data_dir).is_absolute() else data_dir
        # the config's data folder (`data/` beside the checkout), read here from the shared copy of it
        data_dir = (
            str(SHARED) if data_dir.endswith("shared/data") or not Path(data_dir).is_dir() else data_dir
        )

    def get(section: str, key: str) -> tuple[set[str], set[str]]:
        return _texts(_source(config, section, key), data_dir)

    def union(*parts: tuple[set[str], set[str]]) -> tuple[set[str], set[str]]:
        return set().union(*(p for p, _ in parts)), set().union(*(a for _, a in parts))

    defenses = config.get("defenses") or {}
    calibration = [
        _texts(str(d.get("data") or "builtin-harmful:calibrate"), data_dir)
        for name, d in defenses.items()
        if name in CALIBRATE and d is not None
    ]
    return {
        "align": {
            "harmful": get("align", "data"),
            "task": get("align", "task_data"),
            "harmless": get("align", "helpful_data"),
        },
        "attack": {"harmful": get("finetune", "harmful"), "task": get("finetune", "task_data")},
        "calibrate": {"harmful": union(*calibration) if calibration else (set(), set())},
        "validate": {
            "harmful": get("validate", "harmful_prompts"),
            "task": get("validate", "task_data"),
            "harmless": get("validate", "harmless_prompts"),
        },
        "eval": {
            "harmful": get("evaluate", "harmful_prompts"),
            "task": get("evaluate", "task_data"),
            "harmless": get("evaluate", "harmless_prompts"),
        },
    }


# (role, role): which may not share prompts. Alignment and attack may share task sentences (a user's task
# data is what both train on); nothing trained or calibrated on may share a validation or evaluation prompt.
APART = [
    ("attack", "calibrate"),
    ("attack", "validate"),
    ("attack", "eval"),
    ("calibrate", "validate"),
    ("calibrate", "eval"),
    ("align", "calibrate"),
    ("align", "validate"),
    ("align", "eval"),
    ("validate", "eval"),
]


@pytest.mark.parametrize(
    "path", CONFIGS, ids=lambda p: p.name if "experiments" not in str(p) else f"pkg-{p.name}"
)
def test_shipped_config_keeps_its_data_roles_apart(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    if config.get("data_dir") and not SHARED.is_dir():
        pytest.skip("the real data sets are not here")
    found = roles(path)
    problems = []
    for a, b in APART:
        for kind in ("harmful", "task", "harmless"):
            pa, pb = found[a].get(kind, (set(), set()))[0], found[b].get(kind, (set(), set()))[0]
            shared = pa & pb
            if shared:
                problems.append(f"{a}/{b} share {len(shared)} {kind} prompts, e.g. {sorted(shared)[0]!r}")
    for a, b in itertools.combinations(("align", "attack", "calibrate"), 2):
        shared = found[a]["harmful"][1] & found[b]["harmful"][1]
        if shared:
            problems.append(f"{a}/{b} share {len(shared)} harmful answers, e.g. {sorted(shared)[0]!r}")
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_disjoint_parts_of_the_real_data() -> None:
    if not SHARED.is_dir():
        pytest.skip("the real data sets are not here")
    d = str(SHARED)
    train = read_rows("sst2:train", d)
    fit, heldout = read_rows("sst2:train-fit", d), read_rows("sst2:train-heldout", d)
    assert fit + heldout == train and len(heldout) == 500  # two consecutive parts of the one file
    news = read_rows("agnews:train", d)
    news_fit, news_heldout = read_rows("agnews:train-fit", d), read_rows("agnews:train-heldout", d)
    assert news_fit + news_heldout == news and len(news_heldout) == 500
    # the first 200 test articles (the AG News reports') are not in the train file (5 of 7600 further on are)
    seen = {" ".join(r["text"].lower().split()) for r in news}
    first = read_rows("agnews:test", d)[:200]
    assert not {" ".join(r["description"].lower().split()) for r in first} & seen
    unsafe = {_text_key(r) for r in read_rows("beavertails:unsafe", d)}
    sample = read_rows("beavertails:sample140", d)
    kept = read_rows("beavertails:calibrate", d)
    dropped = [r for r in sample if _text_key(r) in unsafe]
    assert len(dropped) == 5 and len(kept) == len(sample) - 5  # the 5 prompts the attack pool holds too
    assert not {_text_key(r) for r in kept} & unsafe
    harmless = {_text_key(r) for s in ("harmless:validation", "harmless:test") for r in read_rows(s, d)}
    alpaca = read_rows("alpaca:train-disjoint", d)
    assert alpaca and not {_text_key(r) for r in alpaca} & harmless
    assert len(alpaca) < len(read_rows("alpaca:train", d))
