"""The run config of `antidote run` (and of each cell of `antidote compare`): `RunConfig`, its reading and its
check, and the one place that builds a stage's or a defense's config from a section (`stage_config`,
`defense_config`) with the fields the pipeline sets itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidote.configfile import config_from_mapping, read_yaml_mapping, values_from_mapping
from antidote.data.catalog import check_data_dir_size, check_local, is_named
from antidote.defenses import RESERVED, Defense, entry, entry_options
from antidote.defenses.base import NOT_FILLED
from antidote.errors import AntidoteError
from antidote.evaluation.judges import available_judges, check_judge
from antidote.evaluation.run import EvaluateConfig
from antidote.models.loading import EMBEDDED_NAME
from antidote.training.stages import AlignConfig, FinetuneConfig

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
# section -> (its dataclass, fields the pipeline sets itself)
SECTIONS: dict[str, tuple[type, set[str]]] = {
    "align": (AlignConfig, set(RESERVED["align"])),
    "finetune": (FinetuneConfig, set(RESERVED["finetune"])),
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
    # A row whose degenerate / over-refusal rate rises more than this many points over the aligned model's
    # is broken: marked in the tables, never on the front, never an operating point (`front.py`).
    max_degenerate_rise: float = 10.0
    max_over_refusal_rise: float = 10.0
    align: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    defenses: dict[str, Any] = field(default_factory=dict)
    realign: dict[str, Any] | None = None  # the older spelling of `defenses: {antidote: ...}`
    evaluate: dict[str, Any] = field(default_factory=dict)
    validate: dict[str, Any] | None = None
    evaluate_chosen_only: bool = False  # evaluate only each post defense's chosen variant (needs validate)
    export_models: bool = False  # copy the final models into RUN_DIR/models/<row>
    # The attack's seeds: the attack and everything after it runs at each (results per seed in
    # RUN_DIR/cells/), and report.md gives the mean over seeds and its 95% bootstrap interval over prompts and
    # seeds (`antidote compare`).
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
    for name in ("max_degenerate_rise", "max_over_refusal_rise"):
        if not 0 <= getattr(config, name) <= 100:
            raise AntidoteError(f"{path}: {name} must be a number of percentage points in [0, 100]")
    if not config.judges:
        raise AntidoteError(f"{path}: judges is empty; use e.g. [keyword]")
    check_data_dir_size(config.data_dir)  # a data folder that is none (/usr, /proc) fails before any work
    scoring_judges(config.judges)  # none left (only an uninstalled default) fails before any work
    for spec in config.judges:
        check_judge(spec)  # a named judge folder must be one; the default may be absent
    for name in SECTIONS:
        if getattr(config, name) is not None:
            built = stage_config(config, name, path, model="<model>", output="<output>")
            check_named_data(built, f"{path}: {name}")
    for name, entry_section in config.defenses.items():
        try:
            defense = entry(name, entry_section)
        except AntidoteError as err:
            raise AntidoteError(f"{path}: {err}") from None
        fixed = placeholders(defense)
        fixed.pop("data_dir", None)  # the run's own data folder: a preflight reads the defense's data
        options = defense_config(config, defense, fixed, path)
        check_named_data(options, f"{path}: defenses: {name}")
        if defense.preflight is not None:
            try:
                defense.preflight(options)
            except AntidoteError as err:
                raise AntidoteError(f"{path}: defenses: {name}: {err}") from None
    if config.validate is not None:
        from antidote.evaluation.run import check_validation_data

        fill = {"model": "<model>", "output": "<output>"}
        check_validation_data(
            stage_config(config, "validate", path, **fill),
            stage_config(config, "evaluate", path, **fill),
            path,
        )
    if config.evaluate_chosen_only and config.validate is None:
        raise AntidoteError(f"{path}: evaluate_chosen_only needs a validate section to choose on")
    if len(set(config.seeds)) != len(config.seeds):
        raise AntidoteError(f"{path}: seeds repeats a value: {config.seeds}")
    if config.seeds and config.export_models:
        raise AntidoteError(f"{path}: export_models exports one run's models; drop it or give one seed")


def is_data_field(name: str) -> bool:
    """The options that name data sets (`data`, `task_data`, `harmful_prompts`, `candidates`, ...), not the
    ones whose values may only look like a set's name (`template: alpaca`)."""
    return name in ("data", "harmful", "candidates", "validation") or name.endswith(("_data", "_prompts"))


def check_named_data(stage: Any, where: str) -> None:
    """Every named data set a stage's config names, reachable from the data folder that stage is given:
    a bad split, or a set with no hub copy (refusals, catqa, ...) missing there, fails the check, not the
    stage hours in."""
    for f in (f for f in dataclasses.fields(stage) if is_data_field(f.name)):
        value = getattr(stage, f.name)
        for source in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(source, str) and is_named(source):
                try:
                    check_local(source, getattr(stage, "data_dir", None))
                except AntidoteError as err:
                    raise AntidoteError(f"{where}: {f.name}: {err}") from None


def section_values(
    cls: type, section: Any, where: str, reserved: set[str] | tuple[str, ...]
) -> dict[str, Any]:
    """A section's checked values (the one config reader), the fields the pipeline sets refused."""
    return values_from_mapping(cls, section or {}, where, exclude=reserved)


def stage_config(config: RunConfig, name: str, path: str = "the config", **fixed: Any) -> Any:
    cls, reserved = SECTIONS[name]
    return build_config(
        cls, section_values(cls, getattr(config, name), f"{path}: {name}", reserved), config, fixed
    )


def build_config(cls: type, values: dict[str, Any], config: RunConfig, fixed: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if "template" in names:
        values.setdefault("template", config.template)
    fixed = {"data_dir": config.data_dir, **fixed}  # every stage reads named data from the run's folder
    return cls(**{**values, **{k: v for k, v in fixed.items() if k in names}})


def placeholders(defense: Defense) -> dict[str, Any]:
    return {name: f"<{name}>" for name in RESERVED[defense.stage] if name not in NOT_FILLED}


def defense_config(
    config: RunConfig, defense: Defense, fixed: dict[str, Any], path: str = "the config"
) -> Any:
    """A defense's config: for align/finetune defenses the stage's section under the defense's own keys."""
    reserved = RESERVED[defense.stage]
    where = f"{path}: defenses: {defense.name}"
    values = section_values(defense.config, entry_options(config.defenses[defense.name]), where, reserved)
    if defense.from_run is not None:
        fill = {"model": "<model>", "output": "<output>"}
        attack = stage_config(config, "finetune", path, **fill)
        validate = stage_config(config, "validate", path, **fill) if config.validate is not None else None
        values = {**defense.from_run(attack, validate), **values}
    if defense.stage in STAGE_BASE:
        base = section_values(
            defense.config, getattr(config, defense.stage), f"{path}: {defense.stage}", reserved
        )
        values = {**base, **values}
    return build_config(defense.config, values, config, fixed)


def scoring_judges(specs: list[str]) -> tuple[list[str], dict[str, str]]:
    """The judges a run scores with (`available_judges`); no judge at all is an error."""
    available, missing = available_judges(specs)
    if not available:
        raise AntidoteError(f"no judge left to score with: {'; '.join(missing.values())}")
    return available, missing
