"""Judges of harmful output, one module per kind, named by a spec `KIND` or `KIND:PATH`.

`JUDGES` is the registry: each kind's class (imported on first use, so `antidote --help` loads no model
code), whether it reads a PATH, its source without one, and its help line; the CLI's and configs' judge help
is built from it. Adding a judge kind is one module with a `Judge` subclass and one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from antidote.errors import AntidoteError
from antidote.evaluation.judges.base import (
    HARMFUL_LABELS,
    HARMFUL_VERDICTS,
    SAFE_LABELS,
    VERDICTS,
    HarmfulScore,
    Judge,
    harmful_score,
    verdict_row,
)


@dataclass(frozen=True)
class JudgeKind:
    name: str
    judge: str  # "module:Class", a `Judge` subclass
    help: str
    takes_path: bool = True  # KIND:PATH (a folder or hub id); a bare KIND reads `default`
    default: str | None = None
    factory: Callable[[str | None], Any] | None = None  # a plug-in's (an `antidote.judges` entry point)

    def load_class(self) -> type[Judge]:
        if self.factory is not None:
            return type("PluginJudge", (PluginJudge,), {"factory": staticmethod(self.factory)})
        module, _, name = self.judge.partition(":")
        cls: type[Judge] = getattr(importlib.import_module(module), name)
        return cls


_J = "antidote.evaluation.judges"
JUDGES = {
    kind.name: kind
    for kind in (
        JudgeKind("keyword", f"{_J}.keyword:KeywordJudge", "offline refusal markers", takes_path=False),
        JudgeKind(
            "beavertails",
            f"{_J}.classifier:ClassifierJudge",
            "beaver-dam-7b-style classifier",
            default="PKU-Alignment/beaver-dam-7b",
        ),
        JudgeKind(
            "llamaguard",
            f"{_J}.generative:LlamaGuardJudge",
            "Llama-Guard-style LM",
            default="meta-llama/Llama-Guard-3-1B",
        ),
        JudgeKind(
            "harmbench",
            f"{_J}.generative:HarmBenchJudge",
            "the HarmBench classifier",
            default="cais/HarmBench-Llama-2-13b-cls",
        ),
        JudgeKind(
            "learned",
            f"{_J}.learned:LearnedJudge",
            "probe from antidote judge train; bare: the installed default",
        ),
        JudgeKind("gcg", f"{_J}.gcg:GcgJudge", "GCG's refusal strings, as papers report", takes_path=False),
    )
}
JUDGE_KINDS = tuple(JUDGES)


class PluginJudge(Judge):
    """A judge of another installed package: its entry point's factory(path) makes the judge object (any
    object with `name` and `verdicts`); `version` is the factory's own, if it has one."""

    factory: ClassVar[Callable[[str | None], Any]]

    @classmethod
    def load(cls, path: str | None, *, default: str | None, device: str, dtype: str) -> Any:
        return cls.factory(path)


def judge_kinds() -> dict[str, JudgeKind]:
    """The built-in kinds and those of installed packages (the `antidote.judges` entry points, read once;
    docs/adding-a-defense.md); a plug-in may not take a built-in kind's name."""
    from antidote.plugins import judge_factories

    plugins = {
        name: JudgeKind(name, f"plugin:{name}", "from an installed package", factory=factory)
        for name, factory in judge_factories(JUDGE_KINDS).items()
    }
    return {**JUDGES, **plugins}


def judge_help() -> str:
    """One line naming every judge kind, for help texts: `keyword (offline ...), beavertails[:PATH] (...)`."""
    return (
        ", ".join(f"{k.name}{'[:PATH]' if k.takes_path else ''} ({k.help})" for k in JUDGES.values())
        + "; without PATH the reference hub id"
    )


def parse_judge_spec(spec: str) -> tuple[str, str | None]:
    """'beavertails:/models/dam' -> ('beavertails', '/models/dam'); an unknown kind is an error."""
    kind, sep, path = spec.partition(":")
    kinds = JUDGES if kind in JUDGES else judge_kinds()
    if kind not in kinds:
        from antidote.plugins import broken_note

        with_path = ", ".join(f"{k}:PATH" for k, j in JUDGES.items() if j.takes_path)
        raise AntidoteError(
            f"unknown judge {spec!r}; choose one of {', '.join(kinds)} "
            f"(model judges take a path: {with_path}; a bare learned is the default learned judge, "
            f"antidote judge train installs it){broken_note()}"
        )
    if sep and not kinds[kind].takes_path:
        raise AntidoteError(f"the {kind} judge takes no model path; write just {kind}")
    return kind, (path or None)


def _kind(name: str) -> JudgeKind:
    return JUDGES[name] if name in JUDGES else judge_kinds()[name]


def judge_class(spec: str) -> tuple[type[Judge], str | None]:
    kind, path = parse_judge_spec(spec)
    return _kind(kind).load_class(), path


def judge_version(spec: str) -> int:
    """The code version of the judge `spec` names (its class's `version`; a plug-in factory's `version`
    attribute, else 1): judged stages are keyed on it."""
    cls = judge_class(spec)[0]
    if issubclass(cls, PluginJudge):
        return int(getattr(cls.factory, "version", 1))
    return cls.version


def make_judge(spec: str, *, device: str = "auto", dtype: str = "auto") -> Any:
    """A judge object with `name` and `verdicts(prompts, responses) -> list[str]`."""
    kind, path = parse_judge_spec(spec)
    found = _kind(kind)
    return found.load_class().load(path, default=found.default, device=device, dtype=dtype)


def judge_source(spec: str) -> str | None:
    """What a judge spec reads (the default learned judge's folder for a bare `learned`), for cache keys."""
    cls, path = judge_class(spec)
    return cls.source(path)


def check_judge(spec: str) -> None:
    """A named judge folder must be one: fail before any work."""
    cls, path = judge_class(spec)
    cls.check(path)


def available_judges(specs: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The judges to score with, and those left out with the reason: only a default judge that the default
    judge lists name (the bare `learned`) may be left out, when it is not installed."""
    missing = {}
    for spec in specs:
        cls, path = judge_class(spec)
        why = cls.unavailable(path)
        if why is not None:
            missing[spec] = why
    return [s for s in specs if s not in missing], missing


def score_harmful(
    records: list[dict[str, Any]], specs: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Score the harmful-prompt answers of `records` (generations) with each judge in `specs`.

    Returns ({spec: {judge, hs, hs_ci, unparsed}}, {spec left out: why}); each harmful record gets
    `by_judge: {spec: verdict}` in place, for paired comparisons."""
    specs, missing = available_judges(specs)
    harmful = [r for r in records if r["set"] == "harmful"]
    out = {}
    for spec in specs:
        judge = make_judge(spec)
        verdicts = judge.verdicts([r["prompt"] for r in harmful], [r["response"] for r in harmful])
        for record, verdict in zip(harmful, verdicts, strict=True):
            record.setdefault("by_judge", {})[spec] = verdict
        out[spec] = verdict_row(verdicts, judge.name)
        del judge
    return out, missing


__all__ = [
    "HARMFUL_LABELS",
    "HARMFUL_VERDICTS",
    "JUDGES",
    "JUDGE_KINDS",
    "SAFE_LABELS",
    "VERDICTS",
    "HarmfulScore",
    "Judge",
    "JudgeKind",
    "PluginJudge",
    "available_judges",
    "check_judge",
    "harmful_score",
    "judge_help",
    "judge_kinds",
    "judge_source",
    "judge_version",
    "make_judge",
    "parse_judge_spec",
    "score_harmful",
    "verdict_row",
]
