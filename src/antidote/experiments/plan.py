"""`antidote compare --plan`: the cells and each stage with whether it is done, from a dry run of every cell's
pipeline on a `DryRunCache` (nothing is built or written), and an estimate of the time still needed from the
recorded stages: seconds per unit of work (training samples x epochs, evaluated prompts) of stages of the same
kind and method in this folder, else of a stage of the same name, else the shipped reference rates (a fresh
folder), measured on the embedded model on 2 CPU cores (`benchmarks/plan_reference.py` makes them)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.experiments.cache import RECORD, DryRunCache, read_record
from antidote.experiments.matrix import SFT
from antidote.experiments.pipeline import Pipeline, prepare_run_dir

if TYPE_CHECKING:
    from antidote.experiments.matrix import CompareConfig


REFERENCE_FILE = Path(__file__).parent / "configs" / "plan_reference.json"


def plan(config: CompareConfig) -> str:
    """The plan as text; writes nothing. A broken cached stage is shown as one to rebuild, with why."""
    out = config.out
    prepare_run_dir(out, create=False)
    cache = DryRunCache(out)
    rates, by_name = recorded_rates(cache.root)
    reference = reference_rates()
    lines = [f"antidote compare --plan: {len(config.cells)} cells in {out}"]
    total = {"folder": 0.0, "reference": 0.0}
    counted = {"folder": 0, "reference": 0, "none": 0}
    units_of: dict[str, float | None] = {}  # stage key -> units, for the judge stages that follow
    for cell in config.cells:
        start = len(cache.planned)
        Pipeline(cell.config, out / "cells" / cell.id, lambda m: None, cache=cache).run()
        lines.append(f"cell {cell.id}  (defenses: {', '.join([SFT, *cell.config.defenses])})")
        seen: set[str] = set()
        for stage in cache.planned[start:]:
            name, folder = stage["name"], stage["folder"]
            units = stage_units(stage, units_of)
            units_of[folder.rsplit("-", 1)[-1]] = units
            if folder in seen:
                continue
            seen.add(folder)
            if stage["done"]:
                lines.append(f"  cached  {name}")
                continue
            estimate, source = _estimate(stage, units, rates, by_name, reference)
            counted[source] += 1
            if estimate is not None:
                total[source] += estimate
            lines.append(
                f"  build   {name}"
                + (f"  ~{estimate:.0f} s" if estimate is not None else "  (no estimate)")
                + (f"  (the cached one is broken: {stage['why']})" if stage["why"] else "")
            )
    n_build = len(cache.built)
    minutes = (total["folder"] + total["reference"]) / 60
    lines.append(
        f"{n_build} stages to build, {len(set(cache.cached))} cached; estimated {minutes:.1f} min of stage "
        f"time: {counted['folder']} stages from this folder's recorded stages of their kind, "
        f"{counted['reference']} from reference rates ({reference.get('measured', 'none')}), "
        f"{counted['none']} without an estimate; the stages after a post defense that is not built yet are "
        "not all known (its variants count as one)"
    )
    return "\n".join(lines)


def _estimate(
    stage: dict[str, Any],
    units: float | None,
    rates: dict[str, float],
    by_name: dict[str, float],
    reference: dict[str, Any],
) -> tuple[float | None, str]:
    """Seconds for a stage to build and where the number comes from: this folder's seconds per unit of the
    stage's kind and method, else a recorded stage of its name, else the shipped reference rates."""
    key = rate_key(stage)
    if units is not None and key in rates:
        return rates[key] * units, "folder"
    if stage["name"] in by_name:
        return by_name[stage["name"]], "folder"
    if units is not None and key in reference.get("rates", {}):
        return reference["rates"][key] * units, "reference"
    return None, "none"


def rate_key(stage: dict[str, Any]) -> str:
    """Stages that cost alike per unit of work: kind, method (the code that runs) and judge."""
    return ":".join(str(stage.get(k)) for k in ("kind", "method", "judge") if stage.get(k))


def stage_units(stage: dict[str, Any], units_of: dict[str, float | None]) -> float | None:
    """The work a stage does, in the units its kind scales with (None where its settings do not say):
    training: samples x epochs; an evaluation: prompts and task items, harmful and harmless prompts weighted
    by their new tokens / 32; a judge: its evaluation's (looked up in `units_of` by that stage's key); a
    defense: 1 (its own cost, per method)."""
    kind, spec = stage.get("kind"), stage.get("spec") or {}
    config = spec.get("config") or {}
    if kind == "finetune":
        n, epochs = config.get("num_samples"), config.get("epochs")
        return float(n * epochs) if isinstance(n, int) and isinstance(epochs, (int, float)) else None
    if kind == "align":
        data_dir = config.get("data_dir")
        sizes = [_size(config[data], config.get(n), data_dir) for data, n in ALIGN_SIZES if config.get(data)]
        epochs = config.get("epochs")
        known = [n for n in sizes if n is not None]
        if not sizes or len(known) < len(sizes) or not isinstance(epochs, (int, float)):
            return None
        return float(sum(known) * epochs)
    if kind in ("evaluate", "validate"):
        sizes = [config.get(k) for k in ("max_prompts", "max_harmless", "max_task", "max_new_tokens")]
        numbers = [n for n in sizes if isinstance(n, int)]
        if len(numbers) < len(sizes):
            return None
        prompts, harmless, task, tokens = numbers
        return (prompts + harmless) * tokens / 32 + task
    if kind == "judge":
        upstream = spec.get("upstream")
        return units_of.get(upstream) if isinstance(upstream, str) else None
    return 1.0


ALIGN_SIZES = (("data", "max_samples"), ("helpful_data", "max_helpful"), ("task_data", "max_task"))


def _rows(source: str, data_dir: str | None) -> int | None:
    """How many records a local data file or named set holds; None for the hub or the built-in sets (a plan
    never downloads)."""
    from antidote.data.catalog import is_named, resolve_data_dir

    if source.startswith(("hf:", "builtin")):
        return None
    if is_named(source):
        folder = resolve_data_dir(data_dir)
        files = None if folder is None else _local_files(source, folder)
    else:
        files = [Path(source).expanduser()] if Path(source).expanduser().is_file() else None
    if not files:
        return None
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)  # re-read when changed
    return _count(source, data_dir, stamp)


@functools.lru_cache(maxsize=256)
def _count(source: str, data_dir: str | None, stamp: tuple[Any, ...]) -> int | None:
    from antidote.data.catalog import read_rows

    try:
        return len(read_rows(source, data_dir))
    except Exception:  # an estimate only: a source that cannot be read here is reported when it runs
        return None


def _local_files(source: str, folder: Path) -> list[Path] | None:
    """The data folder's files of the named set `source` and of every set it excludes rows of; None when
    one of them is not there."""
    from antidote.data.catalog import NAMED

    name, _, split = source.partition(":")
    named = NAMED.get(name)
    entry = None if named is None else named.splits.get(split or named.default or "")
    if entry is None or entry.file is None or not (folder / entry.file).is_file():
        return None
    files = [folder / entry.file]
    for other in entry.exclude:
        more = _local_files(other, folder)
        if more is None:
            return None
        files += more
    return files


def _size(source: str, most: Any, data_dir: str | None) -> int | None:
    """The samples a stage takes from `source`: its max_ setting, at most the source's rows when they are
    known; the whole source without one."""
    rows = _rows(str(source), data_dir)
    if isinstance(most, int):
        return most if rows is None else min(most, rows)
    return rows


def recorded_rates(*roots: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per unit (`stage_units`) for each `rate_key`, summed seconds over summed units, and mean
    seconds per stage name, over the finished stages in the stage folders `roots` (a record that does not
    parse is left out)."""
    records = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.glob(f"*/{RECORD}")):
            data = read_record(path.parent)
            if data is None or not isinstance(data.get("stage"), str):
                continue
            try:
                data["seconds"] = float(data.get("seconds", 0.0))
            except (TypeError, ValueError):
                continue
            records.append(data)
    units_of: dict[str, float | None] = {}
    for data in records:  # evaluations first: a judge stage's units are its evaluation's
        if data.get("kind") in ("evaluate", "validate"):
            units_of[str(data.get("key"))] = stage_units(data, units_of)
    seconds: dict[str, float] = {}
    units: dict[str, float] = {}
    names: dict[str, list[float]] = {}
    for data in records:
        names.setdefault(data["stage"], []).append(data["seconds"])
        n = stage_units(data, units_of)
        if n:
            key = rate_key(data)
            seconds[key] = seconds.get(key, 0.0) + data["seconds"]
            units[key] = units.get(key, 0.0) + n
    rates = {k: seconds[k] / units[k] for k in seconds}
    return rates, {k: sum(v) / len(v) for k, v in names.items()}


def reference_rates() -> dict[str, Any]:
    """The shipped reference: {"measured": what machine and run, "rates": rate_key -> seconds per unit},
    made by benchmarks/plan_reference.py from a finished compare; {} when missing."""
    try:
        data = json.loads(REFERENCE_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
