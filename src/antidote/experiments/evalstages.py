"""The pipeline's evaluation stages: generate (scored by the keyword judge as it goes), then each further
judge as a stage of its own over the saved generations, with judges loaded on first use."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from antidote.evaluation.run import EvaluateConfig
from antidote.outputs import json_text


class JudgeSet:
    """Judges are loaded on first use, so a rerun that finds every evaluation done loads none."""

    def __init__(self, specs: list[str]) -> None:
        self.specs = specs
        self.loaded: dict[str, Any] = {}

    def __getitem__(self, spec: str) -> Any:
        if spec not in self.loaded:
            from antidote.evaluation.judges import make_judge

            self.loaded[spec] = make_judge(spec)
        return self.loaded[spec]


def generate_stage(out: Path, config: EvaluateConfig) -> None:
    """Generate into `out` (results.json, generations.jsonl), scored by the keyword judge as it goes."""
    from antidote.evaluation.judges.keyword import KeywordJudge
    from antidote.evaluation.run import run_evaluate

    out.mkdir()
    run_evaluate(replace(config, output=str(out / "results.json"), also_judges=[]), judge=KeywordJudge())


def judge_stage(out: Path, generated: Path, spec: str, judges: JudgeSet) -> None:
    """Score an evaluation stage's saved harmful-prompt generations with one more judge."""
    from antidote.evaluation.judges import verdict_row

    records = [json.loads(line) for line in (generated / "generations.jsonl").read_text().splitlines()]
    harmful = [g for g in records if g["set"] == "harmful"]
    judge = judges[spec]
    verdicts = judge.verdicts([g["prompt"] for g in harmful], [g["response"] for g in harmful])
    out.mkdir()
    (out / "verdicts.json").write_text(json_text(verdicts) + "\n")
    (out / "judged.json").write_text(json_text(verdict_row(verdicts, judge.name), indent=2) + "\n")
