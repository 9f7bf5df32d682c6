"""`antidote compare CONFIG.yaml`: every defense over a matrix of attack settings and seeds, one stage cache.

The config is a run config (`antidote run`) plus a `matrix:` section of lists over the attack (`matrix.py`:
the settings, seeds and cells) and an optional `general_utility:` section (`utility.py`). Each cell is an
`antidote run` (`pipeline.Pipeline`) in OUT/cells/<id>/ whose stages live in the one cache OUT/stages, so the
alignment is built once and a defense or setting added later reuses everything else.

OUT gets results.csv/results.json (one `rows.ResultRow` per defense x cell x judge), report.md and table.tex
(`compare_report.py`) and plots/ (`compare_plots.py`); `--plan` is `plan.py`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from antidote.configfile import config_from_mapping, read_yaml_mapping
from antidote.data.catalog import resolve_data_dir
from antidote.defenses import entry
from antidote.errors import AntidoteError
from antidote.evaluation.judge_install import ensure_default_judge
from antidote.experiments.cache import StageCache, locked
from antidote.experiments.compare_report import latex_table, report_markdown
from antidote.experiments.front import Margins
from antidote.experiments.matrix import (
    SFT,
    CompareConfig,
    MatrixConfig,
    build_cells,
    check_attack_data,
    settings,
)
from antidote.experiments.pipeline import Pipeline, clear_run_dir, prepare_run_dir
from antidote.experiments.rows import ResultRow, aggregate, cell_rows, mark_rows, to_csv, to_json
from antidote.experiments.runconfig import RunConfig, check
from antidote.experiments.utility import UtilityConfig, general_utility
from antidote.outputs import atomic_write_text

COMPARE_OUTPUTS = (
    *("stages", "cells", "results.csv", "results.json", "report.md", "table.tex", "plots", ".stage-locks"),
)


@dataclass
class CompareResult:
    """What `run_compare` returns: the rows, the stages it built and reused (folder names), and OUT."""

    rows: list[ResultRow]
    built: list[str]
    reused: list[str]
    out: Path


def _say(message: str) -> None:
    print(f"antidote compare: {message}", file=sys.stderr, flush=True)


def load_compare_config(path: str, say: Callable[[str], None] = _say, **overrides: Any) -> CompareConfig:
    """Read a compare config and build every cell's config (each checked as `antidote run` checks one), so
    bad input fails here, before any training and before anything is written. The cell count is said first."""
    data = read_yaml_mapping(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "matrix" not in data:
        raise AntidoteError(f"{path} has no matrix: section; give e.g. matrix: {{lr: [1e-4, 5e-4]}}")
    matrix = config_from_mapping(MatrixConfig, data.pop("matrix") or {}, f"{path}: matrix")
    utility = data.pop("general_utility", None)
    if utility is not None:
        utility = config_from_mapping(UtilityConfig, utility, f"{path}: general_utility")
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
        for name, options in run.defenses.items():
            if entry(name, options).needs_base:
                raise AntidoteError(
                    f"{path}: defense {name} needs the base -> aligned pair, but the config has no align: "
                    "section; add one (the alignment to build) or drop the defense"
                )
    cells = build_cells(run, matrix, path, say)
    check_attack_data(cells, path)
    return CompareConfig(run, matrix, cells, path, utility)


def seeds_compare(run: RunConfig, path: str = "the config") -> CompareConfig:
    """`antidote run` with `seeds: [...]`: every defense (and the plain attack) at every seed, in the run
    folder; report.md gives the mean and 95% t interval over seeds, cells/ the runs one by one."""
    matrix = MatrixConfig(seeds=list(run.seeds), all_seeds_for=[SFT, *run.defenses])
    base = replace(run, seeds=[])
    cells = build_cells(base, matrix, path)
    check_attack_data(cells, path)
    return CompareConfig(base, matrix, cells, path)


def run_seeds(run: RunConfig, say: Callable[[str], None] = _say) -> CompareResult:
    """`antidote run` of a config with `seeds:` (see `seeds_compare`); its OUT is the run folder."""
    check(run)
    return run_compare(seeds_compare(run), say)


def run_compare(config: CompareConfig, say: Callable[[str], None] = _say) -> CompareResult:
    """Run (or resume) every cell in OUT with one stage cache; write results.csv, results.json, report.md,
    table.tex and plots/."""
    from antidote.experiments import compare_plots

    out = config.out
    prepare_run_dir(out)
    rows: list[ResultRow] = []
    built: list[str] = []
    reused: list[str] = []
    with locked(out, shared=config.part):
        ensure_default_judge(config.run.judges, resolve_data_dir(config.run.data_dir), say)
        for cell in config.cells:
            say(f"cell {cell.id}")
            folder = out / "cells" / cell.id
            folder.mkdir(parents=True, exist_ok=True)
            # one cache folder; a fresh view per cell counts its own stages
            cache = StageCache(out, say, shared=config.part)
            summary = Pipeline(cell.config, folder, say, cache=cache).run()
            utility = general_utility(summary, cache, config.utility) if config.utility else {}
            rows += cell_rows(cell, summary, cache, utility)
            built += cache.built
            reused += [s for s in cache.cached if s not in built and s not in reused]
        margins = Margins(config.run.max_degenerate_rise, config.run.max_over_refusal_rise)
        mark_rows(rows, margins, group=("judge_spec", "cell"))
        atomic_write_text(out / "results.json", to_json(rows))
        atomic_write_text(out / "results.csv", to_csv(rows))
        table = aggregate(rows)
        mark_rows(table, margins, group=("judge_spec", "setting"))
        atomic_write_text(out / "report.md", report_markdown(config, rows, table))
        judge = rows[0].judge_spec  # the first judge that scored (a configured one may be left out)
        atomic_write_text(out / "table.tex", latex_table(table, judge))
        plots = out / "plots"
        plots.mkdir(exist_ok=True)
        compare_plots.write_all(config, rows, table, settings(config.matrix)[0], out / "stages", plots, judge)
    return CompareResult(rows, built, reused, out)


def clear_compare_dir(out: Path) -> None:
    """--overwrite: remove what an earlier compare wrote into OUT (and nothing else)."""
    prepare_run_dir(out, create=False)  # refuses a folder antidote did not make, before removing anything
    clear_run_dir(out, COMPARE_OUTPUTS)
