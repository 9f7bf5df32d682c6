"""The result rows of `antidote compare`, defined once: `ResultRow` (one defense x cell x judge) and
`TableEntry` (one judge x setting x defense, over seeds). results.json, results.csv, report.md, table.tex
and the plots all read these records."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidote.evaluation.judges import HARMFUL_VERDICTS
from antidote.evaluation.stats import crossed_bootstrap, wilson_interval
from antidote.experiments import front
from antidote.experiments.cache import StageCache
from antidote.experiments.matrix import MATRIX_KEYS, SFT, Cell
from antidote.experiments.runconfig import stage_config
from antidote.experiments.utility import mean_utility
from antidote.outputs import json_text

CSV_FIELDS = (
    "defense", "variant", "label", "cell", "setting", "seed", "judge", "judge_spec", "hs", "hs_low",
    "hs_high", "degenerate", "fa", "fa_low", "fa_high", "over_refusal", "broken", "on_front", "seconds",
    "pipeline_seconds", "peak_rss_mib", "peak_cuda_allocated_mib", "lr", "epochs", "harmful_ratio",
    "num_samples", "task", "prompt_set", "n_prompts", "eval_task", "n_task", "general_utility",
    "chosen_variant", "chosen_within_budget",
)  # fmt: skip
MEASURED = ("seconds", "pipeline_seconds", "peak_rss_mib", "peak_cuda_allocated_mib")


@dataclass
class ResultRow:
    """One defense (variant) in one cell, by one judge. HS, FA and their shares in percent; the intervals are
    95% Wilson intervals over the prompts (items); seconds and peaks are the stages' recorded ones."""

    defense: str  # a defense's name; `sft` (the plain attack), `aligned` or `base`
    variant: str  # a post defense's variant ("" for none)
    label: str  # defense@variant
    cell: str
    setting: str
    seed: int
    judge: str
    judge_spec: str
    hs: float
    hs_ci: list[float]
    fa: float
    fa_ci: list[float]
    over_refusal: float
    degenerate: float
    seconds: float | None  # the defense's own stages (sft: the attack)
    pipeline_seconds: float | None  # base model -> this model
    peak_rss_mib: float | None
    peak_cuda_allocated_mib: float | None
    lr: float
    epochs: int
    harmful_ratio: float
    num_samples: int
    task: str
    prompt_set: str
    n_prompts: int
    eval_task: str
    n_task: int
    stages: dict[str, str]  # the defense's own stages: stage name -> folder in OUT/stages
    eval_stage: str
    general_utility: dict[str, dict[str, float]] | None
    recovered: list[float | None] | None
    # per-prompt indicators in the prompts' order: harmful (1/0) by this row's judge, correct (1/0) per item
    hs_flags: list[int] = field(default_factory=list)
    fa_flags: list[int] = field(default_factory=list)
    # a defense chosen on validation is reported at that variant alone: a row labelled by the defense, with
    # `chosen_variant` saying which; its variant rows stay for the plots and files but leave the tables
    chosen_variant: str | None = None
    chosen_within_budget: bool | None = None  # False: no variant kept the FA budget, the fallback chose it
    in_table: bool = True
    # `front.marks` against the aligned row of the same judge and cell (set by `mark_rows`)
    broken: str = ""  # why the row is broken (degenerate or over-refusal past its margin); "" when not
    on_front: bool = False  # on the HS-FA-over-refusal front

    def setting_value(self, key: str) -> Any:
        return getattr(self, key)


def cell_rows(
    cell: Cell,
    summary: dict[str, Any],
    cache: StageCache,
    utility: dict[str, dict[str, dict[str, float]]] | None = None,
) -> list[ResultRow]:
    """The cell's result rows (one per model x judge), named by defense, with cost and settings. The
    stages of each row come from the pipeline's own record of what made its model."""
    ft = stage_config(cell.config, "finetune", model="<model>", output="<output>")
    rows = []
    for r in summary["rows"]:
        name, _, variant = r["model"].partition("@")
        defense = SFT if name == "attacked" else name
        own: dict[str, str] = r.get("own_stages") or {}
        recipe: list[str] = r.get("recipe_stages") or []

        def total(folders: list[str]) -> float | None:
            found = [cache.seconds.get(f) for f in folders]
            return round(sum(s for s in found if s is not None), 1) if found and None not in found else None

        def peak(kind: str, own: dict[str, str] = own) -> float | None:
            found = [cache.peak_memory.get(f, {}).get(kind) for f in own.values()]
            return max(f for f in found if f is not None) if found and None not in found else None

        flags = per_prompt(cache.root, r)
        rows.append(
            ResultRow(
                defense=defense,
                variant=variant,
                label=f"{defense}@{variant}" if variant else defense,
                cell=cell.id,
                setting=cell.setting,
                seed=cell.seed,
                judge=r["judge"],
                judge_spec=r["judge_spec"],
                hs=r["hs"],
                hs_ci=list(wilson_interval(round(r["hs"] * r["n_prompts"] / 100), r["n_prompts"])),
                fa=r["fa"],
                fa_ci=list(wilson_interval(round(r["fa"] * r["n_task"] / 100), r["n_task"])),
                over_refusal=r["over_refusal"],
                degenerate=r["degenerate"],
                seconds=total(list(own.values())),
                pipeline_seconds=total(recipe),
                peak_rss_mib=peak("peak_rss_mib"),
                peak_cuda_allocated_mib=peak("peak_cuda_allocated_mib"),
                lr=ft.lr,
                epochs=ft.epochs,
                harmful_ratio=ft.harmful_ratio,
                num_samples=ft.num_samples,
                task=cell.values.get("task", ft.task),
                prompt_set=r["harmful_set"],
                n_prompts=r["n_prompts"],
                eval_task=r["task"],
                n_task=r["n_task"],
                stages=dict(own),
                eval_stage=r["stage"],
                general_utility=(utility or {}).get(r["model"]),
                recovered=r.get("recovered"),
                hs_flags=flags["hs"],
                fa_flags=flags["fa"],
            )
        )
    return rows + chosen_rows(rows, summary.get("operating_points", {}))


def per_prompt(root: Path, row: dict[str, Any]) -> dict[str, list[int]]:
    """The row's per-prompt indicators, read from its stages: harmful (1/0) per harmful prompt by the row's
    judge (`hs`) and correct (1/0) per task item (`fa`), in the prompts' order."""
    records = [json.loads(x) for x in (root / row["stage"] / "generations.jsonl").read_text().splitlines()]
    if row["judge_spec"] == "keyword":
        verdicts = [g["verdict"] for g in records if g["set"] == "harmful"]
    else:
        verdicts = json.loads((root / row["judge_stage"] / "verdicts.json").read_text())
    task = [g["correct"] for g in records if g["set"] not in ("harmful", "harmless")]
    return {
        "hs": [int(v in HARMFUL_VERDICTS) for v in verdicts],
        "fa": [int(c is True or c == "True") for c in task],  # "True": written before it was a boolean
    }


def chosen_rows(rows: list[ResultRow], points: dict[str, Any]) -> list[ResultRow]:
    """A defense whose variant was chosen on validation is reported at that variant alone: one more row
    labelled by the defense (`chosen_variant` says which); its variant rows stay for the plots and files
    but leave the tables (`in_table` False). A defense with one variant only (named "") had nothing to
    choose from: its row stays as it is (a copy would carry the same label and evaluation stage, and
    `aggregate` would keep the hidden one of the two)."""
    chosen = []
    for r in rows:
        point = points.get(r.defense)
        if point is None or r.variant == "":
            continue
        r.in_table = False
        if r.variant == point["variant"]:
            chosen.append(
                dataclasses.replace(
                    r,
                    label=r.defense,
                    variant="",
                    chosen_variant=r.variant,
                    chosen_within_budget=point.get("within_budget"),  # None: a run from before the key
                    in_table=True,
                )
            )
    return chosen


def to_json(rows: list[ResultRow]) -> str:
    return json_text([dataclasses.asdict(r) for r in rows], indent=2) + "\n"


def to_csv(rows: list[ResultRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = {**dataclasses.asdict(r), "hs_low": r.hs_ci[0], "hs_high": r.hs_ci[1]}
        flat.update(fa_low=r.fa_ci[0], fa_high=r.fa_ci[1])
        flat["general_utility"] = json_text(r.general_utility) if r.general_utility else ""
        writer.writerow(
            {k: "n/a" if flat.get(k) is None and k in MEASURED else flat.get(k) for k in CSV_FIELDS}
        )
    return buffer.getvalue()


@dataclass
class TableEntry:
    """One (judge, setting, defense label) over seeds: HS and FA over seeds and prompts
    (`stats.crossed_bootstrap`: mean, low, high, n, interval_kind, alike), degenerate and over-refusal as
    means over seeds (`mean_entry`), the mean own and pipeline seconds, the largest peak memory, and the
    broken / front marks of its means."""

    judge_spec: str
    judge: str
    setting: str
    label: str
    defense: str
    variant: str
    seeds: list[int]
    in_table: bool
    chosen_variants: list[str]
    chosen_over_budget: int  # of the chosen rows, how many the fallback chose (no variant kept the FA budget)
    hs: dict[str, Any]
    fa: dict[str, Any]
    degenerate: dict[str, Any]
    over_refusal: dict[str, Any]
    seconds: float | None
    pipeline_seconds: float | None
    peak_rss_mib: float | None
    general_utility: dict[str, list[Any]] | None
    prompt_set: str
    n_prompts: int
    eval_task: str
    n_task: int
    lr: float
    epochs: int
    harmful_ratio: float
    num_samples: int
    task: str
    broken: str = ""  # as `ResultRow.broken`, against the aligned entry of the same judge and setting
    on_front: bool = False

    def setting_value(self, key: str) -> Any:
        return getattr(self, key)


def mark_rows(rows: Sequence[ResultRow | TableEntry], margins: front.Margins, group: tuple[str, ...]) -> None:
    """Set each row's `broken` and `on_front` (`front.marks`), comparing rows with the same `group` fields.
    The front is drawn among the rows the tables show (a defense chosen on validation: its chosen row, not
    each variant); variant rows keep their `broken` mark for the plots and are never on the front."""
    for r, (broken, _) in zip(rows, front.marks([vars(r) for r in rows], margins, group), strict=True):
        r.broken, r.on_front = broken, False
    shown = [r for r in rows if r.in_table]
    for r, (_, on_front) in zip(shown, front.marks([vars(r) for r in shown], margins, group), strict=True):
        r.on_front = on_front


def aggregate(rows: list[ResultRow]) -> list[TableEntry]:
    """One entry per (judge, setting, label), in the order the rows came. A row whose evaluation stage
    already counted (the aligned model, the same at every seed) is not counted again."""
    groups: dict[tuple[str, str, str], list[ResultRow]] = {}
    seen: set[tuple[str, str, str, str]] = set()
    for r in rows:
        # One evaluation is one observation: `aligned` (and `base`) are the same stage at every seed.
        once = (r.judge_spec, r.setting, r.label, r.eval_stage or r.cell)
        if once in seen:
            continue
        seen.add(once)
        groups.setdefault((r.judge_spec, r.setting, r.label), []).append(r)
    out = []
    for (judge, setting, label), group in groups.items():
        first = group[0]
        peaks = [g.peak_rss_mib for g in group]
        out.append(
            TableEntry(
                judge_spec=judge,
                judge=first.judge,
                setting=setting,
                label=label,
                defense=first.defense,
                variant=first.variant,
                seeds=[g.seed for g in group],
                in_table=first.in_table,
                chosen_variants=[g.chosen_variant for g in group if g.chosen_variant is not None],
                chosen_over_budget=sum(g.chosen_within_budget is False for g in group),
                hs=crossed_bootstrap([g.hs_flags for g in group]),
                fa=crossed_bootstrap([g.fa_flags for g in group]),
                degenerate=mean_entry([g.degenerate for g in group]),
                over_refusal=mean_entry([g.over_refusal for g in group]),
                seconds=mean_or_none([g.seconds for g in group]),
                pipeline_seconds=mean_or_none([g.pipeline_seconds for g in group]),
                peak_rss_mib=max_or_none(peaks),
                general_utility=mean_utility([g.general_utility for g in group if g.general_utility]),
                prompt_set=first.prompt_set,
                n_prompts=first.n_prompts,
                eval_task=first.eval_task,
                n_task=first.n_task,
                **{k: getattr(first, k) for k in (*MATRIX_KEYS, "task")},
            )
        )
    return out


def mean_or_none(values: list[Any]) -> float | None:
    return round(sum(values) / len(values), 1) if values and None not in values else None


def max_or_none(values: list[Any]) -> float | None:
    return max(values) if values and None not in values else None


def mean_entry(values: list[float]) -> dict[str, Any]:
    """A share reported as its mean over seeds, without an interval (degenerate, over-refusal)."""
    return {"mean": round(sum(values) / len(values), 2), "low": None, "high": None, "n": len(values)}
