"""The Python API's whole-job functions: `antidote.evaluate`, `antidote.run`, `antidote.compare`. Each does
what the command of the same name does and returns its result as a dict (the steps of `realign` are in
`antidote.realignment`). Models may be names, folders or transformers/PEFT model objects.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError


def evaluate(
    model: Any, *, tokenizer: Any = None, output: str | Path | None = None, **options: Any
) -> dict[str, Any]:
    """Harmful score, task accuracy and over-refusal of a model, as `antidote evaluate`.

    model: a model name or folder, a `LoadedModel`, or a transformers/PEFT model object (with `tokenizer=`
    unless it was loaded from a local folder). output: the results file (its generations go beside it);
    default: nothing is written. options: any `antidote evaluate` option by its Python name (adapter,
    harmful_prompts, task, task_data, judge, max_prompts, template, device, dtype, ...).
    Returns the results (what results.json holds).
    """
    from antidote.evaluation.run import EvaluateConfig, run_evaluate
    from antidote.models import wrap_model

    names = {f.name for f in dataclasses.fields(EvaluateConfig)} - {"model", "output"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise AntidoteError(
            f"evaluate() got unknown options {', '.join(unknown)}; see antidote evaluate --help"
        )
    loaded = None
    if not isinstance(model, str | Path):
        loaded = wrap_model(model, tokenizer)
        if options.get("adapter"):
            raise AntidoteError("put the adapter on the model object (PeftModel), or pass a model name")
        if options.get("backend", "hf") != "hf":
            raise AntidoteError("a model object is evaluated with backend hf; pass a folder for vllm")
        model = loaded.source
    elif tokenizer is not None:
        raise AntidoteError("tokenizer= goes with a model object; a named model brings its own")
    if output is not None:
        return run_evaluate(EvaluateConfig(model=str(model), output=str(output), **options), loaded=loaded)
    with tempfile.TemporaryDirectory(prefix="antidote-evaluate-") as scratch:
        config = EvaluateConfig(model=str(model), output=str(Path(scratch) / "results.json"), **options)
        return run_evaluate(config, loaded=loaded)


def load_run(config: str | Path, output: str | Path | None = None, data_dir: str | None = None) -> Any:
    """A run config (a file, or the name of one shipped in the package: demo, demo-quick), checked."""
    from antidote.experiments.runconfig import PACKAGED_CONFIGS, load_run_config, packaged_config

    path = str(config)
    if not Path(path).exists() and (PACKAGED_CONFIGS / f"{path}.yaml").is_file():
        path = str(packaged_config(path))
    return load_run_config(path, run_dir=None if output is None else str(output), data_dir=data_dir)


def run(
    config: str | Path,
    *,
    output: str | Path | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
    plan: bool = False,
) -> dict[str, Any]:
    """The whole pipeline of a run config, as `antidote run`: align -> attack -> defenses -> evaluate, with
    the stage cache (a second call resumes). output: the run folder (default: the config's run_dir).
    Returns the summary (what summary.json holds; with `seeds:`, the compare's rows), or with plan=True
    {"plan": text} and does no work."""
    loaded = load_run(config, output, data_dir)
    if plan:
        return {"plan": plan_run(loaded, str(config))}
    if overwrite:
        clear_for_overwrite(loaded)
    return run_config(loaded)


def compare(
    config: str | Path,
    *,
    output: str | Path | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
    plan: bool = False,
) -> dict[str, Any]:
    """Every defense over a matrix of attack settings, as `antidote compare`. Returns {"rows", "stages",
    "out"} (rows: one per cell, defense and judge), or with plan=True {"plan": text} and does no work."""
    from antidote.experiments.compare import clear_compare_dir, load_compare_config, run_compare
    from antidote.experiments.plan import plan as plan_compare

    loaded = load_compare_config(
        str(config), run_dir=None if output is None else str(output), data_dir=data_dir
    )
    if plan:
        return {"plan": plan_compare(loaded)}
    if overwrite:
        clear_compare_dir(loaded.out)
    return compare_dict(run_compare(loaded))


# ---- shared with the CLI -----------------------------------------------------------------------------------


def compare_dict(result: Any) -> dict[str, Any]:
    """A `CompareResult` as the API returns it: {"rows", "stages": {"built", "reused"}, "out", "run_dir"}
    (rows as dicts, folders as strings)."""
    return {
        "rows": [dataclasses.asdict(row) for row in result.rows],
        "stages": {"built": list(result.built), "reused": list(result.reused)},
        "out": str(result.out),
        "run_dir": str(result.out),
    }


def run_config(config: Any) -> dict[str, Any]:
    """A run config's run: one pipeline, or with `seeds:` one per seed on one cache (a compare)."""
    if config.seeds:
        from antidote.experiments.compare import run_seeds

        return compare_dict(run_seeds(config))
    from antidote.experiments.pipeline import run_pipeline

    return run_pipeline(config)


def clear_for_overwrite(config: Any) -> None:
    """--overwrite of `run`/`demo`: remove what an earlier run wrote into the run folder (and nothing else);
    a folder antidote did not make is refused before anything is removed."""
    from antidote.experiments.rundir import clear_run_dir, prepare_run_dir

    run_dir = Path(config.run_dir).expanduser().resolve()
    prepare_run_dir(run_dir, create=False)
    if config.seeds:  # a run over seeds writes a compare's outputs
        from antidote.experiments.compare import clear_compare_dir

        clear_compare_dir(run_dir)
    else:
        clear_run_dir(run_dir)


def plan_run(config: Any, path: str = "the config") -> str:
    """`antidote run --plan`: the stages of the run (cached or to build, with a time estimate from stages
    of the same kind already recorded in the run folder), as `antidote compare --plan` gives them. The run
    is planned as a compare of one cell whose stage cache is the run folder's own `stages/`."""
    from antidote.experiments.compare import seeds_compare
    from antidote.experiments.matrix import Cell, CompareConfig, MatrixConfig
    from antidote.experiments.plan import plan

    if config.seeds:
        compare = seeds_compare(config, path)
    else:
        compare = CompareConfig(config, MatrixConfig(), [Cell("run", "run", {}, 0, config)], path)
    return plan(compare).replace("antidote compare --plan", "antidote run --plan", 1)
