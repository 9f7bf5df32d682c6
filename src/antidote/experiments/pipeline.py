"""`antidote run CONFIG.yaml`: align -> attack -> realign -> evaluate from one config, with a stage cache.

Each stage writes one folder, RUN_DIR/stages/<stage>-<key>, where key hashes everything the stage depends on:
its settings, the keys of the stages before it, and the size and time of the data files it reads. A stage is
built in a temporary sibling folder and renamed into place only when complete, so an existing folder is a
finished stage. A rerun (after Ctrl-C, a kill, or a changed setting) reuses finished stages, deletes
half-written ones and redoes the rest; changing one setting redoes that stage and those after it.

Stages: align (merged model), finetune (attack adapter on the aligned model), realign (Antidote on the attack
adapter: one calibration pass, one adapter per mask ratio), then one evaluation per model (base, aligned,
attacked, realigned at each ratio) with every judge. With a `validate` section the ratios are also scored
on validation prompts and the operating point is chosen there, never on the evaluation prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from antidote.config import read_yaml_mapping
from antidote.data.sources import DATA_DIR_ENV, set_data_dir
from antidote.errors import AntidoteError
from antidote.evaluation.judges import parse_judge_spec
from antidote.evaluation.run import EvaluateConfig
from antidote.models.loading import EMBEDDED_NAME
from antidote.realignment.config import RealignConfig
from antidote.training.stages import AlignConfig, FinetuneConfig

STAGE_VERSION = 1  # bump when a stage's code changes what it writes: old cache entries are then not reused
SECTIONS: dict[str, tuple[type, set[str]]] = {  # section -> (its dataclass, fields the pipeline sets itself)
    "align": (AlignConfig, {"model", "output", "overwrite"}),
    "finetune": (FinetuneConfig, {"model", "output", "overwrite"}),
    "realign": (RealignConfig, {"model", "adapter", "output", "overwrite", "merge"}),
    "evaluate": (EvaluateConfig, {"model", "adapter", "output", "overwrite", "judge"}),
    "validate": (EvaluateConfig, {"model", "adapter", "output", "overwrite", "judge"}),
}


@dataclass
class RunConfig:
    """A whole experiment. Sections hold the options of `antidote align/finetune/realign/evaluate`."""

    model: str = EMBEDDED_NAME
    run_dir: str = "runs/run"
    data_dir: str | None = None
    template: str = "chat"
    judges: list[str] = field(default_factory=lambda: ["keyword"])
    evaluate_base: bool = True
    max_fa_drop: float = 5.0
    align: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    realign: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    validate: dict[str, Any] | None = None


def load_run_config(path: str, **overrides: Any) -> RunConfig:
    """Read and check a run config: unknown keys anywhere are named, bad values fail before any work."""
    data = read_yaml_mapping(path)
    allowed = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise AntidoteError(
            f"config file {path} has unknown keys: {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(allowed))}"
        )
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = RunConfig(**data)
    check(config, path)
    return config


def _section(config: RunConfig, name: str) -> dict[str, Any]:
    value = getattr(config, name)
    return {str(k).replace("-", "_"): v for k, v in (value or {}).items()}


def check(config: RunConfig, path: str = "the config") -> None:
    """Build every stage's config once with placeholder paths, so bad values fail now, not an hour in."""
    if isinstance(config.judges, str):
        config.judges = [config.judges]
    if not config.judges:
        raise AntidoteError(f"{path}: judges is empty; use e.g. [keyword]")
    for spec in config.judges:
        parse_judge_spec(spec)
    for name, (cls, reserved) in SECTIONS.items():
        raw = getattr(config, name)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise AntidoteError(f"{path}: {name} must be a mapping of option: value")
        section = _section(config, name)
        fields = {f.name for f in dataclasses.fields(cls)} - reserved
        unknown = sorted(set(section) - fields)
        if unknown:
            raise AntidoteError(
                f"{path}: unknown keys in {name}: {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        _stage_config(config, name, model="<model>", output="<output>")
    if not _section(config, "realign").get("data"):
        raise AntidoteError(f"{path}: realign needs data (harmful prompt+answer pairs, e.g. beavertails)")


def _stage_config(config: RunConfig, name: str, **fixed: Any) -> Any:
    cls = SECTIONS[name][0]
    section = _section(config, name)
    if "template" in {f.name for f in dataclasses.fields(cls)}:
        section.setdefault("template", config.template)
    try:
        return cls(**{**section, **fixed})
    except TypeError as err:
        raise AntidoteError(f"bad {name} section: {err}") from err


# ---- the stage cache -----------------------------------------------------------------------------------


def _fingerprint(value: Any) -> Any:
    """Strings naming existing files also carry their size and modification time."""
    if isinstance(value, str) and value and Path(value).expanduser().is_file():
        stat = Path(value).expanduser().stat()
        return [value, stat.st_size, stat.st_mtime_ns]
    if isinstance(value, dict):
        return {k: _fingerprint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    return value


def stage_key(spec: dict[str, Any]) -> str:
    text = json.dumps({"version": STAGE_VERSION, **_fingerprint(spec)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class StageCache:
    """RUN_DIR/stages/<name>-<key> folders; a folder that exists is complete (it was renamed into place)."""

    def __init__(self, run_dir: Path, say: Callable[[str], None]) -> None:
        self.root = run_dir / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.say = say
        self.cached: list[str] = []
        self.built: list[str] = []
        for stale in [*self.root.glob(".*.tmp-*"), *self.root.glob(".*.old-*")]:
            say(f"removing an unfinished stage from an interrupted run: {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)

    def run(self, name: str, spec: dict[str, Any], build: Callable[[Path], Any]) -> tuple[Path, str]:
        """The stage's folder, built by `build(folder)` unless a finished one exists; and its key."""
        key = stage_key({"stage": name, **spec})
        folder = self.root / f"{name}-{key}"
        if folder.is_dir():
            self.say(f"[{name}] done before, reusing {folder.name}")
            self.cached.append(folder.name)
            return folder, key
        self.say(f"[{name}] running -> {folder.name}")
        start = time.perf_counter()
        build(folder)  # writes `folder` atomically
        seconds = round(time.perf_counter() - start, 1)
        (folder / "stage.json").write_text(
            json.dumps({"stage": name, "key": key, "seconds": seconds, "spec": spec}, indent=2, default=str)
            + "\n"
        )
        self.built.append(folder.name)
        return folder, key


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One run per run folder at a time (a second one would delete the first one's unfinished stages)."""
    with open(run_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise AntidoteError(
                f"another antidote run is using {run_dir}; wait for it or use another run_dir"
            ) from err
        yield


# ---- the pipeline --------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"antidote run: {message}", file=sys.stderr, flush=True)


def run_pipeline(config: RunConfig, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run (or resume) every stage; write results.json, results.md, summary.json and tradeoff.png."""
    check(config)
    run_dir = Path(config.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(DATA_DIR_ENV)
    try:
        set_data_dir(config.data_dir)
        with _locked(run_dir):
            return _run(config, run_dir, say)
    finally:
        if previous is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = previous


def _run(config: RunConfig, run_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from antidote.realignment.engine import run_realign
    from antidote.training.stages import run_align, run_finetune

    start = time.perf_counter()
    cache = StageCache(run_dir, say)
    data_dir = os.environ.get(DATA_DIR_ENV)
    judges = _Judges(config.judges)

    align_cfg = _stage_config(config, "align", model=config.model, output="")
    align_spec = {"model": config.model, "data_dir": data_dir, "config": _settings(align_cfg)}
    aligned, align_key = cache.run(
        "align", align_spec, lambda out: run_align(replace(align_cfg, output=str(out)))
    )

    ft_cfg = _stage_config(config, "finetune", model=str(aligned), output="")
    ft_spec = {"upstream": align_key, "data_dir": data_dir, "config": _settings(ft_cfg)}
    attack, ft_key = cache.run(
        "finetune", ft_spec, lambda out: run_finetune(replace(ft_cfg, output=str(out)))
    )

    re_cfg = _stage_config(config, "realign", model=str(aligned), adapter=str(attack), output="")
    re_spec = {"upstream": ft_key, "data_dir": data_dir, "config": _settings(re_cfg)}
    realigned, re_key = cache.run(
        "realign", re_spec, lambda out: run_realign(replace(re_cfg, output=str(out)))
    )
    ratios = list(re_cfg.mask_ratios)

    def adapter_of(ratio: float) -> Path:
        return realigned / f"alpha-{ratio:g}" if len(ratios) > 1 else realigned

    models: list[tuple[str, str, str | None, str]] = []  # name, model, adapter, key of what made it
    if config.evaluate_base:
        models.append(("base", config.model, None, stage_key({"model": config.model})))
    models += [("aligned", str(aligned), None, align_key), ("attacked", str(aligned), str(attack), ft_key)]
    models += [(f"realigned@{r:g}", str(aligned), str(adapter_of(r)), f"{re_key}/{r:g}") for r in ratios]

    def evaluate(
        section: str, name: str, model: str, adapter: str | None, made_by: str
    ) -> list[dict[str, Any]]:
        ev_cfg = _stage_config(config, section, model=model, adapter=adapter, output="")
        spec = {
            "upstream": made_by,
            "data_dir": data_dir,
            "judges": config.judges,
            "config": _settings(ev_cfg),
        }
        folder, _ = cache.run(
            f"{section}-{name}", spec, lambda out: _evaluate_stage(out, ev_cfg, config.judges, judges)
        )
        rows = json.loads((folder / "judged.json").read_text())
        seconds = json.loads((folder / "stage.json").read_text()).get("seconds")
        return [{**r, "model": name, "model_path": r["model"], "seconds": seconds} for r in rows]

    rows = [row for name, m, a, k in models for row in evaluate("evaluate", name, m, a, k)]
    summary: dict[str, Any] = {"rows": rows}
    if config.validate is not None:
        from antidote.experiments.demo import choose_operating_point

        first = config.judges[0]
        val = {
            name: next(r for r in evaluate("validate", name, m, a, k) if r["judge_spec"] == first)
            for name, m, a, k in models
            if name == "attacked" or name.startswith("realigned@")
        }
        sweep = [{"mask_ratio": r, **_numbers(val[f"realigned@{r:g}"])} for r in ratios]
        chosen, why = choose_operating_point(sweep, val["attacked"]["fa"], config.max_fa_drop)
        summary["sweep_validation"] = [{"mask_ratio": 0.0, **_numbers(val["attacked"])}, *sweep]
        summary["operating_point"] = {"mask_ratio": chosen["mask_ratio"], "why": why, "judge": first}
    summary.update(
        {
            "recovered_share_of_hs_rise": _recovered(rows, summary.get("operating_point"), config.judges),
            "stages": {"reused": cache.cached, "built": cache.built},
            "run_dir": str(run_dir),
            "config": asdict(config),
            "seconds_total": round(time.perf_counter() - start, 1),
        }
    )
    _write(run_dir / "results.json", json.dumps(rows, indent=2) + "\n")
    _write(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    _write(run_dir / "results.md", markdown(summary, ratios))
    _plot(summary, ratios, run_dir / "tradeoff.png")
    return summary


def _settings(stage_config: Any) -> dict[str, Any]:
    out = asdict(stage_config)
    for name in ("output", "overwrite"):
        out.pop(name, None)
    return out


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("hs", "fa", "degenerate", "over_refusal")}


class _Judges:
    """Judges are loaded on first use, so a rerun that finds every evaluation done loads none."""

    def __init__(self, specs: list[str]) -> None:
        self.specs = specs
        self.loaded: dict[str, Any] = {}

    def __getitem__(self, spec: str) -> Any:
        if spec not in self.loaded:
            from antidote.evaluation.model_judges import make_judge

            self.loaded[spec] = make_judge(spec)
        return self.loaded[spec]


def _evaluate_stage(out: Path, config: EvaluateConfig, specs: list[str], judges: _Judges) -> None:
    """Generate once; the first judge scores during `run_evaluate`, the others re-judge the generations."""
    from antidote.evaluation.judges import harmful_score
    from antidote.evaluation.run import run_evaluate
    from antidote.outputs import atomic_output_dir

    with atomic_output_dir(out, overwrite=False) as tmp:
        first = run_evaluate(replace(config, output=str(tmp / "results.json")), judge=judges[specs[0]])
        first.pop("config", None)
        rows = [{**first, "judge_spec": specs[0]}]
        records = [json.loads(line) for line in (tmp / "generations.jsonl").read_text().splitlines()]
        harmful = [g for g in records if g["set"] == "harmful"]
        for spec in specs[1:]:
            judge = judges[spec]
            verdicts = judge.verdicts([g["prompt"] for g in harmful], [g["response"] for g in harmful])
            score = harmful_score(verdicts, judge.name)
            unparsed = round(100.0 * verdicts.count("unparsed") / len(verdicts), 2)
            rows.append(
                {**first, "hs": score.hs, "judge": judge.name, "judge_spec": spec, "unparsed": unparsed}
            )
            kind = parse_judge_spec(spec)[0]
            (tmp / f"verdicts-{kind}.json").write_text(json.dumps(verdicts) + "\n")
        (tmp / "judged.json").write_text(json.dumps(rows, indent=2) + "\n")


def _recovered(rows: list[dict[str, Any]], op: dict[str, Any] | None, judges: list[str]) -> float | None:
    """Share of the attack's HS rise removed at the chosen ratio (first judge, evaluation prompts)."""
    if op is None:
        return None
    by = {r["model"]: r for r in rows if r["judge_spec"] == judges[0]}
    rise = by["attacked"]["hs"] - by["aligned"]["hs"]
    fixed = by["attacked"]["hs"] - by[f"realigned@{op['mask_ratio']:g}"]["hs"]
    return round(fixed / rise, 3) if rise > 0 else None


def markdown(summary: dict[str, Any], ratios: list[float]) -> str:
    rows = summary["rows"]
    first = rows[0]
    lines = [
        "# antidote run",
        "",
        f"Evaluation: {first['n_prompts']} harmful prompts from {first['harmful_set']}; task {first['task']} "
        f"({first['n_task']} items, {first['task_data']}); over-refusal on {first['n_harmless']} harmless "
        f"instructions ({first['harmless_set']}). Degenerate is the keyword judge's share of the same "
        "answers.",
        "",
        "| model | judge | HS | degenerate | FA | over-refusal | eval seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['judge']} | {r['hs']} | {r['degenerate']} | {r['fa']} | {r['over_refusal']} | "
        f"{r['seconds']} |"
        for r in rows
    ]
    if "operating_point" in summary:
        op = summary["operating_point"]
        lines += [
            "",
            "Validation sweep (0 = the attacked model):",
            "",
            "| alpha | HS | FA |",
            "|---|---|---|",
        ]
        lines += [f"| {s['mask_ratio']} | {s['hs']} | {s['fa']} |" for s in summary["sweep_validation"]]
        lines += [
            "",
            f"Operating point: alpha {op['mask_ratio']} ({op['why']}).",
            f"Share of the HS rise recovered there on the evaluation prompts: "
            f"{summary['recovered_share_of_hs_rise']}.",
        ]
    else:
        lines += ["", f"No validate section: no operating point chosen among alphas {ratios}."]
    stages = summary["stages"]
    lines += [
        "",
        f"Stages reused: {len(stages['reused'])}, built: {len(stages['built'])}. "
        f"Total time: {summary['seconds_total']} s.",
        "",
    ]
    return "\n".join(lines)


def _plot(summary: dict[str, Any], ratios: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge = summary["config"]["judges"][0]
    by = {r["model"]: r for r in summary["rows"] if r["judge_spec"] == judge}
    x = [0.0, *ratios]
    points = [by["attacked"], *(by[f"realigned@{r:g}"] for r in ratios)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [p["hs"] for p in points], "o-", color="tab:red", label=f"HS ({judge}), evaluation")
    ax.plot(x, [p["fa"] for p in points], "s-", color="tab:blue", label="FA, evaluation")
    if "operating_point" in summary:
        ax.axvline(
            summary["operating_point"]["mask_ratio"], color="gray", linestyle="--", label="chosen alpha"
        )
    ax.set_xlabel("mask ratio alpha (0 = attacked model)")
    ax.set_ylabel("percent")
    ax.set_title("Antidote trade-off")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
