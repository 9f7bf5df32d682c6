"""What a defense is: a name, the stage it acts in, a config dataclass and a `run` that writes HF folders.

Stages, in the order the pipeline runs them (align -> fine-tune -> post):
- `align`: replaces the plain alignment. Its config extends `AlignConfig`; `run(config)` writes the aligned,
  merged model to `config.output`. A config with an `aligned` field (LoX) acts on the plain aligned model:
  the pipeline passes its alignment stage there.
- `finetune`: replaces the plain fine-tuning the user runs (the attack). Its config extends
  `FinetuneConfig`; `run(config)` writes the fine-tuning adapter to `config.output`.
- `post`: acts on the fine-tuned model afterwards. Its config has `model` (the aligned model), `adapter` (the
  fine-tuning adapter) and optionally `base_model` (the model before alignment); `run(config)` writes one or
  more variants (e.g. one per mask ratio) and returns them.

Every `run` returns `{variant label: folder}`; the label is "" when there is one variant. A folder holding
`adapter_config.json` is a PEFT adapter on `model`; any other folder is a full model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError

STAGES = ("align", "finetune", "post")
# Fields a pipeline fills in itself, per stage, when the defense's config has them.
RESERVED = {
    "align": ("model", "aligned", "output", "overwrite", "data_dir"),
    "finetune": ("model", "output", "overwrite", "data_dir"),
    "post": ("model", "adapter", "base_model", "output", "overwrite", "data_dir", "push_to_hub"),
}
# Of those, the ones the pipeline leaves at their defaults (push_to_hub: for `antidote realign`, not a stage).
NOT_FILLED = ("overwrite", "push_to_hub")


@dataclass(frozen=True)
class Defense:
    """One method. `config` is a dataclass whose fields (with `metadata["help"]`) are its options: the
    YAML keys of its section in a run config and the flags of `antidote defend NAME`."""

    name: str
    stage: str
    config: type
    run: Callable[[Any], dict[str, Path]]
    summary: str
    # Checks of the inputs that need the defense's data (e.g. RepNoise's paired data), run by `antidote run`
    # and `antidote compare` before any training; option values are checked by the config itself.
    preflight: Callable[[Any], object] | None = None
    # True where the method reads the model before alignment beside the aligned one (a weight edit between
    # the two): a run or compare without an `align:` section cannot give it that pair.
    needs_base: bool = False
    # A post defense that reads a second fine-tuning of the aligned model (RESTA's harmful-fine-tuned
    # model): given its config and the attack's FinetuneConfig, (the config field that model goes to, that
    # fine-tuning's FinetuneConfig). `antidote run` trains it as a cached stage `<name>-<field>`.
    extra_finetune: Callable[[Any, Any], tuple[str, Any]] | None = None
    # Defaults a run gives the defense's options from the run's own sections (rollback guards the attack's
    # task): given the attack's FinetuneConfig and the validate section's EvaluateConfig (None without
    # one), option -> value; what the defense's own section sets wins.
    from_run: Callable[[Any, Any], dict[str, Any]] | None = None
    # Where this entry is a variant (`entry`): the registered defense it runs under its own name.
    method: str | None = None

    @property
    def method_name(self) -> str:
        """The registered defense whose code this runs (its own name unless it is a variant)."""
        return self.method or self.name

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"defense {self.name}: stage must be one of {STAGES}, got {self.stage!r}")
        if not dataclasses.is_dataclass(self.config):
            raise ValueError(f"defense {self.name}: config must be a dataclass")

    def options(self) -> list[str]:
        """The keys a user may set (the config's fields less those the pipeline fills)."""
        reserved = set(RESERVED[self.stage])
        return [f.name for f in dataclasses.fields(self.config) if f.name not in reserved]


REGISTRY: dict[str, Defense] = {}


def register(defense: Defense) -> Defense:
    if defense.name in REGISTRY:
        raise ValueError(f"defense {defense.name!r} is registered twice")
    REGISTRY[defense.name] = defense
    return defense


def get(name: str) -> Defense:
    if name not in REGISTRY:
        from antidote.plugins import broken_note

        raise AntidoteError(
            f"unknown defense {name!r}; known defenses: {', '.join(sorted(REGISTRY))}{broken_note()}"
        )
    return REGISTRY[name]


VARIANT_KEY = "method"
_VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_PIPELINE_ROWS = ("base", "aligned", "attacked", "sft")


def entry(name: str, options: Any) -> Defense:
    """The defense a run config's `defenses:` entry runs: the registered defense NAME, or, where its
    options hold `method: REGISTERED`, a variant: that defense's code and options under the entry's own
    name, so it gets its own stages, rows and operating point (`antidote-contrast: {method: antidote,
    score: contrast, ...}` beside `antidote:` in one table)."""
    base = options.get(VARIANT_KEY) if isinstance(options, dict) else None
    if base is None:
        return get(name)
    if not isinstance(base, str):
        raise AntidoteError(f"defenses: {name}: method must be a registered defense's name, got {base!r}")
    if base not in REGISTRY:
        raise AntidoteError(
            f"defenses: {name}: method: unknown defense {base!r}; "
            f"known defenses: {', '.join(sorted(REGISTRY))}"
        )
    if name in REGISTRY:
        raise AntidoteError(
            f"defenses: {name}: a variant (method: {base}) needs a name of its own, and {name!r} is a "
            f"registered defense; rename the entry, e.g. {base}-mine"
        )
    if name in _PIPELINE_ROWS or name.startswith(("align-", "finetune-")):
        raise AntidoteError(
            f"defenses: {name}: the pipeline's own rows and stages use that name; rename the entry, "
            f"e.g. {base}-mine"
        )
    if not _VARIANT_NAME.fullmatch(name):
        raise AntidoteError(
            f"defenses: {name!r}: a variant's name is lower-case letters, digits, '.', '_' and '-' "
            "(up to 64, starting with a letter or digit): it names folders"
        )
    return dataclasses.replace(get(base), name=name, method=base)


def entry_options(options: Any) -> Any:
    """An entry's options without the variant's `method:` key (the defense's config never sees it)."""
    if isinstance(options, dict) and VARIANT_KEY in options:
        return {k: v for k, v in options.items() if k != VARIANT_KEY}
    return options
