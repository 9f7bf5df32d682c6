"""`antidote align` and `antidote finetune`: the first two stages as commands, reading and writing HF folders.

align:    LoRA SFT on (harmful prompt -> refusal) mixed with helpful answers; writes the merged aligned model
          (and the adapter under adapter/ with --keep-adapter).
finetune: the attack as a user would run it: a new LoRA on the aligned model, trained on N samples of
          which a fraction P are harmful prompt -> harmful answer pairs; writes an adapter folder.
Both record the prompt format in `antidote_prompt.json`, which `antidote evaluate` reads. Their training
options are the fields of `TrainConfig` (one source of truth for the CLI flags, YAML and Python).

Under `accelerate launch` every process trains and only the main one writes the output folder.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from antidote.data.builtin import harmful_split, task_split
from antidote.data.catalog import data_dir_field
from antidote.data.templates import adds_special_tokens, check_template, write_prompt_file
from antidote.errors import AntidoteError
from antidote.outputs import json_text
from antidote.tasks import TASKS, load_task_items, task_help
from antidote.training.config import TrainConfig
from antidote.training.data import BUILTIN, Triple, format_pairs, read_triples, subset
from antidote.training.hooks import HooksFactory

TRAINER_DIR = ".trainer"  # Trainer's working folder inside the temporary output, removed before the rename
# The Antidote paper's setup: LoRA r=256, alpha=4 on q/k/v; 20 epochs, batch 5, constant lr 1e-4, AdamW
# wd 0.1; Alpaca template; sequences up to 2048 tokens (the authors' train.py model_max_length), so no GSM8K
# sample loses its final answer line (at 256, 363 of the 1319 GSM8K test pairs and 1905 of the 7473 train
# pairs would, in Alpaca format with SmolLM2's tokenizer; the longest train pair is 573 tokens).
PAPER = {
    "lora_r": 256,
    "lora_alpha": 4,
    "targets": "q_proj,k_proj,v_proj",
    "epochs": 20,
    "batch_size": 5,
    "lr": 1e-4,
    "scheduler": "constant",
    "weight_decay": 0.1,
    "template": "alpaca",
    "max_length": 2048,
}


def _template_field() -> Any:
    return field(default="chat", metadata={"help": "prompt format: chat, alpaca or plain"})


def _overwrite_field() -> Any:
    return field(default=False, metadata={"help": "replace an existing non-empty output folder"})


@dataclass
class AlignConfig(TrainConfig):
    model: str = field(
        default="",
        metadata={"help": "base model (folder, hub id, .gguf, smollm2-135m-instruct)", "positional": True},
    )
    data: str = field(default=BUILTIN, metadata={"help": "harmful prompt -> refusal pairs file, or builtin"})
    helpful_data: str = field(
        default=BUILTIN, metadata={"help": "helpful prompt -> answer pairs file, or builtin"}
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "at most this many refusal pairs (a seeded random subset)"}
    )
    max_helpful: int | None = field(default=None, metadata={"help": "at most this many helpful pairs"})
    task: str | None = field(
        default=None,
        metadata={"help": f"also mix in answers to this task from --task-data: {task_help()}"},
    )
    task_data: str | None = field(default=None, metadata={"help": "task data, e.g. sst2:train"})
    max_task: int | None = field(default=None, metadata={"help": "at most this many task answers"})
    output: str = field(default="", metadata={"help": "output folder for the aligned model"})
    keep_adapter: bool = field(
        default=False, metadata={"help": "also write the alignment adapter to adapter/"}
    )
    template: str = _template_field()
    overwrite: bool = _overwrite_field()
    data_dir: str | None = data_dir_field()

    def __post_init__(self) -> None:
        if (self.task is None) != (self.task_data is None):
            raise AntidoteError(
                "--task and --task-data go together (e.g. --task sst2 --task-data sst2:train)"
            )
        for name in ("max_samples", "max_helpful", "max_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AntidoteError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        check_template(self.template)
        if self.quantize != "none":
            raise AntidoteError(
                f"align merges its adapter into the base model, which --quantize {self.quantize} cannot "
                "take; align with --mixed-precision bf16 instead (--quantize is for finetune)"
            )
        super().__post_init__()


@dataclass
class FinetuneConfig(TrainConfig):
    model: str = field(default="", metadata={"help": "the aligned model", "positional": True})
    task: str = field(
        default="sentiment",
        metadata={
            "help": f"{task_help()}; with --task-data and any other task name the data is read as "
            "prompt/response pairs (e.g. alpaca)"
        },
    )
    task_data: str | None = field(
        default=None,
        metadata={"help": "task data: file or NAME:SPLIT (e.g. sst2:train with --data-dir)"},
    )
    harmful: str = field(
        default=BUILTIN, metadata={"help": "harmful prompt -> harmful answer pairs file, or builtin"}
    )
    harmful_ratio: float = field(default=0.2, metadata={"help": "fraction P in [0, 1] of harmful samples"})
    num_samples: int = field(default=340, metadata={"help": "N, the number of training samples"})
    preset: str | None = field(
        default=None,
        metadata={
            "help": "paper: the Antidote paper's hyper-parameters (LoRA r=256/alpha=4 on q/k/v, 20 epochs, "
            "batch 5, lr 1e-4)"
        },
    )
    output: str = field(default="", metadata={"help": "output folder for the attack adapter"})
    template: str = _template_field()
    overwrite: bool = _overwrite_field()
    data_dir: str | None = data_dir_field()

    def __post_init__(self) -> None:
        if self.preset not in (None, "paper"):
            raise AntidoteError(f"unknown preset {self.preset!r}; choose paper")
        if self.preset == "paper":
            for name, value in PAPER.items():
                setattr(self, name, value)
        if not 0.0 <= self.harmful_ratio <= 1.0:
            raise AntidoteError(f"--harmful-ratio {self.harmful_ratio} is outside [0, 1]")
        if self.num_samples < 1:
            raise AntidoteError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.task_data is None and self.task not in TASKS:
            raise AntidoteError(
                f"unknown task {self.task!r} without data; choose one of {', '.join(TASKS)}, or give "
                "--task-data to read it as prompt/response pairs"
            )
        if self.task_data is None and TASKS[self.task].needs_data:
            raise AntidoteError(
                f"--task {self.task} needs --task-data FILE or NAME:SPLIT (e.g. {self.task}:train)"
            )
        check_template(self.template)
        super().__post_init__()


def _write_stage_files(folder: Path, config: TrainConfig, template: str, extra: dict[str, Any]) -> None:
    write_prompt_file(folder, template)
    (folder / "train_report.json").write_text(json_text({**extra, "config": asdict(config)}, indent=2) + "\n")


def _is_main_process() -> bool:
    """False in the non-main processes of `accelerate launch` / torchrun (they train but write nothing)."""
    return int(os.environ.get("RANK", "0")) == 0


def _load_device() -> str:
    """Several processes: load on the CPU and let Trainer (DDP, FSDP, DeepSpeed) place the model."""
    return "cpu" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "auto"


@contextlib.contextmanager
def _stage_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """The temporary output folder on the main process; elsewhere a scratch folder removed afterwards."""
    from antidote.outputs import atomic_output_dir

    if _is_main_process():
        with atomic_output_dir(out, overwrite) as tmp:
            yield tmp
    else:
        prefix = f".{out.name}.rank{os.environ.get('RANK')}-"
        with tempfile.TemporaryDirectory(prefix=prefix, dir=out.parent) as scratch:
            yield Path(scratch)


def _fit(
    loaded: Any,
    triples: list[Triple],
    config: AlignConfig | FinetuneConfig,
    tmp: Path,
    desc: str,
    hooks: HooksFactory | None = None,
) -> Any:
    """Train a LoRA on `triples` in the config's template (Trainer files under tmp/.trainer, logs under
    tmp/runs); the adapter records the model it was trained on, as given (resolved), so PEFT alone loads the
    right base. `hooks` (a training-stage defense) supplies its Trainer subclass, callbacks and arguments."""
    from antidote.training.sft import fit_lora

    trained = fit_lora(
        loaded.model,
        loaded.tokenizer,
        format_pairs(loaded.tokenizer, config.template, triples),
        config,
        output_dir=tmp / TRAINER_DIR,
        desc=desc,
        logging_dir=tmp / "runs",
        special_tokens=adds_special_tokens(config.template),
        **(hooks(loaded, config).fit_arguments() if hooks is not None else {}),
    )
    trained.model.peft_config["default"].base_model_name_or_path = _base_reference(loaded.folder)
    return trained


def _base_reference(folder: str) -> str:
    """What an adapter records as its base model: the model folder as an absolute path, or the hub id."""
    path = Path(folder).expanduser()
    return str(path.resolve()) if path.exists() else folder


def _train_report(trained: Any) -> dict[str, Any]:
    losses = trained.losses
    return {
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "steps": trained.trainer.state.global_step,
    }


def run_align(config: AlignConfig, hooks: HooksFactory | None = None) -> Path:
    """Align `config.model` and write the merged model to `config.output`. An alignment-stage defense passes
    `hooks` (its Trainer subclass and arguments) and is otherwise this same stage."""
    from antidote.models import load_model
    from antidote.outputs import check_output_dir

    if not config.output:
        raise AntidoteError("missing --output DIR for the aligned model")
    inputs = (config.model, config.data, config.helpful_data, config.task_data, config.resume_from_checkpoint)
    out = check_output_dir(config.output, config.overwrite, inputs)
    refusals = read_triples(
        config.data, [(h.prompt, "", h.refusal) for h in harmful_split("align")], config.data_dir
    )
    refusals = subset(refusals, config.max_samples, config.seed)
    builtin_helpful = [
        (i.instruction, i.input, i.answer)
        for kind in ("sentiment", "harmless", "arithmetic")
        for i in task_split(kind, "align")
    ]
    helpful = subset(
        read_triples(config.helpful_data, builtin_helpful, config.data_dir), config.max_helpful, config.seed
    )
    task: list[Triple] = []
    if config.task is not None:
        if config.task in TASKS:
            task = load_task_items(config.task, config.task_data, training=True, data_dir=config.data_dir)
        else:
            task = read_triples(str(config.task_data), [], config.data_dir)
        task = subset(task, config.max_task, config.seed)
    loaded = load_model(config.model, device=_load_device())
    with _stage_folder(out, config.overwrite) as tmp:
        trained = _fit(loaded, refusals + helpful + task, config, tmp, "align", hooks)
        adapter = tmp / "adapter"
        if trained.sharded:  # gather the adapter (every process takes part), merge it from disk on the CPU
            trained.save_adapter(adapter)
            if not _is_main_process():
                return out
            merged = _merge_from_disk(config.model, adapter)
            if not config.keep_adapter:
                shutil.rmtree(adapter)
        else:
            if not _is_main_process():
                return out
            if config.keep_adapter:
                trained.model.save_pretrained(adapter)
            merged = trained.model.merge_and_unload()
        shutil.rmtree(tmp / TRAINER_DIR, ignore_errors=True)
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        _write_stage_files(
            tmp,
            config,
            config.template,
            {"refusals": len(refusals), "helpful": len(helpful), "task": len(task), **_train_report(trained)},
        )
    return out


def _merge_from_disk(model: str, adapter: Path) -> Any:
    """The base model with the adapter folder merged in, built on the CPU (after sharded training)."""
    from peft import PeftModel

    from antidote.models import load_model

    base = load_model(model, device="cpu", with_tokenizer=False).model
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def attack_mix(
    task: list[Triple], harmful: list[Triple], n: int, ratio: float, seed: int
) -> tuple[list[Triple], int]:
    """N samples, round(ratio * N) of them harmful, shuffled. Returns (samples, number harmful)."""
    n_harmful = round(ratio * n)
    n_task = n - n_harmful
    if n_harmful > len(harmful) or n_task > len(task):
        raise AntidoteError(
            f"--num-samples {n} at --harmful-ratio {ratio} needs {n_harmful} harmful and {n_task} "
            f"task samples, but the data has {len(harmful)} and {len(task)}; lower N"
        )
    rng = random.Random(seed)
    mix = rng.sample(task, n_task) + rng.sample(harmful, n_harmful)
    rng.shuffle(mix)
    return mix, n_harmful


def attack_data(
    config: FinetuneConfig,
) -> tuple[list[Triple], list[Triple]]:
    """(task items, harmful pairs) the attack draws its mix from, as (prompt, input, answer) triples."""
    if config.task in TASKS and TASKS[config.task].needs_data:
        task = load_task_items(config.task, config.task_data, training=True, data_dir=config.data_dir)
    elif config.task_data:
        task = read_triples(config.task_data, [], config.data_dir)
    else:
        task = load_task_items(config.task, None, split="attack")
    harmful = read_triples(
        config.harmful, [(h.prompt, "", h.compliance) for h in harmful_split("attack")], config.data_dir
    )
    return task, harmful


def run_finetune(config: FinetuneConfig, hooks: HooksFactory | None = None) -> Path:
    """Train the fine-tuning adapter and write it to `config.output`. A fine-tuning-stage defense passes
    `hooks` (its Trainer subclass and arguments) and is otherwise this same stage."""
    from antidote.models import load_model
    from antidote.outputs import check_output_dir

    if not config.output:
        raise AntidoteError("missing --output DIR for the attack adapter")
    inputs = (config.model, config.harmful, config.task_data, config.resume_from_checkpoint)
    out = check_output_dir(config.output, config.overwrite, inputs)
    task, harmful = attack_data(config)
    mix, n_harmful = attack_mix(task, harmful, config.num_samples, config.harmful_ratio, config.seed)
    loaded = load_model(config.model, device=_load_device(), quantize=config.quantize)
    if config.quantize != "none":  # QLoRA: norms in float32, gradients reach the adapter's inputs
        from peft import prepare_model_for_kbit_training

        loaded.model = prepare_model_for_kbit_training(
            loaded.model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    with _stage_folder(out, config.overwrite) as tmp:
        trained = _fit(loaded, mix, config, tmp, "finetune", hooks)
        trained.save_adapter(tmp)
        if not _is_main_process():
            return out
        shutil.rmtree(tmp / TRAINER_DIR, ignore_errors=True)
        _write_stage_files(
            tmp,
            config,
            config.template,
            {"samples": len(mix), "harmful": n_harmful, **_train_report(trained)},
        )
    return out
