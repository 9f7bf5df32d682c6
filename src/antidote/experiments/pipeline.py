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
changed. `antidote demo` is this pipeline on a config shipped in the package (`experiments/configs/`). The
config is read and checked in `runconfig.py`, the run folder kept in `rundir.py`; `Pipeline` is the one walk
over the stages, which `antidote compare` runs per cell and, on a `DryRunCache`, for `--plan`.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from antidote.data.catalog import resolve_data_dir
from antidote.data.templates import PROMPT_FILE
from antidote.defenses import Defense, entry
from antidote.errors import AntidoteError
from antidote.evaluation.judge_install import ensure_default_judge
from antidote.evaluation.judges import HARMFUL_VERDICTS, judge_source, judge_version, parse_judge_spec
from antidote.evaluation.stats import recovered_share_interval
from antidote.experiments import front
from antidote.experiments.cache import StageCache, locked, stage_key
from antidote.experiments.evalstages import JudgeSet, generate_stage, judge_stage
from antidote.experiments.report import choose_operating_point, markdown, plot, recovered_share_of_rise
from antidote.experiments.runconfig import (
    RunConfig,
    check,
    defense_config,
    load_run_config,
    packaged_config,
    scoring_judges,
    stage_config,
)
from antidote.experiments.rundir import clear_run_dir, prepare_run_dir
from antidote.outputs import atomic_write_text, export_folders, json_text

# ---- the pipeline --------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"antidote run: {message}", file=sys.stderr, flush=True)


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
        ensure_default_judge(config.judges, resolve_data_dir(config.data_dir), say)
        return Pipeline(config, run_dir, say).run()


@dataclass
class RowModel:
    """One row of the results: a model (and adapter) to evaluate, the key of what made it, and the stages
    that made it: `own` (stage name -> folder: the defense's own stages; the attack's for `attacked`) and
    `recipe` (the folders from the base model to this one). base and aligned have none of either."""

    name: str
    model: str
    adapter: str | None
    made_by: str
    defense: str | None = None
    variant: str = ""
    own: dict[str, str] = field(default_factory=dict)
    recipe: list[str] = field(default_factory=list)


class Pipeline:
    """One run's stages and results in `run_dir`; `run()` walks them and returns the summary. `cache`: the
    stage cache to use (default: RUN_DIR/stages); `antidote compare` passes one shared by all its cells, and
    `compare --plan` a `DryRunCache`: then nothing is built or written, and a stage not built yet gives a
    stand-in row (a post defense not built yet: one stand-in variant)."""

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
        self.judge_specs, self.judges_missing = scoring_judges(config.judges)
        for spec, why in self.judges_missing.items():
            say(f"judge {spec} left out: {why}")
        self.judges = JudgeSet(self.judge_specs)
        self.flags: dict[tuple[str, str, str], list[bool]] = {}  # (section, row, judge) -> harmful per prompt
        self.defenses = [entry(name, options) for name, options in config.defenses.items()]
        self.margins = front.Margins(config.max_degenerate_rise, config.max_over_refusal_rise)

    def stage(
        self,
        name: str,
        settings: Any,
        upstream: Any,
        build: Callable[[Path], Any],
        about: dict[str, Any],
        outputs: tuple[str, ...] = (),
    ) -> tuple[Path, str]:
        """A cached stage; `about` goes into its record: kind (align, finetune, defense, evaluate, validate,
        judge), defense (None for the plain pipeline), method (the code it runs: "plain" or the defense's),
        and for evaluations the row and variant. `outputs`: the files it must hold (checked on reuse)."""
        spec = {"upstream": upstream, "data_dir": self.data_dir, "config": stage_settings(settings)}
        if about.get("method") not in ("plain", about.get("defense")):  # a variant: its method is in the key
            spec["method"] = about["method"]
        return self.cache.run(name, spec, build, about, outputs)

    def run(self) -> dict[str, Any]:
        from antidote.training.stages import run_align, run_finetune

        start = time.perf_counter()
        config = self.config
        models: list[RowModel] = []
        if config.evaluate_base:
            models.append(RowModel("base", config.model, None, stage_key({"model": config.model})))

        align_cfg = stage_config(config, "align", model=config.model, output="")
        aligned, align_key = self.stage(
            "align",
            align_cfg,
            None,
            lambda out: run_align(replace(align_cfg, output=str(out))),
            {"kind": "align", "defense": None, "method": "plain"},
        )
        ft_cfg = stage_config(config, "finetune", model=str(aligned), output="")
        attack, ft_key = self.stage(
            "finetune",
            ft_cfg,
            align_key,
            lambda out: run_finetune(replace(ft_cfg, output=str(out))),
            {"kind": "finetune", "defense": None, "method": "plain"},
        )
        models += [
            RowModel("aligned", str(aligned), None, align_key),
            RowModel(
                "attacked",
                str(aligned),
                str(attack),
                ft_key,
                own={"finetune": attack.name},
                recipe=[aligned.name, attack.name],
            ),
        ]
        post: dict[str, list[RowModel]] = {}
        for defense in self.defenses:
            if defense.stage == "align":
                models.append(self.align_defense(defense, ft_cfg, aligned, align_key))
            elif defense.stage == "finetune":
                models.append(self.finetune_defense(defense, aligned, align_key))
            else:
                post[defense.name] = self.post_defense(defense, aligned, attack, ft_key, ft_cfg, align_key)

        summary: dict[str, Any] = {"operating_points": {}}
        chosen: dict[str, str] = {}
        if config.validate is not None:
            chosen = self.choose(models, post, summary)
        for name, variants in post.items():
            models += [m for m in variants if not config.evaluate_chosen_only or m.variant == chosen[name]]
        rows = [row for m in models for row in self.evaluate("evaluate", m)]
        for row in rows:
            row["recovered"] = self.recovered(row)
        front.mark(rows, self.margins, group=("judge_spec",), name="model")
        for name, op in summary["operating_points"].items():
            by = {r["model"]: r for r in rows if r["judge_spec"] == op["judge"]}
            defended = by[f"{name}@{op['variant']}" if op["variant"] else name]
            op["recovered_share_of_hs_rise"] = recovered_share_of_rise(
                by["aligned"]["hs"], by["attacked"]["hs"], defended["hs"]
            )
            op["recovered_by_judge"] = {
                r["judge_spec"]: r["recovered"] for r in rows if r["model"] == defended["model"]
            }
        if config.export_models and not self.cache.dry_run:
            self.export_models(models, chosen)
        summary.update(
            {
                "rows": rows,
                "post_variants": {name: [m.variant for m in ms] for name, ms in post.items()},
                "judges": self.judge_specs,
                "judges_missing": self.judges_missing,
                "margins": asdict(self.margins),
                "stages": {"reused": self.cache.cached, "built": self.cache.built},
                "run_dir": str(self.run_dir),
                "config": asdict(config),
                "seconds_total": round(time.perf_counter() - start, 1),
            }
        )
        if not self.cache.dry_run:
            self.write(summary, models)
        return summary

    def align_defense(self, defense: Defense, ft_cfg: Any, plain: Path, plain_key: str) -> RowModel:
        """The defense's aligned model, then the same attack on it. A defense whose config has `aligned`
        (LoX) starts from the plain aligned model `plain` instead of aligning anew."""
        from antidote.training.stages import run_finetune

        fixed = {"model": self.config.model, "aligned": str(plain), "output": ""}
        cfg = defense_config(self.config, defense, fixed)
        upstream = plain_key if hasattr(cfg, "aligned") else None
        aligned, key = self.stage(
            f"align-{defense.name}",
            cfg,
            upstream,
            lambda out: defense.run(replace(cfg, output=str(out))),
            {"kind": "align", "defense": defense.name, "method": defense.method_name},
        )
        attack_cfg = replace(ft_cfg, model=str(aligned))
        attack, attack_key = self.stage(
            f"finetune-after-{defense.name}",
            attack_cfg,
            key,
            lambda out: run_finetune(replace(attack_cfg, output=str(out))),
            {"kind": "finetune", "defense": defense.name, "method": "plain"},
        )
        own = {f"align-{defense.name}": aligned.name, f"finetune-after-{defense.name}": attack.name}
        return RowModel(
            defense.name,
            str(aligned),
            str(attack),
            attack_key,
            defense.name,
            own=own,
            recipe=([plain.name] if upstream else []) + list(own.values()),
        )

    def finetune_defense(self, defense: Defense, aligned: Path, align_key: str) -> RowModel:
        cfg = defense_config(self.config, defense, {"model": str(aligned), "output": ""})
        attack, key = self.stage(
            f"finetune-{defense.name}",
            cfg,
            align_key,
            lambda out: defense.run(replace(cfg, output=str(out))),
            {"kind": "finetune", "defense": defense.name, "method": defense.method_name},
        )
        own = {f"finetune-{defense.name}": attack.name}
        recipe = [aligned.name, attack.name]
        return RowModel(defense.name, str(aligned), str(attack), key, defense.name, own=own, recipe=recipe)

    def post_defense(
        self, defense: Defense, aligned: Path, attack: Path, ft_key: str, ft_cfg: Any, align_key: str
    ) -> list[RowModel]:
        from antidote.training.stages import run_finetune

        fixed = {"model": str(aligned), "adapter": str(attack), "base_model": self.config.model, "output": ""}
        cfg = defense_config(self.config, defense, fixed)
        upstream: Any = ft_key
        own: dict[str, str] = {}
        if defense.extra_finetune is not None:  # e.g. RESTA's unaligned model: a cached stage of its own
            field_name, extra_cfg = defense.extra_finetune(cfg, ft_cfg)
            extra, extra_key = self.stage(
                f"{defense.name}-{field_name}",
                extra_cfg,
                align_key,
                lambda out: run_finetune(replace(extra_cfg, output=str(out))),
                {"kind": "finetune", "defense": defense.name, "method": "plain"},
            )
            cfg, upstream = replace(cfg, **{field_name: str(extra)}), [ft_key, extra_key]
            own[f"{defense.name}-{field_name}"] = extra.name
        folder, key = self.stage(
            defense.name,
            cfg,
            upstream,
            lambda out: _record_variants(out, defense.run(replace(cfg, output=str(out)))),
            {"kind": "defense", "defense": defense.name, "method": defense.method_name},
            outputs=("variants.json",),
        )
        own[defense.name] = folder.name
        recipe = [aligned.name, attack.name, *own.values()]
        if self.cache.pending(folder):  # a dry run: its variants are not known yet
            name = f"{defense.name}@?"
            return [
                RowModel(name, str(aligned), None, f"{ft_key}/{defense.name}", defense.name, "?", own, recipe)
            ]
        variants = json.loads((folder / "variants.json").read_text())
        out = []
        for label, rel in variants.items():
            path = folder / rel
            is_adapter = (path / "adapter_config.json").is_file()
            out.append(
                RowModel(
                    f"{defense.name}@{label}" if label else defense.name,
                    str(aligned) if is_adapter else str(path),
                    str(path) if is_adapter else None,
                    f"{key}/{label}",
                    defense.name,
                    label,
                    own,
                    recipe,
                )
            )
        return out

    def choose(
        self, models: list[RowModel], post: dict[str, list[RowModel]], summary: dict[str, Any]
    ) -> dict[str, str]:
        """Each post defense's variant with the lowest validation HS within the FA budget, not broken against
        the aligned model's validation row (first judge)."""
        first = self.judge_specs[0]
        val_attacked = self.validation_row(next(m for m in models if m.name == "attacked"), first)
        val_aligned = self.validation_row(next(m for m in models if m.name == "aligned"), first)
        chosen = {}
        for name, variants in post.items():
            sweep = [{"variant": m.variant, **_numbers(self.validation_row(m, first))} for m in variants]
            best, why = choose_operating_point(
                sweep, val_attacked["fa"], self.config.max_fa_drop, val_aligned, self.margins
            )
            chosen[name] = best["variant"]
            summary["operating_points"][name] = {
                "variant": best["variant"],
                "why": why,
                "within_budget": best["within_budget"],
                "judge": first,
                "sweep_validation": [
                    {"variant": "aligned", **_numbers(val_aligned)},
                    {"variant": "attacked", **_numbers(val_attacked)},
                    *sweep,
                ],
            }
        return chosen

    def validation_row(self, model: RowModel, judge: str) -> dict[str, Any]:
        return next(r for r in self.evaluate("validate", model) if r["judge_spec"] == judge)

    def evaluate(self, section: str, m: RowModel) -> list[dict[str, Any]]:
        """One row per judge. Generation is its own stage (scored by the keyword judge as it goes); each
        other judge is a stage of its own over the saved generations: adding a judge regenerates nothing."""
        ev_cfg = stage_config(self.config, section, model=m.model, adapter=m.adapter, output="")
        about = {"defense": m.defense, "variant": m.variant, "row": m.name}
        folder, key = self.stage(
            f"{section}-{m.name}",
            ev_cfg,
            {"made_by": m.made_by, "keyword_judge": judge_version("keyword")},  # it scores as it goes
            lambda out: generate_stage(out, ev_cfg),
            {"kind": section, "method": "plain", **about},
            outputs=("results.json", "generations.jsonl"),
        )
        judge_folders = {}
        for spec in self.judge_specs:
            if spec != "keyword":
                judge_folders[spec], _ = self.stage(
                    f"judge-{parse_judge_spec(spec)[0]}-{section}-{m.name}",
                    {"judge": spec, "judge_path": judge_source(spec), "version": judge_version(spec)},
                    key,
                    functools.partial(judge_stage, generated=folder, spec=spec, judges=self.judges),
                    {"kind": "judge", "method": "plain", "judge": spec, "section": section, **about},
                    outputs=("verdicts.json", "judged.json"),
                )
        if any(self.cache.pending(f) for f in [folder, *judge_folders.values()]):  # a dry run
            numbers = {"hs": 0.0, "fa": 0.0, "degenerate": 0.0, "over_refusal": 0.0}
            return [{**numbers, "model": m.name, "judge_spec": j} for j in self.judge_specs]
        generated = json.loads((folder / "results.json").read_text())
        for private in ("config", "antidote"):
            generated.pop(private, None)
        from antidote.evaluation.judges import verdict_row

        records = [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]
        rows = []
        for spec in self.judge_specs:
            row = {**generated, "judge_spec": spec, "judge_stage": folder.name}
            verdicts = [g["verdict"] for g in records if g["set"] == "harmful"]
            if spec in judge_folders:
                judge_folder = judge_folders[spec]
                verdicts = json.loads((judge_folder / "verdicts.json").read_text())
                judge = json.loads((judge_folder / "judged.json").read_text())["judge"]
                row = {**generated, **verdict_row(verdicts, judge)}
                row["judge_spec"], row["judge_stage"] = spec, judge_folder.name
            self.flags[(section, m.name, spec)] = [v in HARMFUL_VERDICTS for v in verdicts]
            rows.append(row)
        seconds = self.cache.seconds.get(folder.name)
        made = {"own_stages": m.own, "recipe_stages": m.recipe}
        return [
            {**r, "model": m.name, "model_path": r["model"], "seconds": seconds, "stage": folder.name, **made}
            for r in rows
        ]

    def recovered(self, row: dict[str, Any]) -> list[float | None] | None:
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
        if math.isnan(share):
            return None  # the attack raised HS by less than MIN_RISE: undefined (results.md says why)
        return [round(share, 3), *(None if math.isnan(v) else round(v, 3) for v in (low, high))]

    def export_models(self, models: list[RowModel], chosen: dict[str, str]) -> None:
        """RUN_DIR/models/<row>: a copy of each final model's folder (`outputs.export_folders`)."""
        from antidote.models.loading import resolve_model_folder

        folders = {}
        for m in models:
            if m.defense in chosen and m.variant != chosen[m.defense]:
                continue
            source = Path(m.adapter) if m.adapter else Path(resolve_model_folder(m.model))
            folders[m.defense if m.defense in chosen else m.name] = source

        def prompt(name: str, folder: Path) -> None:
            if not (folder / PROMPT_FILE).exists():  # the base model: the run's prompt format
                (folder / PROMPT_FILE).write_text(json_text({"template": self.config.template}) + "\n")

        for warning in export_folders(self.run_dir / "models", folders, prompt):
            self.say(warning)

    def write(self, summary: dict[str, Any], models: list[RowModel]) -> None:
        rows = summary["rows"]
        atomic_write_text(self.run_dir / "results.json", json_text(rows, indent=2) + "\n")
        atomic_write_text(self.run_dir / "summary.json", json_text(summary, indent=2, default=str) + "\n")
        atomic_write_text(self.run_dir / "results.md", markdown(summary))
        generations = []
        for row in rows:
            if row["judge_spec"] != self.judge_specs[0]:
                continue
            stage = self.cache.root / row["stage"] / "generations.jsonl"
            for line in stage.read_text().splitlines():
                generations.append(json_text({"model": row["model"], **json.loads(line)}))
        atomic_write_text(self.run_dir / "generations.jsonl", "".join(g + "\n" for g in generations))
        plot(summary, self.run_dir / "tradeoff.png")


def _record_variants(out: Path, variants: dict[str, Path]) -> None:
    """Write `variants.json` (label -> folder relative to the stage folder) into a post defense's output."""
    out.mkdir(exist_ok=True)
    rel = {label: str(Path(path).resolve().relative_to(out.resolve())) for label, path in variants.items()}
    (out / "variants.json").write_text(json_text(rel, indent=2) + "\n")


def stage_settings(stage_config: Any) -> Any:
    """What of a stage's config keys its cached stage: all of it but the output flags, and options added
    later (`key_when_set`) only when set away from their default, so older stages keep their keys."""
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


# The public run API: a config read and checked, then run (`load_run_config` and `packaged_config` live in
# runconfig.py and are named here so that `run_pipeline(load_run_config(path))` needs one import).
__all__ = [
    "Pipeline",
    "RowModel",
    "RunConfig",
    "clear_run_dir",
    "load_run_config",
    "packaged_config",
    "prepare_run_dir",
    "run_pipeline",
]
