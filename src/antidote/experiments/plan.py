"""`antidote compare --plan`: the cells and each stage with whether it is done, from a dry run of every cell's
pipeline on a `DryRunCache` (nothing is built or written), and an estimate of the time still needed from the
recorded seconds of finished stages of the same name, or of the same kind running the same (plain) code,
as their records say."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from antidote.experiments.cache import RECORD, DryRunCache, read_record
from antidote.experiments.matrix import SFT
from antidote.experiments.pipeline import Pipeline, prepare_run_dir

if TYPE_CHECKING:
    from antidote.experiments.matrix import CompareConfig


def plan(config: CompareConfig) -> str:
    """The plan as text; writes nothing. A broken cached stage is shown as one to rebuild, with why."""
    out = config.out
    prepare_run_dir(out, create=False)
    cache = DryRunCache(out)
    recorded = recorded_seconds(cache.root)
    lines = [f"antidote compare --plan: {len(config.cells)} cells in {out}"]
    total, unknown = 0.0, 0
    for cell in config.cells:
        start = len(cache.planned)
        Pipeline(cell.config, out / "cells" / cell.id, lambda m: None, cache=cache).run()
        lines.append(f"cell {cell.id}  (defenses: {', '.join([SFT, *cell.config.defenses])})")
        seen: set[str] = set()
        for stage in cache.planned[start:]:
            name, folder = stage["name"], stage["folder"]
            if folder in seen:
                continue
            seen.add(folder)
            if stage["done"]:
                lines.append(f"  cached  {name}")
                continue
            # same name, else the same kind of stage running the plain pipeline's code
            estimate = recorded.get(name) or (
                recorded.get(stage["kind"]) if stage["method"] == "plain" else None
            )
            if estimate is None:
                unknown += 1
            else:
                total += estimate
            lines.append(
                f"  build   {name}"
                + (f"  ~{estimate:.0f} s" if estimate is not None else "  (no estimate)")
                + (f"  (the cached one is broken: {stage['why']})" if stage["why"] else "")
            )
    n_build = len(cache.built)
    lines.append(
        f"{n_build} stages to build, {len(set(cache.cached))} cached; estimated {total / 60:.1f} min for "
        f"{n_build - unknown} of them from recorded stages of the same kind"
        + (f", {unknown} without a recorded stage of their kind" if unknown else "")
        + "; stages after a post defense not built yet are not all known (its variants count as one)"
    )
    return "\n".join(lines)


def recorded_seconds(root: Path) -> dict[str, float]:
    """Mean recorded seconds per stage name, and per kind over the stages that ran the plain pipeline's code,
    over the finished stages in `root` (a record that does not parse is left out; one from before kinds were
    recorded counts under its name only)."""
    found: dict[str, list[float]] = {}
    if root.is_dir():
        for path in root.glob(f"*/{RECORD}"):
            data = read_record(path.parent)
            if data is None or not isinstance(data.get("stage"), str):
                continue
            try:
                seconds = float(data.get("seconds", 0.0))
            except (TypeError, ValueError):
                continue
            plain = data.get("method") == "plain" and data.get("kind")
            for name in {data["stage"], plain or data["stage"]}:
                found.setdefault(str(name), []).append(seconds)
    return {k: sum(v) / len(v) for k, v in found.items()}
