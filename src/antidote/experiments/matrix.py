"""The `matrix:` section of `antidote compare` and the cells it makes.

A setting is one value per matrix key (`lr`, `epochs`, `harmful_ratio`, `num_samples`; `task`, a named
override of the finetune/evaluate/validate task keys):
- `sweep: one-at-a-time` (default, as in the paper): the first value of every list is the default; the
  settings are the default one plus, for each key, each of its other values with the other keys at default;
- `sweep: product`: every combination.
Each setting runs at every seed for the defenses named in `all_seeds_for` (and `sft`, the plain attack, which
is also their attack); the other defenses run at the first seed only. One (setting, seed) is a cell: an
`antidote run` in OUT/cells/<id>/. A matrix that contradicts itself (a value twice, values that print as the
same cell id, a task override of a swept key, no defense at the later seeds) is refused, and so is one of more
than `max_cells` cells, before any cell is built.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError
from antidote.experiments.runconfig import RunConfig, check, stage_config
from antidote.experiments.utility import UtilityConfig

SFT = "sft"  # the plain attack (the pipeline's `attacked` row), no defense
MATRIX_KEYS = ("lr", "epochs", "harmful_ratio", "num_samples")
TASK_SECTIONS = ("finetune", "evaluate", "validate")
SWEEPS = ("one-at-a-time", "product")
MAX_CELLS = 1000
SAY_CELLS = 100  # from this many cells the count is said before they are checked
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
    max_cells: int = field(
        default=MAX_CELLS,
        metadata={"help": "refuse a matrix of more cells than this (raise it to run a bigger sweep)"},
    )

    def __post_init__(self) -> None:
        if self.sweep not in SWEEPS:
            raise AntidoteError(f"matrix: sweep {self.sweep!r} is unknown; choose one of {', '.join(SWEEPS)}")
        if self.max_cells < 1:
            raise AntidoteError(f"matrix: max_cells must be at least 1, got {self.max_cells}")
        for name in (*MATRIX_KEYS, "seeds", "tasks", "all_seeds_for"):
            value = getattr(self, name)
            if value is not None and len(value) == 0:
                raise AntidoteError(f"matrix: {name} is empty; give at least one value or leave it out")
            if isinstance(value, list) and len(set(value)) != len(value):
                raise AntidoteError(f"matrix: {name} repeats a value: {value}")
        for name in MATRIX_KEYS:
            values = getattr(self, name) or []
            bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise AntidoteError(f"matrix: {name} holds {bad[0]}; give finite numbers")
            shown: dict[str, Any] = {}
            for v in values:
                text = setting_id({name: v})
                if text in shown:
                    raise AntidoteError(
                        f"matrix: {name} values {shown[text]!r} and {v!r} get the same cell id ({text}); "
                        "give values that differ in their first 6 significant digits"
                    )
                shown[text] = v
        for name, overrides in (self.tasks or {}).items():
            if not _NAME.match(str(name)):
                raise AntidoteError(f"matrix: tasks: name {name!r} must be letters, digits, '.', '_' or '-'")
            if not isinstance(overrides, dict) or set(overrides) - set(TASK_SECTIONS):
                raise AntidoteError(
                    f"matrix: tasks: {name} must map some of {', '.join(TASK_SECTIONS)} to option: value"
                )
            swept = [k for k in (overrides.get("finetune") or {}) if k in MATRIX_KEYS and getattr(self, k)]
            if swept:
                raise AntidoteError(
                    f"matrix: tasks: {name} sets finetune {swept[0]}, which the matrix also sweeps "
                    f"({swept[0]}: {getattr(self, swept[0])}) and would override; drop one of the two"
                )

    def n_settings(self) -> int:
        """How many settings `settings` gives, without building them."""
        sizes = [len(getattr(self, k)) for k in MATRIX_KEYS if getattr(self, k)]
        if self.tasks:
            sizes.append(len(self.tasks))
        if self.sweep == "product":
            return math.prod(sizes)
        return 1 + sum(n - 1 for n in sizes)


@dataclass(frozen=True)
class Cell:
    """One (setting, seed): its run config and what it varies."""

    id: str
    setting: str  # the setting's id (the cell id less the seed)
    values: dict[str, Any]  # matrix key -> value (task: its name)
    seed: int
    config: RunConfig


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


def build_cells(
    run: RunConfig, matrix: MatrixConfig, path: str, say: Callable[[str], None] | None = None
) -> list[Cell]:
    """Every cell's run config, each checked as `antidote run` checks one. The cell count is checked against
    `max_cells` first, and said (`say`) before the checks where there are many."""
    base_seed = stage_config(run, "finetune", path, model="<model>", output="<output>").seed
    seeds = matrix.seeds or [base_seed]
    every_seed = matrix.all_seeds_for or []
    later = 0 if not [n for n in every_seed if n == SFT or n in run.defenses] else len(seeds) - 1
    n_cells = matrix.n_settings() * (1 + later)
    if n_cells > matrix.max_cells:
        raise AntidoteError(
            f"{path}: the matrix makes {n_cells} cells, more than max_cells ({matrix.max_cells}); sweep "
            "fewer values (sweep: one-at-a-time varies one key at a time), or raise matrix: max_cells to "
            "confirm"
        )
    if say is not None and n_cells >= SAY_CELLS:  # checking each cell takes a while: say why first
        say(f"{matrix.n_settings()} settings x {1 + later} seeds = {n_cells} cells; checking each")
    cells = []
    for values in settings(matrix):
        sid = setting_id(values)
        for i, seed in enumerate(seeds):
            defenses = run.defenses if i == 0 else {k: v for k, v in run.defenses.items() if k in every_seed}
            if i > 0 and not defenses and SFT not in every_seed:
                continue
            sections = {s: dict(getattr(run, s) or {}) for s in TASK_SECTIONS}
            if "task" in values and matrix.tasks:
                for section, over in matrix.tasks[values["task"]].items():
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
                ft = stage_config(config, "finetune", where, model="<model>", output="<output>")
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


def check_attack_data(cells: list[Cell], path: str) -> None:
    """Each cell's attack mix must fit in its data (cheap: the data are read, not tokenized)."""
    from antidote.training.stages import attack_data, attack_mix

    sizes: dict[tuple[Any, ...], tuple[int, int]] = {}
    for cell in cells:
        ft = stage_config(cell.config, "finetune", path, model="<model>", output="<output>")
        key = (ft.harmful, ft.task, ft.task_data, ft.data_dir)
        if key not in sizes:
            task, harmful = attack_data(ft)
            sizes[key] = (len(harmful), len(task))
        n_harmful, n_task = sizes[key]
        try:
            attack_mix(
                [("", "", "")] * n_task, [("", "", "")] * n_harmful, ft.num_samples, ft.harmful_ratio, 0
            )
        except AntidoteError as err:
            raise AntidoteError(f"{path}: cell {cell.id}: {err}") from None


@dataclass
class CompareConfig:
    """A read and checked compare config: the run config, its matrix, the cells it makes, and the optional
    general-utility section."""

    run: RunConfig
    matrix: MatrixConfig
    cells: list[Cell]
    path: str
    utility: UtilityConfig | None = None
    part: bool = False  # only some cells (`select_cells`): other parts may share the folder at once

    @property
    def out(self) -> Path:
        return Path(self.run.run_dir).expanduser().resolve()


def short_id(cell: Cell, default: dict[str, Any]) -> str:
    """What sets a cell's setting apart from the default one (`lr=0.0001`), or `default`."""
    return setting_id({k: v for k, v in cell.values.items() if default.get(k) != v}) or "default"


def select_cells(config: CompareConfig, wanted: list[str]) -> CompareConfig:
    """The config with only the cells `wanted` names (`compare --cells`): each entry a setting by what sets it
    apart from the default (`lr=0.0001`, `default`) or by its full id, or one cell (`default,seed=2`). The
    cells left out keep their cached stages; a later run without --cells reuses them. Parts may run at the
    same time in one folder (`part`: the stage cache then locks each stage)."""
    default = settings(config.matrix)[0]
    chosen: set[str] = set()
    unknown = []
    for name in wanted:
        found = {
            c.id
            for c in config.cells
            if name in (c.id, c.setting, short_id(c, default), f"{short_id(c, default)},seed={c.seed}")
        }
        if not found:
            unknown.append(name)
        chosen |= found
    if unknown:
        known = list(dict.fromkeys(short_id(c, default) for c in config.cells))
        raise AntidoteError(
            f"{config.path}: --cells {', '.join(map(repr, unknown))} names no cell; its settings are "
            f"{', '.join(known)} (add ,seed=N for one seed)"
        )
    return replace(config, cells=[c for c in config.cells if c.id in chosen], part=True)


def reverse_defenses(config: CompareConfig) -> CompareConfig:
    """The config with each cell's defenses in reverse order (`compare --reverse`): the same stages, built in
    the opposite order, so a second process on the same cells starts from the other end and the two meet
    in the middle."""
    cells = [
        replace(c, config=replace(c.config, defenses=dict(reversed(list(c.config.defenses.items())))))
        for c in config.cells
    ]
    return replace(config, cells=cells, part=True)
