"""Defenses and judges from other installed packages, found by entry point, so a user's own package can add
one without touching antidote (docs/adding-a-defense.md):

    [project.entry-points."antidote.defenses"]
    my-defense = "my_package.defense:DEFENSE"       # a `antidote.defenses.Defense`

    [project.entry-points."antidote.judges"]
    my-judge = "my_package.judge:make_judge"        # make_judge(path: str | None) -> a judge

A judge is any object with `name` and `verdicts(prompts, responses) -> list[str]` (each "safe", "unsafe",
"refused", "complied", "degenerate" or "unparsed"); `--judge my-judge[:PATH]` passes PATH to the factory.
An entry point that fails to load is left out with a warning naming it (the rest of antidote works).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)

DEFENSE_GROUP = "antidote.defenses"
JUDGE_GROUP = "antidote.judges"
# entry point -> why it was left out, for the "unknown defense/judge" messages
BROKEN: dict[str, str] = {}


def load_entry_points(group: str) -> dict[str, Any]:
    """name -> the loaded object of every entry point in `group` (those that fail are left out, said so)."""
    found: dict[str, Any] = {}
    for point in entry_points(group=group):
        try:
            found[point.name] = point.load()
        except Exception as err:  # a broken plug-in must not break antidote itself
            why = f"{type(err).__name__}: {err}"
            BROKEN[f"{group}:{point.name} ({point.value})"] = why
            log.warning(
                "entry point %s = %s in %s failed to load, left out: %s", point.name, point.value, group, why
            )
    return found


def broken_note() -> str:
    """'; plug-ins that failed to load: ...' for an unknown-name message, or ''."""
    if not BROKEN:
        return ""
    return "; plug-ins that failed to load: " + ", ".join(f"{k}: {v}" for k, v in BROKEN.items())


@cache
def judge_factories(builtin: tuple[str, ...] = ()) -> dict[str, Callable[[str | None], Any]]:
    """Judge kind -> factory, from the `antidote.judges` entry points (read once); `builtin`: the built-in
    judges' names, which a plug-in may not take."""
    factories = {}
    for name, factory in load_entry_points(JUDGE_GROUP).items():
        if name in builtin or ":" in name or not callable(factory):
            BROKEN[f"{JUDGE_GROUP}:{name}"] = "a built-in judge's name, a ':' in the name, or not callable"
            continue
        factories[name] = factory
    return factories
