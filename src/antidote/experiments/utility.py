"""General utility in `antidote compare` (`general_utility:`): lm-evaluation-harness tasks on every evaluated
model, one cached stage per model (kind `utility`), and the headline metric a table shows per task."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError
from antidote.experiments.cache import StageCache
from antidote.outputs import json_text


@dataclass
class UtilityConfig:
    """The `general_utility:` section: lm-evaluation-harness tasks run on every evaluated model."""

    tasks: list[str] = field(default_factory=list, metadata={"help": "lm-eval task names, e.g. [arc_easy]"})
    limit: int | None = field(default=None, metadata={"help": "at most this many items per task"})
    num_fewshot: int | None = field(
        default=None, metadata={"help": "few-shot examples (default: the task's)"}
    )
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})
    include_path: str | None = field(
        default=None,
        metadata={"help": "a folder of lm-eval task YAMLs (e.g. over local data files: works offline)"},
    )

    def __post_init__(self) -> None:
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise AntidoteError(
                f"general_utility: include_path {self.include_path} is not a folder of lm-eval task YAMLs"
            )
        if not self.tasks:
            raise AntidoteError("general_utility: tasks is empty; give lm-eval task names, e.g. [arc_easy]")
        if self.limit is not None and self.limit < 1:
            raise AntidoteError(f"general_utility: limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise AntidoteError(f"general_utility: batch_size must be at least 1, got {self.batch_size}")


def general_utility(
    summary: dict[str, Any], cache: StageCache, config: UtilityConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """Row model name -> lm-eval task -> metric -> value, one cached stage per evaluated model."""
    out = {}
    for r in summary["rows"]:
        if r["model"] in out:
            continue
        model, adapter = r["model_path"], r.get("adapter")
        folder, _ = cache.run(
            f"utility-{r['model']}",
            {"model": model, "adapter": adapter, "lm_eval": dataclasses.asdict(config)},
            functools.partial(_utility_stage, model=model, adapter=adapter, config=config),
            {"kind": "utility", "method": "plain", "row": r["model"]},
            outputs=("utility.json",),
        )
        out[r["model"]] = json.loads((folder / "utility.json").read_text())
    return out


def _utility_stage(out: Path, model: str, adapter: str | None, config: UtilityConfig) -> None:
    """lm-evaluation-harness (`simple_evaluate`, the hf backend) on the model, with the adapter if any."""
    import lm_eval

    from antidote.models.loading import resolve_model_folder

    args = f"pretrained={resolve_model_folder(model)}" + (f",peft={adapter}" if adapter else "")
    extra: dict[str, Any] = {}
    if config.include_path:  # the user's own task YAMLs beside lm-eval's
        from lm_eval.tasks import TaskManager

        extra["task_manager"] = TaskManager(include_path=str(Path(config.include_path).expanduser()))
    import torch

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        device="cuda" if torch.cuda.is_available() else "cpu",  # lm-eval's hf model defaults to cuda
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        batch_size=config.batch_size,
        **extra,
    )
    scores = {
        task: {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for task, metrics in results["results"].items()
    }
    out.mkdir()
    (out / "utility.json").write_text(json_text(scores, indent=2) + "\n")


UTILITY_METRICS = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The metric a table shows for an lm-eval task: the first of UTILITY_METRICS it has, else its first
    metric that is not a standard error."""
    for name in UTILITY_METRICS:
        if name in metrics:
            return name, metrics[name]
    rest = [(k, v) for k, v in metrics.items() if "stderr" not in k]
    return rest[0] if rest else None


def mean_utility(runs: list[dict[str, dict[str, float]]]) -> dict[str, list[Any]] | None:
    """task -> [headline metric, its mean over the runs (seeds)]; None without lm-eval results."""
    if not runs:
        return None
    out: dict[str, list[Any]] = {}
    for task, metrics in runs[0].items():
        shown = headline(metrics)
        if shown is not None:
            values = [r[task][shown[0]] for r in runs if shown[0] in r.get(task, {})]
            out[task] = [shown[0], round(sum(values) / len(values), 4)]
    return out
