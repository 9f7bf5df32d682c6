"""`antidote run CONFIG.yaml`: align -> fine-tune (the attack) -> defenses -> evaluate, from one config.

Every method is a registered defense (`antidote.defenses`), placed by its stage:
- `align` defenses replace the plain alignment (their config extends the `align` section), and the attack
  is then run on their aligned model: one row each;
- `finetune` defenses replace the plain attack fine-tuning on the aligned model (their config extends the
  `finetune` section): one row each;
- `post` defenses act on the plain attack's adapter: one row per variant (e.g. per mask ratio).
Rows `base`, `aligned` and `attacked` (no defense) are always there. With a `validate` section each post
defense's variant is chosen on validation prompts, never on the evaluation prompts.

Each stage is cached (`experiments/cache.py`): a rerun after a kill or a changed setting redoes only what
changed. `antidote demo` is this pipeline on a config shipped in the package (`experiments/configs/`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from antidote.configfile import config_from_mapping, read_yaml_mapping, values_from_mapping
from antidote.data.catalog import resolve_data_dir
from antidote.defenses import RESERVED, Defense, get
from antidote.errors import AntidoteError
from antidote.evaluation.judges import HARMFUL_VERDICTS, parse_judge_spec
from antidote.evaluation.run import EvaluateConfig
from antidote.evaluation.stats import recovered_share_interval
from antidote.experiments.cache import StageCache, locked, stage_key
from antidote.experiments.report import choose_operating_point, markdown, plot, recovered_share
from antidote.models.loading import EMBEDDED_NAME
from antidote.outputs import atomic_write_text, protected_reason
from antidote.training.stages import AlignConfig, FinetuneConfig

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
RUN_MARKER = ".antidote-run.json"
# section -> (its dataclass, fields the pipeline sets itself)
SECTIONS: dict[str, tuple[type, set[str]]] = {
    "align": (AlignConfig, {"model", "output", "overwrite", "data_dir"}),
    "finetune": (FinetuneConfig, {"model", "output", "overwrite", "data_dir"}),
    "evaluate": (
        EvaluateConfig,
        {"model", "adapter", "output", "overwrite", "judge", "also_judges", "data_dir"},
    ),
    "validate": (
        EvaluateConfig,
        {"model", "adapter", "output", "overwrite", "judge", "also_judges", "data_dir"},
    ),
}
STAGE_BASE = {"align": AlignConfig, "finetune": FinetuneConfig}


@dataclass
class RunConfig:
    """A whole experiment. Sections hold the options of `antidote align/finetune/evaluate`; `defenses` maps
    each defense's name to its options (`antidote defend NAME --help` lists them)."""

    model: str = EMBEDDED_NAME
    run_dir: str = "runs/run"
    data_dir: str | None = None
    template: str = "chat"
    # `learned` is the default learned judge (antidote judge train installs it); where it is not installed
    # the run scores with the others and says so in results.md.
    judges: list[str] = field(default_factory=lambda: ["keyword", "learned"])
    evaluate_base: bool = True
    max_fa_drop: float = 5.0
    align: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    defenses: dict[str, Any] = field(default_factory=dict)
    realign: dict[str, Any] | None = None  # the older spelling of `defenses: {antidote: ...}`
    evaluate: dict[str, Any] = field(default_factory=dict)
    validate: dict[str, Any] | None = None
    evaluate_chosen_only: bool = False  # evaluate only each post defense's chosen variant (needs validate)
    export_models: bool = False  # hard-link the final models into RUN_DIR/models/<row>
    # The attack's seeds: the attack and everything after it runs at each (results per seed in
    # RUN_DIR/cells/), and report.md gives the mean and 95% t interval over seeds (`antidote compare`).
    seeds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.judges, str):
            self.judges = [self.judges]
        if self.realign is not None:
            if "antidote" in (self.defenses or {}):
                raise AntidoteError("give Antidote's options once: under defenses: antidote:, not realign:")
            self.defenses = {"antidote": self.realign, **(self.defenses or {})}
            self.realign = None


def load_run_config(path: str, **overrides: Any) -> RunConfig:
    """Read and check a run config: unknown keys anywhere are named, bad values fail before any work."""
    data = read_yaml_mapping(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = config_from_mapping(RunConfig, data, f"config file {path}")
    check(config, path)
    return config


def packaged_config(name: str) -> Path:
    """A config shipped inside the package (`demo`, `demo-quick`)."""
    path = PACKAGED_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
        raise AntidoteError(f"no packaged config {name!r}; known: {known}")
    return path


def check(config: RunConfig, path: str = "the config") -> None:
    """Build every stage's and defense's config once with placeholder paths, so bad values fail now."""
    if not 0 <= config.max_fa_drop <= 100:
        raise AntidoteError(f"{path}: max_fa_drop must be a number of FA points in [0, 100]")
    if not config.judges:
        raise AntidoteError(f"{path}: judges is empty; use e.g. [keyword]")
    _available_judges(config.judges)  # none left (only an uninstalled default) fails before any work
    for spec in config.judges:
        kind, judge_path = parse_judge_spec(spec)
        if kind == "learned" and judge_path:  # a named judge folder must be one; the default may be absent
            from antidote.evaluation.learned import read_judge_record

            read_judge_record(judge_path)
    for name in SECTIONS:
        if getattr(config, name) is not None:
            _stage_config(config, name, path, model="<model>", output="<output>")
    for name in config.defenses:
        defense = get(name)
        fixed = _placeholders(defense)
        fixed.pop("data_dir", None)  # the run's own data folder: a preflight reads the defense's data
        defense_config = _defense_config(config, defense, fixed, path)
        if defense.preflight is not None:
            try:
                defense.preflight(defense_config)
            except AntidoteError as err:
                raise AntidoteError(f"{path}: defenses: {name}: {err}") from None
    if config.evaluate_chosen_only and config.validate is None:
        raise AntidoteError(f"{path}: evaluate_chosen_only needs a validate section to choose on")
    if len(set(config.seeds)) != len(config.seeds):
        raise AntidoteError(f"{path}: seeds repeats a value: {config.seeds}")
    if config.seeds and config.export_models:
        raise AntidoteError(f"{path}: export_models exports one run's models; drop it or give one seed")


def _values(cls: type, section: Any, where: str, reserved: set[str] | tuple[str, ...]) -> dict[str, Any]:
    """A section's checked values (the one config reader), the fields the pipeline sets refused."""
    return values_from_mapping(cls, section or {}, where, exclude=reserved)


def _stage_config(config: RunConfig, name: str, path: str = "the config", **fixed: Any) -> Any:
    cls, reserved = SECTIONS[name]
    return _build(cls, _values(cls, getattr(config, name), f"{path}: {name}", reserved), config, fixed)


def _build(cls: type, values: dict[str, Any], config: RunConfig, fixed: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if "template" in names:
        values.setdefault("template", config.template)
    fixed = {"data_dir": config.data_dir, **fixed}  # every stage reads named data from the run's folder
    return cls(**{**values, **{k: v for k, v in fixed.items() if k in names}})


def _placeholders(defense: Defense) -> dict[str, Any]:
    return {name: f"<{name}>" for name in RESERVED[defense.stage] if name != "overwrite"}


def _defense_config(
    config: RunConfig, defense: Defense, fixed: dict[str, Any], path: str = "the config"
) -> Any:
    """A defense's config: for align/finetune defenses the stage's section under the defense's own keys."""
    reserved = RESERVED[defense.stage]
    where = f"{path}: defenses: {defense.name}"
    values = _values(defense.config, config.defenses[defense.name], where, reserved)
    if defense.stage in STAGE_BASE:
        base = _values(defense.config, getattr(config, defense.stage), f"{path}: {defense.stage}", reserved)
        values = {**base, **values}
    return _build(defense.config, values, config, fixed)


# ---- the pipeline --------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"antidote run: {message}", file=sys.stderr, flush=True)


def prepare_run_dir(run_dir: Path, create: bool = True) -> None:
    """Create the run folder, or accept an existing one that an earlier run made (it resumes there). A
    non-empty folder antidote did not make is refused: a run writes stages/ and results files into it."""
    reason = protected_reason(run_dir)
    if reason is not None:
        raise AntidoteError(f"run_dir {run_dir} {reason}; choose a new folder for the run")
    if run_dir.exists() and not run_dir.is_dir():
        raise AntidoteError(f"run_dir {run_dir} exists and is a file; choose a folder path")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RUN_MARKER).is_file():
        raise AntidoteError(
            f"run_dir {run_dir} exists, is not empty and was not made by antidote run; choose a new folder"
        )
    if not run_dir.parent.is_dir():
        raise AntidoteError(f"the parent folder of run_dir {run_dir} does not exist; create it first")
    if not create:
        return
    run_dir.mkdir(exist_ok=True)
    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"made_by": "antidote run"}) + "\n")


RUN_OUTPUTS = (
    "stages",
    "models",
    "results.json",
    "results.md",
    "summary.json",
    "generations.jsonl",
    "tradeoff.png",
)


def clear_run_dir(run_dir: Path, outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Remove what an earlier `antidote run` (or `antidote compare`: its `outputs`) wrote into `run_dir`, and
    nothing else: all is redone. A folder antidote did not make is left alone (`prepare_run_dir` then
    refuses it if it is not empty)."""
    if not (run_dir / RUN_MARKER).is_file():
        return
    with locked(run_dir):
        for name in outputs:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def run_pipeline(config: RunConfig, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run (or resume) every stage; write results.json, results.md, summary.json, generations.jsonl and
    tradeoff.png into the run folder, and return the summary."""
    check(config)
    if config.seeds:
        raise AntidoteError(
            "a run over several seeds is a compare over the attack's seed: call "
            "antidote.experiments.compare.run_seeds(config) (antidote run does)"
        )
    run_dir = Path(config.run_dir).expanduser().resolve()
    prepare_run_dir(run_dir)
    with locked(run_dir):
        return _Run(config, run_dir, say).run()


@dataclass
class _Model:
    """One row of the results: a model (and adapter) to evaluate, and the key of what made it."""

    name: str
    model: str
    adapter: str | None
    made_by: str
    defense: str | None = None
    variant: str = ""


class _Run:
    """One run's stages and results in `run_dir`. `cache`: the stage cache to use (default: RUN_DIR/stages);
    `antidote compare` passes one shared by all its cells."""

    def __init__(
        self, config: RunConfig, run_dir: Path, say: Callable[[str], None], cache: StageCache | None = None
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.say = say
        self.cache = cache if cache is not None else StageCache(run_dir, say)
        # The data folder every stage reads names from: the config's, else $ANTIDOTE_DATA_DIR (resolved
        # once here, so that the stage keys name the folder actually read).
        folder = resolve_data_dir(config.data_dir)
        self.data_dir = str(folder.resolve()) if folder is not None else None
        self.judge_specs, self.judges_missing = _available_judges(config.judges)
        for spec, why in self.judges_missing.items():
            say(f"judge {spec} left out: {why}")
        self.judges = _Judges(self.judge_specs)
        self.flags: dict[tuple[str, str, str], list[bool]] = {}  # (section, row, judge) -> harmful per prompt
        self.defenses = [get(name) for name in config.defenses]

    def stage(
        self, name: str, settings: Any, upstream: Any, build: Callable[[Path], Any]
    ) -> tuple[Path, str]:
        spec = {"upstream": upstream, "data_dir": self.data_dir, "config": _settings(settings)}
        return self.cache.run(name, spec, build)

    def run(self) -> dict[str, Any]:
        from antidote.training.stages import run_align, run_finetune

        start = time.perf_counter()
        config = self.config
        models: list[_Model] = []
        if config.evaluate_base:
            models.append(_Model("base", config.model, None, stage_key({"model": config.model})))

        align_cfg = _stage_config(config, "align", model=config.model, output="")
        aligned, align_key = self.stage(
            "align", align_cfg, None, lambda out: run_align(replace(align_cfg, output=str(out)))
        )
        ft_cfg = _stage_config(config, "finetune", model=str(aligned), output="")
        attack, ft_key = self.stage(
            "finetune", ft_cfg, align_key, lambda out: run_finetune(replace(ft_cfg, output=str(out)))
        )
        models += [
            _Model("aligned", str(aligned), None, align_key),
            _Model("attacked", str(aligned), str(attack), ft_key),
        ]
        post: dict[str, list[_Model]] = {}
        for defense in self.defenses:
            if defense.stage == "align":
                models.append(self.align_defense(defense, ft_cfg))
            elif defense.stage == "finetune":
                models.append(self.finetune_defense(defense, aligned, align_key))
            else:
                post[defense.name] = self.post_defense(defense, aligned, attack, ft_key)

        summary: dict[str, Any] = {"operating_points": {}}
        chosen: dict[str, str] = {}
        if config.validate is not None:
            chosen = self.choose(models, post, summary)
        for name, variants in post.items():
            models += [m for m in variants if not config.evaluate_chosen_only or m.variant == chosen[name]]
        rows = [row for m in models for row in self.evaluate("evaluate", m)]
        for row in rows:
            row["recovered"] = self.recovered(row)
        for name, op in summary["operating_points"].items():
            by = {r["model"]: r for r in rows if r["judge_spec"] == op["judge"]}
            defended = by[f"{name}@{op['variant']}" if op["variant"] else name]
            op["recovered_share_of_hs_rise"] = recovered_share(
                by["aligned"]["hs"], by["attacked"]["hs"], defended["hs"]
            )
            op["recovered_by_judge"] = {
                r["judge_spec"]: r["recovered"] for r in rows if r["model"] == defended["model"]
            }
        if config.export_models:
            self.export_models(models, chosen)
        summary.update(
            {
                "rows": rows,
                "post_variants": {name: [m.variant for m in ms] for name, ms in post.items()},
                "judges": self.judge_specs,
                "judges_missing": self.judges_missing,
                "stages": {"reused": self.cache.cached, "built": self.cache.built},
                "run_dir": str(self.run_dir),
                "config": asdict(config),
                "seconds_total": round(time.perf_counter() - start, 1),
            }
        )
        self.write(summary, models)
        return summary

    def align_defense(self, defense: Defense, ft_cfg: Any) -> _Model:
        """The defense's aligned model, then the same attack on it."""
        from antidote.training.stages import run_finetune

        cfg = _defense_config(self.config, defense, {"model": self.config.model, "output": ""})
        aligned, key = self.stage(
            f"align-{defense.name}", cfg, None, lambda out: defense.run(replace(cfg, output=str(out)))
        )
        attack_cfg = replace(ft_cfg, model=str(aligned))
        attack, attack_key = self.stage(
            f"finetune-after-{defense.name}",
            attack_cfg,
            key,
            lambda out: run_finetune(replace(attack_cfg, output=str(out))),
        )
        return _Model(defense.name, str(aligned), str(attack), attack_key, defense.name)

    def finetune_defense(self, defense: Defense, aligned: Path, align_key: str) -> _Model:
        cfg = _defense_config(self.config, defense, {"model": str(aligned), "output": ""})
        attack, key = self.stage(
            f"finetune-{defense.name}", cfg, align_key, lambda out: defense.run(replace(cfg, output=str(out)))
        )
        return _Model(defense.name, str(aligned), str(attack), key, defense.name)

    def post_defense(self, defense: Defense, aligned: Path, attack: Path, ft_key: str) -> list[_Model]:
        fixed = {"model": str(aligned), "adapter": str(attack), "base_model": self.config.model, "output": ""}
        cfg = _defense_config(self.config, defense, fixed)
        folder, key = self.stage(
            defense.name,
            cfg,
            ft_key,
            lambda out: _record_variants(out, defense.run(replace(cfg, output=str(out)))),
        )
        variants = json.loads((folder / "variants.json").read_text())
        out = []
        for label, rel in variants.items():
            path = folder / rel
            is_adapter = (path / "adapter_config.json").is_file()
            out.append(
                _Model(
                    f"{defense.name}@{label}" if label else defense.name,
                    str(aligned) if is_adapter else str(path),
                    str(path) if is_adapter else None,
                    f"{key}/{label}",
                    defense.name,
                    label,
                )
            )
        return out

    def choose(
        self, models: list[_Model], post: dict[str, list[_Model]], summary: dict[str, Any]
    ) -> dict[str, str]:
        """Each post defense's variant with the lowest validation HS within the FA budget (first judge)."""
        first = self.judge_specs[0]
        attacked = next(m for m in models if m.name == "attacked")
        val_attacked = self.validation_row(attacked, first)
        chosen = {}
        for name, variants in post.items():
            sweep = [{"variant": m.variant, **_numbers(self.validation_row(m, first))} for m in variants]
            best, why = choose_operating_point(sweep, val_attacked["fa"], self.config.max_fa_drop)
            chosen[name] = best["variant"]
            summary["operating_points"][name] = {
                "variant": best["variant"],
                "why": why,
                "judge": first,
                "sweep_validation": [{"variant": "attacked", **_numbers(val_attacked)}, *sweep],
            }
        return chosen

    def validation_row(self, model: _Model, judge: str) -> dict[str, Any]:
        return next(r for r in self.evaluate("validate", model) if r["judge_spec"] == judge)

    def evaluate(self, section: str, m: _Model) -> list[dict[str, Any]]:
        """One row per judge. Generation is its own stage (scored by the keyword judge as it goes); each
        other judge is a stage of its own over the saved generations: adding a judge regenerates nothing."""
        ev_cfg = _stage_config(self.config, section, model=m.model, adapter=m.adapter, output="")
        folder, key = self.stage(
            f"{section}-{m.name}", ev_cfg, {"made_by": m.made_by}, lambda out: _generate_stage(out, ev_cfg)
        )
        generated = json.loads((folder / "results.json").read_text())
        for private in ("config", "antidote"):
            generated.pop(private, None)
        from antidote.evaluation.model_judges import verdict_row

        records = [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]
        rows = []
        for spec in self.judge_specs:
            row = {**generated, "judge_spec": spec, "judge_stage": folder.name}
            verdicts = [g["verdict"] for g in records if g["set"] == "harmful"]
            if spec != "keyword":
                judge_folder, _ = self.stage(
                    f"judge-{parse_judge_spec(spec)[0]}-{section}-{m.name}",
                    {"judge": spec, "judge_path": _judge_path(spec)},
                    key,
                    functools.partial(_judge_stage, generated=folder, spec=spec, judges=self.judges),
                )
                verdicts = json.loads((judge_folder / "verdicts.json").read_text())
                judge = json.loads((judge_folder / "judged.json").read_text())["judge"]
                row = {**generated, **verdict_row(verdicts, judge)}
                row["judge_spec"], row["judge_stage"] = spec, judge_folder.name
            self.flags[(section, m.name, spec)] = [v in HARMFUL_VERDICTS for v in verdicts]
            rows.append(row)
        seconds = self.cache.seconds.get(folder.name)
        return [
            {**r, "model": m.name, "model_path": r["model"], "seconds": seconds, "stage": folder.name}
            for r in rows
        ]

    def recovered(self, row: dict[str, Any]) -> list[float] | None:
        """[share, low, high]: the share of the HS rise (aligned -> attacked) that this row's model gave back,
        with its paired bootstrap interval over the evaluation prompts (same judge); None for the rows
        base/aligned/attacked, or when the attack raised nothing."""
        spec = row["judge_spec"]
        if row["model"] in ("base", "aligned", "attacked"):
            return None
        attacked, defended, aligned = (
            self.flags.get(("evaluate", name, spec)) for name in ("attacked", row["model"], "aligned")
        )
        if attacked is None or defended is None or aligned is None:
            return None
        share, low, high = recovered_share_interval(attacked, defended, aligned)
        return None if math.isnan(share) else [round(share, 3), round(low, 3), round(high, 3)]

    def export_models(self, models: list[_Model], chosen: dict[str, str]) -> None:
        """RUN_DIR/models/<row>: hard links to the stage folders' files (no copy of the weights)."""
        from antidote.models.loading import resolve_model_folder

        root = self.run_dir / "models"
        tmp = self.run_dir / ".models.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for m in models:
            if m.defense in chosen and m.variant != chosen[m.defense]:
                continue
            source = Path(m.adapter) if m.adapter else Path(resolve_model_folder(m.model))
            name = m.defense if m.defense in chosen else m.name
            _link_tree(source, tmp / name)
            prompt = tmp / name / "antidote_prompt.json"
            if not prompt.exists():  # the base model: evaluate it in the run's prompt format
                prompt.write_text(json.dumps({"template": self.config.template}) + "\n")
        shutil.rmtree(root, ignore_errors=True)  # only ever written by this function
        tmp.rename(root)

    def write(self, summary: dict[str, Any], models: list[_Model]) -> None:
        rows = summary["rows"]
        atomic_write_text(self.run_dir / "results.json", json.dumps(rows, indent=2) + "\n")
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        atomic_write_text(self.run_dir / "results.md", markdown(summary))
        generations = []
        for row in rows:
            if row["judge_spec"] != self.judge_specs[0]:
                continue
            stage = self.cache.root / row["stage"] / "generations.jsonl"
            for line in stage.read_text().splitlines():
                generations.append(json.dumps({"model": row["model"], **json.loads(line)}))
        atomic_write_text(self.run_dir / "generations.jsonl", "".join(g + "\n" for g in generations))
        plot(summary, self.run_dir / "tradeoff.png")


def _record_variants(out: Path, variants: dict[str, Path]) -> None:
    """Write `variants.json` (label -> folder relative to the stage folder) into a post defense's output."""
    out.mkdir(exist_ok=True)
    rel = {label: str(Path(path).resolve().relative_to(out.resolve())) for label, path in variants.items()}
    (out / "variants.json").write_text(json.dumps(rel, indent=2) + "\n")


def _link_tree(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, ignore=shutil.ignore_patterns(".*"))


def _settings(stage_config: Any) -> Any:
    if stage_config is None or isinstance(stage_config, dict):
        return stage_config
    out = asdict(stage_config)
    for name in ("output", "overwrite", "also_judges"):  # judges other than keyword are their own stages
        out.pop(name, None)
    for f in fields(stage_config):  # options added later: at their default, a stage's key stays as it was
        if f.metadata.get("key_when_set") and out.get(f.name) == f.default:
            out.pop(f.name, None)
    return out


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("hs", "fa", "degenerate", "over_refusal")}


def _judge_path(spec: str) -> str | None:
    """The folder a model judge reads (the default learned judge's for a bare `learned`)."""
    kind, path = parse_judge_spec(spec)
    if kind == "learned":
        from antidote.evaluation.learned import judge_folder

        return str(judge_folder(path))
    return path


def _available_judges(specs: list[str]) -> tuple[list[str], dict[str, str]]:
    """The judges a run scores with (`available_judges`); no judge at all is an error."""
    from antidote.evaluation.model_judges import available_judges

    available, missing = available_judges(specs)
    if not available:
        raise AntidoteError(f"no judge left to score with: {'; '.join(missing.values())}")
    return available, missing


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


def _generate_stage(out: Path, config: EvaluateConfig) -> None:
    """Generate into `out` (results.json, generations.jsonl), scored by the keyword judge as it goes."""
    from antidote.evaluation.judges import KeywordJudge
    from antidote.evaluation.run import run_evaluate

    out.mkdir()
    run_evaluate(replace(config, output=str(out / "results.json"), also_judges=[]), judge=KeywordJudge())


def _judge_stage(out: Path, generated: Path, spec: str, judges: _Judges) -> None:
    """Score an evaluation stage's saved harmful-prompt generations with one more judge."""
    from antidote.evaluation.model_judges import verdict_row

    records = [json.loads(line) for line in (generated / "generations.jsonl").read_text().splitlines()]
    harmful = [g for g in records if g["set"] == "harmful"]
    judge = judges[spec]
    verdicts = judge.verdicts([g["prompt"] for g in harmful], [g["response"] for g in harmful])
    out.mkdir()
    (out / "verdicts.json").write_text(json.dumps(verdicts) + "\n")
    (out / "judged.json").write_text(json.dumps(verdict_row(verdicts, judge.name), indent=2) + "\n")
