"""The result rows of `antidote compare`, defined once: `ResultRow` (one defense x cell x judge) and
`TableEntry` (one judge x setting x defense, over seeds). results.json, results.csv, report.md, table.tex
and the plots all read these records."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from antidote.evaluation.stats import wilson_interval
from antidote.experiments import front
from antidote.experiments.aggregate import summarize
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
    recovered: list[float] | None
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
            )
        )
    return rows


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
    """One (judge, setting, defense label) over seeds: HS, FA, degenerate and over-refusal summaries
    (`aggregate.summarize`: mean, low, high, n, interval_kind; the last two without per-seed intervals), the
    mean own and pipeline seconds, the largest peak memory, and the broken / front marks of its means."""

    judge_spec: str
    judge: str
    setting: str
    label: str
    defense: str
    variant: str
    seeds: list[int]
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
    """Set each row's `broken` and `on_front` (`front.marks`), comparing rows with the same `group` fields."""
    for r, (broken, on_front) in zip(rows, front.marks([vars(r) for r in rows], margins, group), strict=True):
        r.broken, r.on_front = broken, on_front


def aggregate(rows: list[ResultRow]) -> list[TableEntry]:
    """One entry per (judge, setting, label), in the order the rows came. A row whose evaluation stage
    already counted (the aligned model, the same at every seed) is not counted again."""
    groups: dict[tuple[str, str, str], list[ResultRow]] = {}
    seen: set[tuple[str, str, str]] = set()
    for r in rows:
        # One evaluation is one observation: `aligned` (and `base`) are the same stage at every seed.
        once = (r.judge_spec, r.setting, r.eval_stage or f"{r.label}/{r.cell}")
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
                hs=summarize([g.hs for g in group], [g.hs_ci for g in group]),
                fa=summarize([g.fa for g in group], [g.fa_ci for g in group]),
                degenerate=summarize([g.degenerate for g in group], [None for _ in group]),
                over_refusal=summarize([g.over_refusal for g in group], [None for _ in group]),
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
