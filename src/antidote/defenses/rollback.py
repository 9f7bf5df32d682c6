"""Gradient-guided rollback (Yang et al., S&P 2025; the authors' code kangyangWHU/LLMAlignment,
sgdg_rollback_final.py): reset to their aligned values, step by step, the fine-tuned weights whose change
most pulls the model's hidden state on harmful prompts away from the aligned model's.

With L the chosen layer (`layer`: the output of decoder block L-1, hidden_states[L] in transformers' count)
and h(x) the hidden state at the last prompt token (prompts left-padded):
    d_harm = mean over the harmful prompts of h_aligned(x)               (the aligned model, no gradient)
    g      = sum over batches of grad of -cos(mean over the batch of h_current(x), d_harm)
(gradients accumulate over the steps, as in the authors' code, unless a rollback phase runs). Only the
weights of blocks 0..L-1 are edited, layer norms excluded. One step:
    candidates = entries where sign(W - W_aligned) == sign(g), both non-zero
    t          = the k-th largest |g| among the candidates, k = ceil(rate * n), n = the parameter count of
                 every decoder block (the authors' `get_total_param`)
    reset      = candidates with |g| > t   ->  W[reset] = W_aligned[reset]
After `warmup_steps` steps the task accuracy on validation items is measured; if it fell below
(1 - metric_drop) x the fine-tuned model's, the run restarts from the fine-tuned model in rollback mode:
after each step's reset, with fresh gradients g_b of -cos(mean h_current, d_benign) on benign task prompts
(d_benign: the fine-tuned model's mean state there), the top `rollback_rate` (by |g_b|) of the entries just
reset whose sign(W - W_ft) == sign(g_b) go back to their fine-tuned values. A checkpoint is taken every
`save_every` steps (and after the warm-up); the model written is the last checkpoint before the first one
whose task accuracy is <= the limit (all pass: the last; the first fails: the fine-tuned model unchanged),
the authors' `eval_all_steps` + `get_largest_step`. A fine-tuned model that scores 0 on the task has no
accuracy to lose: then every checkpoint passes.

Writes a full model (the adapter merged) and `rollback_report.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from antidote.data.catalog import data_dir_field
from antidote.defenses.base import Defense, register
from antidote.defenses.weight_edit import (
    WeightEditConfig,
    check_output,
    config_record,
    dense_parameters,
    fold_adapter,
    load_finetuned,
    save_full_model,
    write_report,
)
from antidote.errors import AntidoteError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

REPORT_FILE = "rollback_report.json"
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---- the math ---------------------------------------------------------------------------------------------


def block_index(name: str) -> int | None:
    """The decoder block a parameter belongs to (`model.layers.3.mlp.up_proj.weight` -> 3), else None."""
    found = _BLOCK.search(name)
    return int(found.group(1)) if found else None


def editable_names(names: Iterable[str], layer: int) -> list[str]:
    """The parameters the method may reset: those of blocks 0..layer-1, layer norms excluded (the authors
    skip names containing "layernorm"; embeddings, the final norm and the output layer are never edited)."""
    out = []
    for name in names:
        index = block_index(name)
        if index is not None and index < layer and "layernorm" not in name:
            out.append(name)
    return out


def sign_agreement(
    current: torch.Tensor, anchor: torch.Tensor, grad: torch.Tensor, within: torch.Tensor | None = None
) -> torch.Tensor:
    """bool, the shape of `current`: where W - anchor and the gradient have the same strict sign (a
    gradient-descent step on the entry would move it towards `anchor`), and inside `within` if given."""
    diff = current - anchor
    mask = ((diff > 0) & (grad > 0)) | ((diff < 0) & (grad < 0))
    return mask & within if within is not None else mask


def grad_threshold(grads: Iterable[torch.Tensor], candidates: Iterable[torch.Tensor], k: int) -> float:
    """The k-th largest |g| over the candidate entries of all tensors; -inf when there are at most k
    candidates (then every candidate is taken; the authors' top-k would fail there)."""
    import torch

    values = torch.cat([g[c].abs().flatten().float().cpu() for g, c in zip(grads, candidates, strict=True)])
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if values.numel() <= k:
        return -math.inf
    return float(torch.topk(values, k).values[-1])


def reset_masks(
    current: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    *,
    count: int | None = None,
    fraction: float | None = None,
    within: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Which entries one step sets to `anchor`: sign agreement (inside `within`) and |g| > t, t the k-th
    largest |g| among the candidates, k = `count`, or ceil(fraction x the number of candidates)."""
    candidates = {
        n: sign_agreement(current[n], anchor[n], grads[n], within[n] if within is not None else None)
        for n in current
    }
    if fraction is not None:
        count = math.ceil(sum(int(c.sum()) for c in candidates.values()) * fraction)
    if count is None:
        raise ValueError("give count or fraction")
    if count < 1:  # no candidate at all
        return {n: c & False for n, c in candidates.items()}
    t = grad_threshold((grads[n] for n in current), candidates.values(), count)
    return {n: candidates[n] & (grads[n].abs() > t) for n in current}


# ---- hidden states ----------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the hook on block L-1: the rest of the forward is not needed."""


def last_token_states(
    model: nn.Module, layer: int, ids: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """(B, hidden): the output of decoder block `layer`-1 at the last position of left-padded `ids`, the
    positions counted from each row's first real token (as generation does). Keeps the autograd graph."""

    from antidote.models.layers import decoder_layers

    _, blocks = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = blocks[layer - 1].register_forward_hook(hook)
    positions = (attention.long().cumsum(1) - 1).clamp(min=0)
    try:
        model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise AntidoteError(f"decoder block {layer - 1} never ran; is --layer within the model's depth?")
    return captured[0][:, -1, :]


def left_padded(
    sequences: Sequence[Sequence[int]], pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        attention[row, width - len(seq) :] = 1
    return ids.to(device), attention.to(device)


def batches(sequences: Sequence[Sequence[int]], batch_size: int) -> list[list[Sequence[int]]]:
    """Consecutive batches in the given order (the authors' data loader, shuffle off)."""
    return [list(sequences[i : i + batch_size]) for i in range(0, len(sequences), batch_size)]


def mean_direction(
    model: nn.Module, layer: int, sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> torch.Tensor:
    """The mean last-token state over all `sequences` (no gradient), float32."""
    import torch

    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    states = []
    with torch.no_grad():
        for batch in batches(sequences, batch_size):
            states.append(last_token_states(model, layer, *left_padded(batch, pad_id, device)).float())
    return torch.cat(states).mean(dim=0)


def accumulate_gradient(
    model: nn.Module,
    layer: int,
    sequences: Sequence[Sequence[int]],
    direction: torch.Tensor,
    batch_size: int,
    pad_id: int,
) -> float:
    """Add to the parameters' .grad the gradient of sum over batches of -cos(mean state of the batch,
    direction). Returns the summed loss."""
    import torch

    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    total = 0.0
    for batch in batches(sequences, batch_size):
        states = last_token_states(model, layer, *left_padded(batch, pad_id, device)).float()
        loss = -torch.nn.functional.cosine_similarity(states.mean(dim=0), direction, dim=0)
        loss.backward()
        total += float(loss.detach())
    return total


def mean_cosine(
    model: nn.Module,
    layer: int,
    sequences: Sequence[Sequence[int]],
    direction: torch.Tensor,
    batch_size: int,
    pad_id: int,
) -> float:
    """cos(mean state over all `sequences`, direction): the report's measure of the harmful objective."""
    import torch

    mean = mean_direction(model, layer, sequences, batch_size, pad_id)
    return float(torch.nn.functional.cosine_similarity(mean, direction.to(mean.device), dim=0))


# ---- the defense ------------------------------------------------------------------------------------------


def guard_the_attack_task(attack: Any, validate: Any) -> dict[str, Any]:
    """In a run, the task whose accuracy rollback guards is the attack's (a compare matrix may vary it), on
    the validate section's items of that task when it is a data task, with the attack's task data as the
    benign direction and the task's own answer length (GSM8K's 512 tokens, not 8). Built-in tasks keep
    rollback's own defaults (their validate and attack splits, 8 tokens); an attack on plain pairs (no
    task with an accuracy) leaves rollback's task as configured."""
    from antidote.tasks import get_task, task_names

    if attack.task not in task_names():
        return {}
    values: dict[str, Any] = {"task": attack.task}
    task = get_task(attack.task)
    if task.needs_data:
        values["benign_data"] = attack.task_data
        values["task_new_tokens"] = task.max_new_tokens
        if validate is not None and validate.task == attack.task:
            values["task_data"] = validate.task_data
    return values


@dataclass
class RollbackConfig(WeightEditConfig):
    """Gradient-guided rollback's options (the authors' run_recover_exp.py defaults), plus the inputs every
    weight-editing defense reads."""

    METHOD: ClassVar[str] = "rollback"
    NEEDS_BASE: ClassVar[bool] = False

    data: str = field(
        default="builtin-harmful:calibrate",
        metadata={"help": "harmful prompts (file or name; responses are not read) for the harmful direction"},
    )
    max_samples: int = field(
        default=256, metadata={"help": "harmful prompts used (the authors' 256), seeded"}
    )
    layer: int = field(
        default=0,
        metadata={
            "help": "L: the hidden state is the output of decoder block L-1, and blocks 0..L-1 are edited; "
            "0 = floor(2 x depth / 6), the authors' run_recover_exp.py"
        },
    )
    rate: float = field(
        default=0.002,
        metadata={"help": "entries reset per step, as a fraction of all decoder-block parameters (0.002)"},
    )
    steps: int = field(default=20, metadata={"help": "reset steps in all (the authors' 20)"})
    warmup_steps: int = field(
        default=5, metadata={"help": "steps before the task-accuracy check that may start rollback mode"}
    )
    save_every: int = field(
        default=5, metadata={"help": "a checkpoint (task accuracy measured) every N steps"}
    )
    metric_drop: float = field(
        default=0.05,
        metadata={
            "help": "allowed relative drop of validation task accuracy (0.05: keep at least 0.95 of it)"
        },
    )
    no_rollback: bool = field(
        default=False,
        metadata={
            "help": "never enter rollback mode (the authors' rollback_flag=False); by default a drop of task "
            "accuracy after the warm-up restarts with part of each step undone along a benign direction"
        },
    )
    rollback_rate: float = field(
        default=0.2, metadata={"help": "share of each step's reset entries that rollback mode may undo"}
    )
    task: str = field(
        default="sentiment", metadata={"help": "the fine-tuning task whose accuracy is guarded"}
    )
    task_data: str | None = field(
        default=None,
        metadata={
            "help": "validation task items (file or NAME:SPLIT) for data tasks; built-in: validate split"
        },
    )
    benign_data: str | None = field(
        default=None,
        metadata={
            "help": "task items whose prompts give the benign direction (the user's training data); "
            "default: the built-in task's attack split, else --task-data"
        },
    )
    max_task: int = field(default=64, metadata={"help": "validation task items used for the accuracy"})
    task_new_tokens: int = field(default=8, metadata={"help": "tokens generated per task item"})
    template: str = field(
        default="auto",
        metadata={"help": "prompt format: auto (the one saved with the adapter), alpaca, chat, plain"},
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per gradient batch (the authors' 8)"})
    max_length: int = field(default=512, metadata={"help": "prompt tokens kept (the end is cut)"})
    seed: int = field(default=0, metadata={"help": "seed of the harmful-prompt subset"})
    data_dir: str | None = data_dir_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        from antidote.data.templates import check_template
        from antidote.tasks import get_task

        if not self.data:
            raise AntidoteError("rollback needs --data: harmful prompts for the harmful direction")
        if not (isinstance(self.rate, (int, float)) and 0 < self.rate < 1):
            raise AntidoteError(f"--rate is a fraction in (0, 1), got {self.rate}; the authors use 0.002")
        if not 0 < self.rollback_rate <= 1:
            raise AntidoteError(f"--rollback-rate is a fraction in (0, 1], got {self.rollback_rate}")
        if not 0 <= self.metric_drop < 1:
            raise AntidoteError(f"--metric-drop is a fraction in [0, 1), got {self.metric_drop}; e.g. 0.05")
        for name in ("steps", "save_every", "max_samples", "max_task", "task_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise AntidoteError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not 0 <= self.warmup_steps <= self.steps:
            raise AntidoteError(f"--warmup-steps must be in [0, --steps], got {self.warmup_steps}")
        if self.layer < 0:
            raise AntidoteError(f"--layer must be >= 0 (0: two sixths of the depth), got {self.layer}")
        if self.max_length < 2:
            raise AntidoteError(f"--max-length must be at least 2, got {self.max_length}")
        if get_task(self.task).needs_data and not self.task_data:
            raise AntidoteError(f"--task {self.task} needs --task-data FILE or NAME:SPLIT (validation items)")
        if self.template != "auto":
            check_template(self.template)


def task_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    expected: Sequence[str],
    task: str,
    *,
    template: str,
    new_tokens: int,
    batch_size: int,
) -> float:
    """Percent of `prompts` (formatted) whose greedy answer the task counts correct."""
    from antidote.evaluation.generation import generate
    from antidote.tasks import get_task

    out = generate(
        model,
        tokenizer,
        list(prompts),
        max_new_tokens=new_tokens,
        batch_size=batch_size,
        add_special_tokens=template != "chat",
        desc="rollback task check",
    )
    correct = [get_task(task).correct(o, e) for o, e in zip(out, expected, strict=True)]
    return 100.0 * sum(correct) / max(len(correct), 1)


class _Rollback:
    """The authors' AlignParamRollback on one in-memory model: `params` are its editable weights."""

    def __init__(
        self,
        config: RollbackConfig,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        aligned: dict[str, torch.Tensor],
        finetuned: dict[str, torch.Tensor],
        n_param: int,
        pad_id: int,
    ) -> None:
        self.config = config
        self.model = model
        self.params = params
        self.aligned = aligned
        self.finetuned = finetuned
        self.k = math.ceil(n_param * config.rate)
        self.pad_id = pad_id

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def gradient(
        self, sequences: Sequence[Sequence[int]], direction: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        accumulate_gradient(
            self.model, self.config.layer, sequences, direction, self.config.batch_size, self.pad_id
        )
        import torch

        return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.params.items()}

    def reset(self, anchor: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> int:
        import torch

        with torch.no_grad():
            for n, mask in masks.items():
                self.params[n].data[mask] = anchor[n][mask].to(self.params[n].dtype)
        return sum(int(m.sum()) for m in masks.values())

    def step(
        self, harmful: Sequence[Sequence[int]], d_harm: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], int]:
        """One harmful step: gradients accumulate onto the earlier ones (the authors never clear them
        outside rollback mode)."""
        grads = self.gradient(harmful, d_harm)
        current = {n: p.detach() for n, p in self.params.items()}
        masks = reset_masks(current, self.aligned, grads, count=self.k)
        return masks, self.reset(self.aligned, masks)

    def undo(
        self, benign: Sequence[Sequence[int]], d_benign: torch.Tensor, within: Mapping[str, torch.Tensor]
    ) -> int:
        """Rollback mode's second half: fresh benign gradients; back to W_ft for the top share of `within`."""
        self.zero_grad()
        grads = self.gradient(benign, d_benign)
        current = {n: p.detach() for n, p in self.params.items()}
        masks = reset_masks(current, self.finetuned, grads, fraction=self.config.rollback_rate, within=within)
        undone = self.reset(self.finetuned, masks)
        self.zero_grad()
        return undone

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params.items():
                p.data.copy_(weights[n])

    def at_aligned(self) -> int:
        """Entries that now hold the aligned value and differ from the fine-tuned one."""
        return sum(
            int(((p.detach() == self.aligned[n]) & (self.aligned[n] != self.finetuned[n])).sum())
            for n, p in self.params.items()
        )


def _prompts(tokenizer: Any, template: str, items: Iterable[tuple[str, str]]) -> list[str]:
    from antidote.data.loading import Example
    from antidote.data.templates import format_prompt

    return [format_prompt(Example(p, "", x), template, tokenizer) for p, x in items]


def _encode(tokenizer: Any, prompts: Sequence[str], template: str, max_length: int) -> list[list[int]]:
    encoded = tokenizer(list(prompts), add_special_tokens=template != "chat")["input_ids"]
    return [list(ids)[-max_length:] for ids in encoded]


def run(config: RollbackConfig) -> dict[str, Path]:
    import torch

    from antidote.data.loading import load_examples
    from antidote.data.templates import saved_template
    from antidote.models.layers import decoder_layers
    from antidote.outputs import atomic_output_dir
    from antidote.tasks import load_task_items

    start = time.perf_counter()
    out = check_output(config)
    template = saved_template(config.adapter, config.model) if config.template == "auto" else config.template
    harmful_examples = load_examples(
        config.data,
        max_samples=config.max_samples,
        seed=config.seed,
        require_response=False,
        data_dir=config.data_dir,
    )
    validation = load_task_items(config.task, config.task_data, split="validate", data_dir=config.data_dir)
    validation = validation[: config.max_task]
    benign_items = load_task_items(
        config.task, config.benign_data or config.task_data, split="attack", data_dir=config.data_dir
    )[: config.max_samples]
    loaded = load_finetuned(config)
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    depth = len(decoder_layers(loaded.model.get_base_model())[1])  # type: ignore[operator]
    layer = config.layer or max(1, math.floor(depth * 2 / 6))
    if layer > depth:
        raise AntidoteError(f"--layer {layer} is beyond the model's {depth} decoder blocks; use 1..{depth}")
    config = dataclasses.replace(config, layer=layer)  # the resolved layer, recorded in the report
    harmful = _encode(
        tokenizer,
        _prompts(tokenizer, template, ((e.prompt, e.input) for e in harmful_examples)),
        template,
        config.max_length,
    )
    benign = _encode(
        tokenizer,
        _prompts(tokenizer, template, ((i, x) for i, x, _ in benign_items)),
        template,
        config.max_length,
    )
    val_prompts = _prompts(tokenizer, template, ((i, x) for i, x, _ in validation))
    val_expected = [e for _, _, e in validation]

    model = loaded.model
    model.eval()
    with model.disable_adapter():  # type: ignore[operator]
        d_harm = mean_direction(model, layer, harmful, config.batch_size, pad_id)  # the aligned model
    dense = dense_parameters(loaded)
    n_param = sum(p.numel() for n, p in dense.items() if block_index(n) is not None)
    names = editable_names(dense, layer)
    aligned = {n: dense[n].detach().clone() for n in names}
    plain = fold_adapter(loaded)  # W_ft everywhere
    plain.eval()
    all_params = dict(plain.named_parameters())
    for p in all_params.values():
        p.requires_grad_(False)
    params = {n: all_params[n] for n in names}
    for p in params.values():
        p.requires_grad_(True)
    finetuned = {n: p.detach().clone() for n, p in params.items()}
    work = _Rollback(config, plain, params, aligned, finetuned, n_param, pad_id)

    seconds = {"task_checks": 0.0}

    def accuracy() -> float:
        begin = time.perf_counter()
        score = task_accuracy(
            plain,
            tokenizer,
            val_prompts,
            val_expected,
            config.task,
            template=template,
            new_tokens=config.task_new_tokens,
            batch_size=max(config.batch_size, 16),
        )
        seconds["task_checks"] += time.perf_counter() - begin
        return score

    def fails(score: float) -> bool:
        """The authors' `task_score <= minimum_score`; a fine-tuned model that scores 0 has no accuracy to
        lose, and every checkpoint passes (their rule would fail them all)."""
        return original > 0 and score <= minimum

    cos_before = mean_cosine(plain, layer, harmful, d_harm, config.batch_size, pad_id)
    original = accuracy()
    minimum = original - original * config.metric_drop
    steps: list[dict[str, Any]] = []
    for i in range(config.warmup_steps):
        _, count = work.step(harmful, d_harm)
        steps.append({"step": i + 1, "reset": count})
    warm_score = accuracy() if config.warmup_steps else original
    rollback_mode = not config.no_rollback and config.warmup_steps > 0 and warm_score < minimum
    d_benign = d_harm  # replaced below when rollback mode runs
    checkpoints: list[dict[str, Any]] = []
    best: dict[str, torch.Tensor] | None = None  # the weights of the last checkpoint within the limit
    chosen, failed = 0, False
    if rollback_mode:
        log.info(
            "rollback: task accuracy %.2f < %.2f after warm-up; restarting in rollback mode",
            warm_score,
            minimum,
        )
        work.load(finetuned)
        work.zero_grad()
        first = 0
        with torch.no_grad():  # the fine-tuned model's mean state on the benign task prompts
            d_benign = mean_direction(plain, layer, benign, config.batch_size, pad_id)
    else:
        first = config.warmup_steps
        if config.warmup_steps:
            checkpoints.append(
                {
                    "step": first,
                    "task_accuracy": warm_score,
                    "at_aligned": work.at_aligned(),
                    "harmful_cosine": mean_cosine(plain, layer, harmful, d_harm, config.batch_size, pad_id),
                }
            )
            failed = fails(warm_score)
            if not failed:
                best, chosen = work.snapshot(), first
    for step in range(first, config.steps):
        if failed:
            break  # the choice is made: later checkpoints are never written (the authors' loop goes on)
        masks, count = work.step(harmful, d_harm)
        record: dict[str, Any] = {"step": step + 1, "reset": count, "rollback_mode": rollback_mode}
        if rollback_mode:
            record["undone"] = work.undo(benign, d_benign, masks)
        steps.append(record)
        if (step + 1) % config.save_every == 0:
            score = accuracy()
            checkpoints.append(
                {
                    "step": step + 1,
                    "task_accuracy": score,
                    "at_aligned": work.at_aligned(),
                    "harmful_cosine": mean_cosine(plain, layer, harmful, d_harm, config.batch_size, pad_id),
                }
            )
            if fails(score):
                failed = True
            else:
                best, chosen = work.snapshot(), step + 1
    work.load(best if best is not None else finetuned)
    if best is None:
        log.warning(
            "rollback: no checkpoint kept task accuracy above %.2f; writing the fine-tuned model", minimum
        )
    for p in plain.parameters():
        p.requires_grad_(False)
    cos_after = mean_cosine(plain, layer, harmful, d_harm, config.batch_size, pad_id)
    report = {
        "method": "rollback",
        "layer": layer,
        "decoder_blocks": depth,
        "edited_tensors": len(names),
        "block_parameters": n_param,
        "reset_per_step": work.k,
        "task_accuracy": {"fine_tuned": original, "limit": minimum, "after_warmup": warm_score},
        "rollback_mode": rollback_mode,
        "checkpoints": checkpoints,
        "chosen_step": chosen,
        "at_aligned": work.at_aligned(),
        "steps": steps,
        "harmful_cosine": {"fine_tuned": cos_before, "written": cos_after},
        "prompts": {"harmful": len(harmful), "benign": len(benign), "validation": len(validation)},
        "template": template,
        "seconds": {
            "total": round(time.perf_counter() - start, 1),
            "task_checks": round(seconds["task_checks"], 1),
        },
        "config": config_record(config),
    }
    log.info("rollback: wrote step %d (%d entries at their aligned values)", chosen, report["at_aligned"])
    with atomic_output_dir(out, config.overwrite) as tmp:
        save_full_model(tmp, plain, loaded, config)
        write_report(tmp, REPORT_FILE, report)
    return {"": out}


DEFENSE = register(
    Defense(
        name="rollback",
        stage="post",
        config=RollbackConfig,
        run=run,
        from_run=guard_the_attack_task,
        summary="reset to their aligned values, in steps, the fine-tuned weights whose gradient pulls the "
        "harmful-prompt hidden state furthest from the aligned model's (Yang et al. 2025)",
    )
)
