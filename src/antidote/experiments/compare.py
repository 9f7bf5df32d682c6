"""`antidote compare CONFIG.yaml`: every defense over a matrix of attack settings and seeds, one stage cache.

The config is a run config (`antidote run`) plus a `matrix:` section of lists over the attack (the
`finetune:` keys `lr`, `epochs`, `harmful_ratio`, `num_samples`; `seeds`, the attack's seed; `tasks`, named
overrides of the finetune/evaluate/validate task keys). A setting is one value per matrix key:
- `sweep: one-at-a-time` (default, as in the paper): the first value of every list is the default; the
  settings are the default one plus, for each key, each of its other values with the other keys at default;
- `sweep: product`: every combination.
Each setting runs at every seed for the defenses named in `all_seeds_for` (and `sft`, the plain attack,
which is also their attack); the other defenses run at the first seed only. One (setting, seed) is a cell:
an `antidote run` in OUT/cells/<id>/ whose stages live in the one cache OUT/stages, so the alignment is built
once and a defense or setting added later reuses everything else.

OUT gets results.csv/results.json (one row per defense x cell x judge), report.md, table.tex and plots/
(`compare_plots.py`). The aggregation math is in `aggregate.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from antidote.configfile import config_from_mapping, read_yaml_mapping
from antidote.defenses import get
from antidote.errors import AntidoteError
from antidote.evaluation.stats import wilson_interval
from antidote.experiments.aggregate import summarize
from antidote.experiments.cache import RECORD, StageCache, locked, stage_key
from antidote.experiments.front import Margins, flag, mark, rule
from antidote.experiments.pipeline import (
    RunConfig,
    _Model,
    _Run,
    _stage_config,
    check,
    clear_run_dir,
    prepare_run_dir,
)
from antidote.outputs import atomic_write_text

SFT = "sft"  # the plain attack (the pipeline's `attacked` row), no defense
MATRIX_KEYS = ("lr", "epochs", "harmful_ratio", "num_samples")
TASK_SECTIONS = ("finetune", "evaluate", "validate")
SWEEPS = ("one-at-a-time", "product")
COMPARE_OUTPUTS = ("stages", "cells", "results.csv", "results.json", "report.md", "table.tex", "plots")
CSV_FIELDS = (
    "defense", "variant", "label", "cell", "setting", "seed", "judge", "judge_spec", "hs", "hs_low",
    "hs_high", "degenerate", "fa", "fa_low", "fa_high", "over_refusal", "broken", "on_front", "seconds",
    "pipeline_seconds", "peak_rss_mib", "peak_cuda_allocated_mib", "lr", "epochs", "harmful_ratio",
    "num_samples", "task", "prompt_set", "n_prompts", "eval_task", "n_task", "general_utility",
)  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass
class MatrixConfig:
    """The `matrix:` section: lists over the attack. Lists not given keep the `finetune:` section's value."""

    lr: list[float] | None = field(default=None, metadata={"help": "fine-tuning learning rates"})
    epochs: list[int] | None = field(default=None, metadata={"help": "fine-tuning epochs"})
    harmful_ratio: list[float] | None = field(default=None, metadata={"help": "harmful fractions P"})
    num_samples: list[int] | None = field(default=None, metadata={"help": "numbers of attack samples N"})
    seeds: list[int] | None = field(default=None, metadata={"help": "the attack's seeds (repeats)"})
    tasks: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "name -> {finetune: {...}, evaluate: {...}, validate: {...}} task-key overrides"},
    )
    all_seeds_for: list[str] | None = field(
        default=None,
        metadata={
            "help": "defenses run at every seed (the others at the first seed only); default: sft and "
            "antidote (when it is in defenses)"
        },
    )
    sweep: str = field(default="one-at-a-time", metadata={"help": "one-at-a-time or product"})

    def __post_init__(self) -> None:
        if self.sweep not in SWEEPS:
            raise AntidoteError(f"matrix: sweep {self.sweep!r} is unknown; choose one of {', '.join(SWEEPS)}")
        for name in (*MATRIX_KEYS, "seeds", "tasks"):
            value = getattr(self, name)
            if value is not None and len(value) == 0:
                raise AntidoteError(f"matrix: {name} is empty; give at least one value or leave it out")
            if isinstance(value, list) and len(set(value)) != len(value):
                raise AntidoteError(f"matrix: {name} repeats a value: {value}")
        for name, overrides in (self.tasks or {}).items():
            if not _NAME.match(str(name)):
                raise AntidoteError(f"matrix: tasks: name {name!r} must be letters, digits, '.', '_' or '-'")
            if not isinstance(overrides, dict) or set(overrides) - set(TASK_SECTIONS):
                raise AntidoteError(
                    f"matrix: tasks: {name} must map some of {', '.join(TASK_SECTIONS)} to option: value"
                )


@dataclass
class UtilityConfig:
    """The `general_utility:` section: lm-evaluation-harness tasks run on every evaluated model."""

    tasks: list[str] = field(default_factory=list, metadata={"help": "lm-eval task names, e.g. [arc_easy]"})
    limit: int | None = field(default=None, metadata={"help": "at most this many items per task"})
    num_fewshot: int | None = field(
        default=None, metadata={"help": "few-shot examples (default: the task's)"}
    )
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})
    include_path: str | None = field(
        default=None,
        metadata={"help": "a folder of lm-eval task YAMLs (e.g. over local data files: works offline)"},
    )

    def __post_init__(self) -> None:
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise AntidoteError(
                f"general_utility: include_path {self.include_path} is not a folder of lm-eval task YAMLs"
            )
        if not self.tasks:
            raise AntidoteError("general_utility: tasks is empty; give lm-eval task names, e.g. [arc_easy]")
        if self.limit is not None and self.limit < 1:
            raise AntidoteError(f"general_utility: limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise AntidoteError(f"general_utility: batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Cell:
    """One (setting, seed): its run config and what it varies."""

    id: str
    setting: str  # the setting's id (the cell id less the seed)
    values: dict[str, Any]  # matrix key -> value (task: its name)
    seed: int
    config: RunConfig


@dataclass
class CompareConfig:
    run: RunConfig
    matrix: MatrixConfig
    cells: list[Cell]
    path: str
    utility: UtilityConfig | None = None

    @property
    def out(self) -> Path:
        return Path(self.run.run_dir).expanduser().resolve()


def load_compare_config(path: str, **overrides: Any) -> CompareConfig:
    """Read a compare config and build every cell's config (each checked as `antidote run` checks one), so
    bad input fails here, before any training and before anything is written."""
    data = read_yaml_mapping(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "matrix" not in data:
        raise AntidoteError(f"{path} has no matrix: section; give e.g. matrix: {{lr: [1e-4, 5e-4]}}")
    matrix = config_from_mapping(MatrixConfig, data.pop("matrix") or {}, f"{path}: matrix")
    utility = data.pop("general_utility", None)
    if utility is not None:
        utility = config_from_mapping(UtilityConfig, utility, f"{path}: general_utility")
        import importlib.util

        if sys.modules.get("lm_eval") is None and importlib.util.find_spec("lm_eval") is None:
            raise AntidoteError(
                f"{path}: general_utility needs lm-evaluation-harness (pip install lm-eval); or drop it"
            )
    defenses = dict(data.get("defenses") or {})
    if defenses.pop(SFT, None):
        raise AntidoteError(f"{path}: defenses: {SFT} (the plain attack) takes no options; write {SFT}: {{}}")
    data["defenses"] = defenses
    run = config_from_mapping(RunConfig, data, f"config file {path}")
    if run.seeds:
        raise AntidoteError(f"{path}: give the seeds of a compare in its matrix: seeds: {run.seeds}")
    check(run, path)
    if matrix.all_seeds_for is None:
        matrix.all_seeds_for = [n for n in (SFT, "antidote") if n == SFT or n in run.defenses]
    for name in matrix.all_seeds_for:
        if name != SFT and name not in run.defenses:
            raise AntidoteError(
                f"{path}: matrix: all_seeds_for names {name!r}, which is not in defenses; "
                f"choose from {', '.join([SFT, *run.defenses])}"
            )
    if not data.get("align"):
        for name in run.defenses:
            if getattr(get(name).config, "NEEDS_BASE", False):
                raise AntidoteError(
                    f"{path}: defense {name} needs the base -> aligned pair, but the config has no align: "
                    "section; add one (the alignment to build) or drop the defense"
                )
    cells = _cells(run, matrix, path)
    _check_attack_data(cells, path)
    return CompareConfig(run, matrix, cells, path, utility)


def settings(matrix: MatrixConfig) -> list[dict[str, Any]]:
    """The settings (matrix key -> value) in order: the default first (see the module docstring)."""
    lists: dict[str, list[Any]] = {k: getattr(matrix, k) for k in MATRIX_KEYS if getattr(matrix, k)}
    if matrix.tasks:
        lists["task"] = list(matrix.tasks)
    if matrix.sweep == "product":
        return [dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())]
    default = {k: v[0] for k, v in lists.items()}
    out = [default]
    for key, values in lists.items():
        out += [{**default, key: v} for v in values[1:]]
    return out


def setting_id(values: dict[str, Any]) -> str:
    return (
        ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "default"
    )


def _cells(run: RunConfig, matrix: MatrixConfig, path: str) -> list[Cell]:
    base_seed = _stage_config(run, "finetune", path, model="<model>", output="<output>").seed
    seeds = matrix.seeds or [base_seed]
    cells = []
    for values in settings(matrix):
        sid = setting_id(values)
        for i, seed in enumerate(seeds):
            every_seed = matrix.all_seeds_for or []
            defenses = run.defenses if i == 0 else {k: v for k, v in run.defenses.items() if k in every_seed}
            if i > 0 and not defenses and SFT not in every_seed:
                continue
            sections = {s: dict(getattr(run, s) or {}) for s in TASK_SECTIONS}
            if "task" in values:
                for section, over in matrix.tasks[values["task"]].items():  # type: ignore[index]
                    if section == "validate" and run.validate is None:
                        continue
                    sections[section].update(over or {})
            sections["finetune"].update({k: v for k, v in values.items() if k in MATRIX_KEYS}, seed=seed)
            config = replace(
                run,
                defenses=defenses,
                finetune=sections["finetune"],
                evaluate=sections["evaluate"],
                validate=sections["validate"] if run.validate is not None else None,
                export_models=False,
            )
            cid = f"{sid},seed={seed}"
            where = f"{path}: cell {cid}"
            try:
                check(config, where)
                ft = _stage_config(config, "finetune", where, model="<model>", output="<output>")
            except AntidoteError as err:
                raise AntidoteError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
            for key in MATRIX_KEYS:
                if key in values and getattr(ft, key) != values[key]:
                    raise AntidoteError(
                        f"{where}: finetune {key} is {getattr(ft, key)}, not the matrix's {values[key]} "
                        f"(preset {ft.preset} fixes it); drop {key} from the matrix or the preset"
                    )
            cells.append(Cell(cid, sid, values, seed, config))
    return cells


def _check_attack_data(cells: list[Cell], path: str) -> None:
    """Each cell's attack mix must fit in its data (cheap: the data are read, not tokenized)."""
    from antidote.training.stages import attack_mix

    sizes: dict[tuple[Any, ...], tuple[int, int]] = {}
    for cell in cells:
        ft = _stage_config(cell.config, "finetune", path, model="<model>", output="<output>")
        key = (ft.harmful, ft.task, ft.task_data, ft.data_dir)
        if key not in sizes:
            sizes[key] = _attack_data_sizes(ft)
        n_harmful, n_task = sizes[key]
        try:
            attack_mix(
                [("", "", "")] * n_task, [("", "", "")] * n_harmful, ft.num_samples, ft.harmful_ratio, 0
            )
        except AntidoteError as err:
            raise AntidoteError(f"{path}: cell {cell.id}: {err}") from None


def _attack_data_sizes(ft: Any) -> tuple[int, int]:
    """(harmful pairs, task items) the attack of FinetuneConfig `ft` draws from, read as run_finetune does."""
    from antidote.training.stages import attack_data

    task, harmful = attack_data(ft)
    return len(harmful), len(task)


# ---- running ---------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"antidote compare: {message}", file=sys.stderr, flush=True)


def seeds_compare(run: RunConfig, path: str = "the config") -> CompareConfig:
    """`antidote run` with `seeds: [...]`: every defense (and the plain attack) at every seed, in the run
    folder; report.md gives the mean and 95% t interval over seeds, cells/ the runs one by one."""
    matrix = MatrixConfig(seeds=list(run.seeds), all_seeds_for=[SFT, *run.defenses])
    base = replace(run, seeds=[])
    cells = _cells(base, matrix, path)
    _check_attack_data(cells, path)
    return CompareConfig(base, matrix, cells, path)


def first_judge(rows: list[dict[str, Any]]) -> str:
    """The first judge that scored (a configured judge may have been left out: not installed)."""
    return str(rows[0]["judge_spec"])


def run_seeds(run: RunConfig, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """`antidote run` of a config with `seeds:` (see `seeds_compare`); the result names its run_dir."""
    check(run)
    result = run_compare(seeds_compare(run), say)
    return {**result, "run_dir": result["out"]}


def run_compare(config: CompareConfig, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run (or resume) every cell in OUT with one stage cache; write results.csv, results.json, report.md,
    table.tex and plots/. Returns {"rows", "stages": {"built", "reused"}, "out"}."""
    from antidote.experiments import compare_plots

    out = config.out
    prepare_run_dir(out)
    rows: list[dict[str, Any]] = []
    built: list[str] = []
    reused: list[str] = []
    with locked(out):
        for cell in config.cells:
            say(f"cell {cell.id}")
            folder = out / "cells" / cell.id
            folder.mkdir(parents=True, exist_ok=True)
            cache = StageCache(out, say)  # one cache folder; a fresh view per cell counts its own stages
            summary = _Run(cell.config, folder, say, cache=cache).run()
            utility = general_utility(summary, cache, config.utility) if config.utility else {}
            rows += cell_rows(cell, summary, cache, utility)
            built += cache.built
            reused += [s for s in cache.cached if s not in built and s not in reused]
        margins = Margins(config.run.max_degenerate_rise, config.run.max_over_refusal_rise)
        mark(rows, margins, group=("judge_spec", "cell"))
        atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
        atomic_write_text(out / "results.csv", to_csv(rows))
        table = aggregate(rows)
        mark(table, margins, group=("judge_spec", "setting"))
        atomic_write_text(out / "report.md", report_markdown(config, rows, table))
        judge = first_judge(rows)
        atomic_write_text(out / "table.tex", latex_table(table, judge))
        plots = out / "plots"
        plots.mkdir(exist_ok=True)
        compare_plots.write_all(config, rows, table, settings(config.matrix)[0], out / "stages", plots, judge)
    return {"rows": rows, "stages": {"built": built, "reused": reused}, "out": str(out)}


def clear_compare_dir(out: Path) -> None:
    """--overwrite: remove what an earlier compare wrote into OUT (and nothing else)."""
    prepare_run_dir(out, create=False)  # refuses a folder antidote did not make, before removing anything
    clear_run_dir(out, COMPARE_OUTPUTS)


def _stage_names(summary: dict[str, Any]) -> dict[str, str]:
    """Stage name (e.g. `finetune-after-booster`) -> its folder, for the stages this cell used."""
    stages = summary["stages"]
    return {f.rsplit("-", 1)[0]: f for f in [*stages["reused"], *stages["built"]]}


def own_stages(defense: str, stage: str | None) -> tuple[list[str], list[str]]:
    """(the defense's own stages, the stages making its model from the base model) by stage name.
    `stage`: the registered defense's stage (None for sft, base and aligned)."""
    if defense == SFT:
        return ["finetune"], ["align", "finetune"]
    if stage == "align":
        own = [f"align-{defense}", f"finetune-after-{defense}"]
        return own, own
    if stage == "finetune":
        return [f"finetune-{defense}"], ["align", f"finetune-{defense}"]
    if stage == "post":
        return [defense], ["align", "finetune", defense]
    return [], []


def general_utility(
    summary: dict[str, Any], cache: StageCache, config: UtilityConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """Row model name -> lm-eval task -> metric -> value, one cached stage per evaluated model."""
    out = {}
    for r in summary["rows"]:
        if r["model"] in out:
            continue
        model, adapter = r["model_path"], r.get("adapter")
        folder, _ = cache.run(
            f"utility-{r['model']}",
            {"model": model, "adapter": adapter, "lm_eval": dataclasses.asdict(config)},
            functools.partial(_utility_stage, model=model, adapter=adapter, config=config),
        )
        out[r["model"]] = json.loads((folder / "utility.json").read_text())
    return out


def _utility_stage(out: Path, model: str, adapter: str | None, config: UtilityConfig) -> None:
    """lm-evaluation-harness (`simple_evaluate`, the hf backend) on the model, with the adapter if any."""
    import lm_eval

    from antidote.models.loading import resolve_model_folder

    args = f"pretrained={resolve_model_folder(model)}" + (f",peft={adapter}" if adapter else "")
    extra: dict[str, Any] = {}
    if config.include_path:  # the user's own task YAMLs beside lm-eval's
        from lm_eval.tasks import TaskManager

        extra["task_manager"] = TaskManager(include_path=str(Path(config.include_path).expanduser()))
    import torch

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        device="cuda" if torch.cuda.is_available() else "cpu",  # lm-eval's hf model defaults to cuda
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        batch_size=config.batch_size,
        **extra,
    )
    scores = {
        task: {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for task, metrics in results["results"].items()
    }
    out.mkdir()
    (out / "utility.json").write_text(json.dumps(scores, indent=2) + "\n")


UTILITY_METRICS = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The metric a table shows for an lm-eval task: the first of UTILITY_METRICS it has, else its first
    metric that is not a standard error."""
    for name in UTILITY_METRICS:
        if name in metrics:
            return name, metrics[name]
    rest = [(k, v) for k, v in metrics.items() if "stderr" not in k]
    return rest[0] if rest else None


def cell_rows(
    cell: Cell,
    summary: dict[str, Any],
    cache: StageCache,
    utility: dict[str, dict[str, dict[str, float]]] | None = None,
) -> list[dict[str, Any]]:
    """The cell's result rows (one per model x judge), named by defense, with cost and settings."""
    ft = _stage_config(cell.config, "finetune", model="<model>", output="<output>")
    folders = _stage_names(summary)
    rows = []
    for r in summary["rows"]:
        name, _, variant = r["model"].partition("@")
        defense = SFT if name == "attacked" else name
        stage = get(name).stage if name in cell.config.defenses else None
        own, recipe = own_stages(defense, stage)

        def total(names: list[str], folders: dict[str, str] = folders) -> float | None:
            found = [cache.seconds.get(folders[n]) for n in names if n in folders]
            return round(sum(s for s in found if s is not None), 1) if found and None not in found else None

        def peak(kind: str, own: list[str] = own) -> float | None:
            found = [cache.peak_memory.get(folders[n], {}).get(kind) for n in own if n in folders]
            return max(found) if found and None not in found else None  # type: ignore[type-var]

        hs_ci = wilson_interval(round(r["hs"] * r["n_prompts"] / 100), r["n_prompts"])
        fa_ci = wilson_interval(round(r["fa"] * r["n_task"] / 100), r["n_task"])
        rows.append(
            {
                "defense": defense,
                "variant": variant,
                "label": f"{defense}@{variant}" if variant else defense,
                "cell": cell.id,
                "setting": cell.setting,
                "seed": cell.seed,
                "judge": r["judge"],
                "judge_spec": r["judge_spec"],
                "hs": r["hs"],
                "hs_ci": list(hs_ci),
                "fa": r["fa"],
                "fa_ci": list(fa_ci),
                "over_refusal": r["over_refusal"],
                "degenerate": r["degenerate"],
                "seconds": total(own),
                "pipeline_seconds": total(recipe),
                "peak_rss_mib": peak("peak_rss_mib"),
                "peak_cuda_allocated_mib": peak("peak_cuda_allocated_mib"),
                "lr": ft.lr,
                "epochs": ft.epochs,
                "harmful_ratio": ft.harmful_ratio,
                "num_samples": ft.num_samples,
                "task": cell.values.get("task", ft.task),
                "prompt_set": r["harmful_set"],
                "n_prompts": r["n_prompts"],
                "eval_task": r["task"],
                "n_task": r["n_task"],
                "stages": {n: folders[n] for n in own if n in folders},
                "eval_stage": r["stage"],
                "general_utility": (utility or {}).get(r["model"]),
                "recovered": r.get("recovered"),
            }
        )
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = {**r, "hs_low": r["hs_ci"][0], "hs_high": r["hs_ci"][1]}
        flat.update(fa_low=r["fa_ci"][0], fa_high=r["fa_ci"][1])
        flat["general_utility"] = json.dumps(r["general_utility"]) if r.get("general_utility") else ""
        writer.writerow(
            {k: "n/a" if flat.get(k) is None and k in _MEASURED else flat.get(k) for k in CSV_FIELDS}
        )
    return buffer.getvalue()


_MEASURED = ("seconds", "pipeline_seconds", "peak_rss_mib", "peak_cuda_allocated_mib")


# ---- aggregation and report ------------------------------------------------------------------------------


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (judge, setting, label): HS and FA over seeds (`aggregate.summarize`), with the
    mean own seconds and the largest peak memory. In the order the rows came. A row whose evaluation stage
    already counted (the aligned model, the same at every seed) is not counted again."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    seen: set[tuple[str, str, str]] = set()
    for r in rows:
        # One evaluation is one observation: `aligned` (and `base`) are the same stage at every seed.
        once = (r["judge_spec"], r["setting"], r.get("eval_stage") or f"{r['label']}/{r['cell']}")
        if once in seen:
            continue
        seen.add(once)
        groups.setdefault((r["judge_spec"], r["setting"], r["label"]), []).append(r)
    out = []
    for (judge, setting, label), group in groups.items():
        seconds = [g["seconds"] for g in group]
        pipeline = [g["pipeline_seconds"] for g in group]
        peaks = [g["peak_rss_mib"] for g in group]
        out.append(
            {
                "judge_spec": judge,
                "judge": group[0]["judge"],
                "setting": setting,
                "label": label,
                "defense": group[0]["defense"],
                "variant": group[0]["variant"],
                "seeds": [g["seed"] for g in group],
                "hs": summarize([g["hs"] for g in group], [g["hs_ci"] for g in group]),
                "fa": summarize([g["fa"] for g in group], [g["fa_ci"] for g in group]),
                "degenerate": summarize([g["degenerate"] for g in group], [None for _ in group]),
                "over_refusal": summarize([g["over_refusal"] for g in group], [None for _ in group]),
                "seconds": _mean_or_none(seconds),
                "pipeline_seconds": _mean_or_none(pipeline),
                "peak_rss_mib": max(peaks) if peaks and None not in peaks else None,
                "general_utility": mean_utility(
                    [g["general_utility"] for g in group if g.get("general_utility")]
                ),
                "prompt_set": group[0]["prompt_set"],
                "n_prompts": group[0]["n_prompts"],
                "eval_task": group[0]["eval_task"],
                "n_task": group[0]["n_task"],
                **{k: group[0][k] for k in (*MATRIX_KEYS, "task")},
            }
        )
    return out


def mean_utility(runs: list[dict[str, dict[str, float]]]) -> dict[str, list[Any]] | None:
    """task -> [headline metric, its mean over the runs (seeds)]; None without lm-eval results."""
    if not runs:
        return None
    out: dict[str, list[Any]] = {}
    for task, metrics in runs[0].items():
        shown = headline(metrics)
        if shown is not None:
            values = [r[task][shown[0]] for r in runs if shown[0] in r.get(task, {})]
            out[task] = [shown[0], round(sum(values) / len(values), 4)]
    return out


def _mean_or_none(values: list[Any]) -> float | None:
    return round(sum(values) / len(values), 1) if values and None not in values else None


def _entry(s: dict[str, Any]) -> str:
    if s["low"] is None:
        return f"{s['mean']:.1f}"
    text = f"{s['mean']:.1f} [{s['low']:.1f}, {s['high']:.1f}]"
    return text + (f" (n={s['n']})" if s["interval_kind"] == "t" else "")


def _grid(table: list[dict[str, Any]], judge: str) -> tuple[list[str], list[str], dict[tuple[str, str], Any]]:
    entries = [t for t in table if t["judge_spec"] == judge]
    labels = list(dict.fromkeys(t["label"] for t in entries))
    setting_ids = list(dict.fromkeys(t["setting"] for t in entries))
    return labels, setting_ids, {(t["label"], t["setting"]): t for t in entries}


def _hs_fa_cells(
    grid: dict[tuple[str, str], Any],
    label: str,
    setting_ids: list[str],
    fmt: Callable[[dict[str, Any]], str],
    missing: str,
) -> list[str]:
    """One table row's HS, degenerate, FA and over-refusal entries, setting by setting (`missing` where a
    defense did not run); degenerate and over-refusal as means only."""
    cells = []
    for s in setting_ids:
        t = grid.get((label, s))
        if t is None:
            cells += [missing] * 4
            continue
        cells += [fmt(t["hs"]), _mean(t["degenerate"]), fmt(t["fa"]), _mean(t["over_refusal"])]
    return cells


def _mean(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.1f}"


def report_markdown(config: CompareConfig, rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        "# antidote compare",
        "",
        f"Harmful prompts: {first['prompt_set']} ({first['n_prompts']}); task: {first['eval_task']} "
        f"({first['n_task']} items). Sweep: {config.matrix.sweep}; {len(config.cells)} cells. "
        "HS and FA in percent: with several seeds the mean and its 95% t interval over seeds (n = seeds), "
        "with one seed the value and its 95% per-prompt Wilson interval. Degenerate: the share of answers "
        "to harmful prompts that are garbage (empty, loops, no words; not counted in HS); over-refusal: the "
        "share of harmless prompts refused; both means over seeds. "
        + rule(Margins(config.run.max_degenerate_rise, config.run.max_over_refusal_rise)),
    ]
    for judge in config.run.judges:
        labels, setting_ids, grid = _grid(table, judge)
        if not labels:
            continue
        name = next(t["judge"] for t in table if t["judge_spec"] == judge)
        lines += ["", f"## HS, degenerate, FA and over-refusal (judge: {name})", ""]
        lines += [
            "| defense | "
            + " | ".join(
                f"HS {s} | degenerate {s} | FA {s} | over-refusal {s} | broken / front {s}"
                for s in setting_ids
            )
            + " |"
        ]
        lines += ["|---" * (1 + 5 * len(setting_ids)) + "|"]
        for label in labels:
            cells = _hs_fa_cells(grid, label, setting_ids, _entry, "-")
            marks = [flag(grid[(label, s)]) if (label, s) in grid else "-" for s in setting_ids]
            cells = [c for i, m in enumerate(marks) for c in (*cells[4 * i : 4 * i + 4], m)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost per defense (over plain SFT)", ""]
    lines += [
        "Seconds: the defense's own stages (SFT: the attack), mean over cells, as recorded when each stage "
        "was built. Pipeline: base model to defended model (alignment + attack + defense); x SFT: its "
        "ratio to "
        "SFT's. Peak: the largest resident memory during the defense's own stages (n/a: not measured).",
        "",
        "| defense | seconds | pipeline seconds | x SFT | peak RSS MiB | x SFT |",
        "|---|---|---|---|---|---|",
    ]
    judge = first_judge(rows)
    per: dict[str, list[dict[str, Any]]] = {}
    for t in table:
        if t["judge_spec"] == judge and t["defense"] not in ("base", "aligned"):
            per.setdefault(t["label"], []).append(t)
    sft = per.get(SFT, [])
    sft_pipe = _mean_or_none([t["pipeline_seconds"] for t in sft])
    sft_peak = _max_or_none([t["peak_rss_mib"] for t in sft])
    for label, ts in per.items():
        pipe = _mean_or_none([t["pipeline_seconds"] for t in ts])
        peak = _max_or_none([t["peak_rss_mib"] for t in ts])
        lines.append(
            f"| {label} | {_na(_mean_or_none([t['seconds'] for t in ts]))} | {_na(pipe)} | "
            f"{_ratio(pipe, sft_pipe)} | {_na(peak)} | {_ratio(peak, sft_peak)} |"
        )
    utility = [t for t in table if t["judge_spec"] == judge and t["general_utility"]]
    if utility:
        tasks = list(dict.fromkeys(task for t in utility for task in t["general_utility"]))
        lines += ["", "## General utility (lm-evaluation-harness; mean over seeds)", ""]
        lines += ["| defense | setting | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for t in utility:
            shown = [t["general_utility"].get(task) for task in tasks]
            cells = [f"{v[1]:.4g} ({v[0]})" if v else "-" for v in shown]
            lines.append(f"| {t['label']} | {t['setting']} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: " + ", ".join(c.id for c in config.cells), ""]
    return "\n".join(lines)


def _max_or_none(values: list[Any]) -> float | None:
    return max(values) if values and None not in values else None


def _na(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def _ratio(value: float | None, reference: float | None) -> str:
    return "n/a" if value is None or not reference else f"{value / reference:.2f}"


def _tex(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text)


def latex_table(table: list[dict[str, Any]], judge: str) -> str:
    """booktabs: one row per defense (variant), HS, degenerate, FA and over-refusal per setting, first judge;
    a broken entry's HS carries a dagger, an entry on the front an asterisk (`front.py`)."""
    labels, setting_ids, grid = _grid(table, judge)
    name = next((t["judge"] for t in table if t["judge_spec"] == judge), judge)
    lines = [
        f"% antidote compare: HS, degenerate (Deg.), FA and over-refusal (OR) in percent (judge: {name}); "
        "mean [95% interval]",
        "% $^\\dagger$: broken (degenerate or over-refusal rose past its margin over the aligned model's); "
        "$^*$: on the HS-FA-over-refusal front",
        "\\begin{tabular}{l" + "rrrr" * len(setting_ids) + "}",
        "\\toprule",
        " & " + " & ".join(f"\\multicolumn{{4}}{{c}}{{{_tex(s)}}}" for s in setting_ids) + " \\\\",
        " ".join(f"\\cmidrule(lr){{{2 + 4 * i}-{5 + 4 * i}}}" for i in range(len(setting_ids))),
        "Defense & " + " & ".join("HS & Deg. & FA & OR" for _ in setting_ids) + " \\\\",
        "\\midrule",
    ]
    for label in labels:
        cells = _hs_fa_cells(grid, label, setting_ids, _tex_entry, "--")
        for i, s in enumerate(setting_ids):
            t = grid.get((label, s))
            if t is not None and (t.get("broken") or t.get("on_front")):
                cells[4 * i] += "$^\\dagger$" if t.get("broken") else "$^*$"
        lines.append(f"{_tex(label)} & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def _tex_entry(s: dict[str, Any]) -> str:
    if s["low"] is None:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} {{\\scriptsize [{s['low']:.1f}, {s['high']:.1f}]}}"


# ---- --plan ----------------------------------------------------------------------------------------------


class _PlanCache(StageCache):
    """A stage cache that builds nothing and writes nothing: it records each stage and whether it is done
    (finished before, or planned earlier in this plan)."""

    def __init__(self, out: Path, say: Callable[[str], None]) -> None:  # no super(): it would create stages/
        self.root = out / "stages"
        self.say = say
        self.cached, self.built = [], []
        self.seconds, self.peak_memory = {}, {}
        self.planned: list[tuple[str, str, bool]] = []  # (stage name, folder, done)

    def run(self, name: str, spec: dict[str, Any], build: Callable[[Path], Any]) -> tuple[Path, str]:
        key = stage_key({"stage": name, **spec}, skip=self.root.resolve())
        folder = self.root / f"{name}-{key}"
        done = (folder / RECORD).is_file() or folder.name in self.built
        if (folder / RECORD).is_file():
            self.cached.append(folder.name)
        elif folder.name not in self.built:
            self.built.append(folder.name)
        self.planned.append((name, folder.name, done))
        return folder, key


class _PlanRun(_Run):
    """The pipeline walked without building: a stage not built yet has no outputs, so its rows are stand-ins
    (a post defense not built yet counts as one variant)."""

    def post_defense(self, defense: Any, aligned: Path, attack: Path, ft_key: str) -> list[_Model]:
        try:
            return super().post_defense(defense, aligned, attack, ft_key)
        except FileNotFoundError:
            return [
                _Model(f"{defense.name}@?", str(aligned), None, f"{ft_key}/{defense.name}", defense.name, "?")
            ]

    def evaluate(self, section: str, m: _Model) -> list[dict[str, Any]]:
        try:
            return super().evaluate(section, m)
        except FileNotFoundError:
            numbers = {"hs": 0.0, "fa": 0.0, "degenerate": 0.0, "over_refusal": 0.0}
            return [{**numbers, "model": m.name, "judge_spec": j} for j in self.config.judges]

    def export_models(self, models: list[_Model], chosen: dict[str, str]) -> None:
        pass

    def write(self, summary: dict[str, Any], models: list[_Model]) -> None:
        pass


def plan(config: CompareConfig) -> str:
    """The cells and each stage with whether it is done, and an estimate of the time still needed from the
    recorded seconds of finished stages of the same kind. Writes nothing."""
    out = config.out
    prepare_run_dir(out, create=False)
    cache = _PlanCache(out, lambda m: None)
    recorded = _recorded_seconds(cache.root)
    lines = [f"antidote compare --plan: {len(config.cells)} cells in {out}"]
    total, unknown = 0.0, 0
    for cell in config.cells:
        start = len(cache.planned)
        _PlanRun(cell.config, out / "cells" / cell.id, lambda m: None, cache=cache).run()
        lines.append(f"cell {cell.id}  (defenses: {', '.join([SFT, *cell.config.defenses])})")
        seen: set[str] = set()
        for name, folder, done in cache.planned[start:]:
            if folder in seen:
                continue
            seen.add(folder)
            if done:
                lines.append(f"  cached  {name}")
                continue
            estimate = recorded.get(name) or recorded.get(_kind(name))
            if estimate is None:
                unknown += 1
            else:
                total += estimate
            lines.append(
                f"  build   {name}" + (f"  ~{estimate:.0f} s" if estimate is not None else "  (no estimate)")
            )
    n_build = len(cache.built)
    lines.append(
        f"{n_build} stages to build, {len(set(cache.cached))} cached; estimated {total / 60:.1f} min for "
        f"{n_build - unknown} of them from recorded stages of the same kind"
        + (f", {unknown} without a recorded stage of their kind" if unknown else "")
        + "; stages after a post defense not built yet are not all known (its variants count as one)"
    )
    return "\n".join(lines)


def _kind(name: str) -> str:
    """A stage name's kind for estimates: evaluate-x -> evaluate, finetune-after-x -> finetune."""
    for prefix in ("evaluate", "validate", "judge"):
        if name.startswith(prefix + "-"):
            return prefix
    if name.startswith("finetune-after-"):
        return "finetune"
    return name


def _recorded_seconds(root: Path) -> dict[str, float]:
    """Mean recorded seconds per stage name and per kind over the finished stages in `root`."""
    found: dict[str, list[float]] = {}
    if root.is_dir():
        for record in root.glob(f"*/{RECORD}"):
            data = json.loads(record.read_text())
            for name in {data["stage"], _kind(data["stage"])}:
                found.setdefault(name, []).append(float(data.get("seconds", 0.0)))
    return {k: sum(v) / len(v) for k, v in found.items()}


def dataclass_help(cls: type) -> str:
    """`key: help` of each field, for `antidote compare --help`."""
    return "; ".join(f"{f.name}: {f.metadata.get('help', '')}" for f in dataclasses.fields(cls))
