"""Harm filter (ours, beyond the Antidote paper): keep what the fine-tuning update does to the user's task
inputs, undo what it does to harmful inputs, in closed form, layer by layer.

Antidote zeroes the weights that harmful text flows through most; the task flows through the same weights, so
the task goes with the harm. Here each fine-tuned Linear layer's update dW = W_ft - W_aligned (a LoRA update,
B A times its scale) is replaced by the dW' that solves a least-squares problem on the layer's own inputs:

    dW' = argmin  ||(dW' - dW) X_task||^2 / n_task  +  strength * ||dW' X_harm||^2 / n_harm
                  + ridge_t * ||dW' - dW||^2

X_task: the layer's inputs on the user's task pairs (prompt and answer, every real token), X_harm: on harmful
prompt+answer pairs, both with the fine-tuning adapter off (the aligned model's inputs, as SafeDelta takes
its Hessians); n: their token counts. So on task inputs the layer should still answer as the fine-tuned one
does, and on harmful inputs as the aligned one does. With C = X X^T / n (per-token second moments) and
ridge_t = ridge * trace(C_task) / d_in, the solution is

    dW' = dW M,   M = (C_task + ridge_t I) (C_task + strength C_harm + ridge_t I)^-1

Directions of the input space that task text uses and harmful text does not keep the update; directions
only harmful text uses lose it; shared directions are shrunk by how much more harmful text uses them.
`strength` 0 gives back the attacked model; a large strength takes the update out wherever harmful text
reaches. Since dW = s B A, dW M = s B (A M): the result is a LoRA adapter of the same rank, with A <- A M.

Training-free: one forward pass over the harmful pairs and one over the task pairs, collecting C per
distinct layer input (q, k and v share one), then a d_in x d_in solve per layer. It needs the user's own
fine-tuning data (a fine-tuning service holds it) and the harmful pairs Antidote uses. Memory: two float64
d_in x d_in sums per distinct layer input (about 1.6 GB for SmolLM2-135M; a 7B model needs a layer at a
time, not implemented). Writes one adapter folder per strength and `harm_filter_report.json` (per layer,
the share of the update's action on each kind of input left, ||dW' X||^2 / ||dW X||^2; the weight norm
itself may grow in directions neither kind of text uses much). Measured in docs/harm-filter.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from antidote.data.catalog import data_dir_field
from antidote.defenses.base import Defense, register
from antidote.defenses.weight_edit import (
    WeightEditConfig,
    check_output,
    config_record,
    copy_prompt_file,
    load_finetuned,
    lora_layers,
    write_report,
)
from antidote.errors import AntidoteError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

REPORT_FILE = "harm_filter_report.json"


def filter_for(
    c_task: torch.Tensor, c_harm: torch.Tensor, strength: float, ridge: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """a -> a M with M = (C_task + r I)(C_task + strength C_harm + r I)^-1, r = ridge * trace(C_task) / d,
    in float64: a Cholesky solve with a's rows as right-hand sides (a keep K^-1 = (K^-1 keep a^T)^T, K and
    keep symmetric). K is factored once, for every layer that reads this input (q/k/v, gate/up)."""
    import torch

    c_task, c_harm = c_task.double(), c_harm.double()
    d = c_task.shape[0]
    keep = c_task + ridge * (torch.trace(c_task) / d) * torch.eye(
        d, dtype=torch.float64, device=c_task.device
    )
    chol = torch.linalg.cholesky(keep + strength * c_harm)
    return lambda a: torch.cholesky_solve(keep @ a.double().T, chol).T


def filtered(
    a: torch.Tensor, c_task: torch.Tensor, c_harm: torch.Tensor, strength: float, ridge: float
) -> torch.Tensor:
    """a M for one layer (see filter_for)."""
    return filter_for(c_task, c_harm, strength, ridge)(a)


def second_moments(
    model: Any,
    layers: Mapping[str, Any],
    sequences: list[list[int]],
    *,
    batch_size: int,
    pad_id: int,
    what: str,
) -> dict[str, torch.Tensor]:
    """C = X X^T / (real tokens) per layer, X its inputs over `sequences` (float64)."""
    from antidote.defenses.safedelta import collect_hessians

    widths = {name: layer.in_features for name, layer in layers.items()}
    desc = f"harm-filter: {what} inputs"
    sums = collect_hessians(model, layers, widths, sequences, batch_size=batch_size, pad_id=pad_id, desc=desc)
    tokens = sum(len(s) for s in sequences)
    # collect_hessians gives 2 / N * sum x x^T with N the number of sequences, one tensor per distinct input
    scaled = {id(h): h * (len(sequences) / (2.0 * tokens)) for h in sums.values()}
    return {name: scaled[id(h)] for name, h in sums.items()}


@dataclass
class HarmFilterConfig(WeightEditConfig):
    """Harm filter's options, plus the inputs every weight-editing defense reads."""

    METHOD: ClassVar[str] = "harm-filter"
    NEEDS_BASE: ClassVar[bool] = False

    data: str = field(
        default="",
        metadata={"help": "harmful prompt+answer pairs (file or name, e.g. beavertails:calibrate)"},
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "the user's fine-tuning task (e.g. sst2; a run fills in the attack's), with --task-data"
        },
    )
    task_data: str | None = field(
        default=None,
        metadata={"help": "that task's training items, the user's own fine-tuning data (e.g. sst2:train)"},
    )
    benign_data: str | None = field(
        default=None,
        metadata={"help": "in place of --task/--task-data: benign prompt+answer pairs the model must keep"},
    )
    strengths: tuple[float, ...] = field(
        default=(30.0,),
        metadata={
            "help": "how much undoing the update on harmful inputs counts against keeping it on task inputs "
            "(0: the attacked model); a comma list writes one adapter per value from one pass",
            "flag": "--strength",
        },
    )
    ridge: float = field(
        default=0.01,
        metadata={"help": "pull towards the update as trained, a fraction of the task inputs' mean energy"},
    )
    max_samples: int = field(default=64, metadata={"help": "pairs of each data set used, a seeded subset"})
    template: str = field(
        default="auto",
        metadata={"help": "prompt format: auto (the one saved with the adapter), alpaca, chat, plain"},
    )
    max_length: int = field(default=256, metadata={"help": "tokens kept per pair"})
    batch_size: int = field(
        default=8, metadata={"help": "pairs per forward batch (sums do not depend on it)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the data subsets"})
    data_dir: str | None = data_dir_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        from antidote.data.templates import check_template

        if not self.data:
            raise AntidoteError("harm-filter needs --data: harmful prompt+answer pairs (e.g. beavertails)")
        if (self.task is None) != (self.task_data is None):
            raise AntidoteError("give --task and --task-data together (the task and the user's items of it)")
        if not (self.task_data or self.benign_data):
            raise AntidoteError(
                "harm-filter needs the data to keep: --task and --task-data (the user's fine-tuning "
                "data), or --benign-data PAIRS"
            )
        if self.task_data and self.benign_data:
            raise AntidoteError("give the data to keep once: --task/--task-data or --benign-data, not both")
        if isinstance(self.strengths, (int, float, str)):
            self.strengths = (self.strengths,)
        values = []
        for text in self.strengths:
            for part in str(text).split(","):
                try:
                    value = float(part)
                except ValueError:
                    raise AntidoteError(f"--strength takes numbers, got {part!r}") from None
                if not (math.isfinite(value) and value >= 0):
                    raise AntidoteError(f"--strength must be a number >= 0, got {part}")
                values.append(value)
        if not values or len(set(values)) != len(values):
            raise AntidoteError(f"--strength needs distinct values, got {','.join(map(str, values))}")
        self.strengths = tuple(values)
        if not (math.isfinite(self.ridge) and self.ridge > 0):
            raise AntidoteError(f"--ridge must be a number > 0, got {self.ridge}; 0.01 is the default")
        for name in ("max_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise AntidoteError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.max_length < 2:
            raise AntidoteError(f"--max-length must be at least 2, got {self.max_length}")
        if self.template != "auto":
            check_template(self.template)


def _action_kept(b: torch.Tensor, a: torch.Tensor, new_a: torch.Tensor, c: torch.Tensor) -> float:
    """||B A' X||^2 / ||B A X||^2 = tr(B A' C A'^T B^T) / tr(B A C A^T B^T): how much of what the update
    does to inputs with second moments C is left (1 where the update does nothing to them). Computed as
    sum((B^T B) * (A C A^T)), rank x rank, not through the (out, in) update."""
    gram = b.T @ b
    before = float((gram * (a @ c @ a.T)).sum())
    return float((gram * (new_a @ c @ new_a.T)).sum()) / before if before > 0 else 1.0


def _mean(values: Any) -> float:
    values = list(values)
    return round(sum(values) / max(len(values), 1), 6)


def _keep_from_run(attack: Any, validate: Any) -> dict[str, Any]:
    """In a run, the data to keep is the attack's own task data (the user's fine-tuning data, without the
    harmful pairs): a data task's items, or the prompt/response pairs of a task read as pairs. A built-in
    task without data gives nothing: the run config's section then names --benign-data."""
    from antidote.tasks import get_task, task_names

    if attack.task in task_names():
        needs = get_task(attack.task).needs_data
        return {"task": attack.task, "task_data": attack.task_data} if needs else {}
    return {"benign_data": attack.task_data} if attack.task_data else {}


def _sequences(config: HarmFilterConfig, tokenizer: Any, template: str) -> tuple[list[list[int]], ...]:
    """Token ids of the harmful pairs and of the pairs to keep (the user's task items, as trained)."""
    from antidote.data import load_examples, tokenize_examples
    from antidote.tasks import load_pairs, load_task_items

    def encoded(source: Any, flag: str) -> list[list[int]]:
        rows = load_pairs(source, max_samples=config.max_samples, seed=config.seed, data_dir=config.data_dir)
        if not rows:
            raise AntidoteError(f"{flag} holds no pairs")
        return tokenize_examples(rows, tokenizer, template, config.max_length)

    harm = encoded(config.data, f"--data {config.data}")
    if config.task is not None:
        items = load_task_items(config.task, config.task_data, training=True, data_dir=config.data_dir)
        rows = [{"prompt": p, "input": x, "response": r} for p, x, r in items]
        keep = tokenize_examples(
            load_examples(rows, max_samples=config.max_samples, seed=config.seed),
            tokenizer,
            template,
            config.max_length,
        )
    else:
        keep = encoded(config.benign_data, f"--benign-data {config.benign_data}")
    return harm, keep


def run(config: HarmFilterConfig) -> dict[str, Path]:
    import torch

    from antidote.data.templates import saved_template
    from antidote.outputs import atomic_output_dir

    start = time.perf_counter()
    out = check_output(config)
    template = saved_template(config.adapter, config.model) if config.template == "auto" else config.template
    loaded = load_finetuned(config)
    harm, keep = _sequences(config, loaded.tokenizer, template)
    layers = lora_layers(loaded)
    model, adapter = loaded.model, loaded.adapter_name
    model.eval()
    pad = loaded.tokenizer.pad_token_id or 0
    disabled = getattr(model, "disable_adapter", None)
    with disabled() if callable(disabled) else contextlib.nullcontext():  # the aligned model's inputs
        size = config.batch_size
        c_harm = second_moments(model, layers, harm, batch_size=size, pad_id=pad, what="harmful")
        c_task = second_moments(model, layers, keep, batch_size=size, pad_id=pad, what="task")
    forward = time.perf_counter() - start
    trained = {name: layer.lora_A[adapter].weight.detach().clone() for name, layer in layers.items()}
    folders: dict[str, Path] = {}
    with atomic_output_dir(out, config.overwrite) as tmp:
        for strength in config.strengths:
            kept: dict[str, dict[str, float]] = {}
            solvers: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}
            with torch.no_grad():
                for name, layer in layers.items():
                    a = trained[name]
                    key = (id(c_task[name]), id(c_harm[name]))  # layers reading one input share it
                    if key not in solvers:
                        solvers[key] = filter_for(c_task[name], c_harm[name], strength, config.ridge)
                    new_a = solvers[key](a.to(c_task[name].device)).to(a.device)
                    b = layer.lora_B[adapter].weight.double()
                    kept[name] = {
                        "task": _action_kept(b, a.double(), new_a, c_task[name]),
                        "harm": _action_kept(b, a.double(), new_a, c_harm[name]),
                    }
                    layer.lora_A[adapter].weight.copy_(new_a.to(a.dtype))
            report = {
                "method": "harm-filter",
                "update": "dW' = dW (C_task + r I)(C_task + strength C_harm + r I)^-1, "
                "r = ridge * trace(C_task) / d_in; as LoRA: A <- A M",
                "strength": strength,
                "ridge": config.ridge,
                "action_kept": "||dW' X||^2 / ||dW X||^2 on the task's and the harmful inputs (C, aligned)",
                "task_action_kept": _mean(v["task"] for v in kept.values()),
                "harm_action_kept": _mean(v["harm"] for v in kept.values()),
                "per_layer_action_kept": {n: {k: round(x, 6) for k, x in v.items()} for n, v in kept.items()},
                "harmful_pairs": len(harm),
                "task_pairs": len(keep),
                "tokens": {"harmful": sum(map(len, harm)), "task": sum(map(len, keep))},
                "template": template,
                "seconds": {"forward": round(forward, 1), "total": round(time.perf_counter() - start, 1)},
                "config": config_record(config),
            }
            folder = tmp / f"strength-{strength:g}" if len(config.strengths) > 1 else tmp
            folder.mkdir(exist_ok=True)
            model.save_pretrained(folder)  # type: ignore[operator]
            copy_prompt_file(config, folder)
            write_report(folder, REPORT_FILE, report)
            log.info(
                "harm-filter %g: the update's action kept %.3f on task inputs, %.3f on harmful ones",
                strength,
                report["task_action_kept"],
                report["harm_action_kept"],
            )
            folders[f"{strength:g}"] = out / folder.relative_to(tmp)
    return folders


DEFENSE = register(
    Defense(
        name="harm-filter",
        stage="post",
        config=HarmFilterConfig,
        run=run,
        summary="ours: keep the LoRA update's action on the user's task inputs and undo it on harmful "
        "inputs (closed-form least squares per layer, A <- A M); training-free",
        from_run=_keep_from_run,
    )
)
