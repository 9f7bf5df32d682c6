"""LoRA supervised fine-tuning with the loss on response tokens only, on transformers' `Trainer`: the step
shared by `align` (harmful prompt -> refusal, mixed with helpful answers) and `finetune` (the attack).

The math (`response_labels`, `label_loss`) is separate from the orchestration (`ResponseOnlyTrainer`,
`fit_lora`). Logits are computed only where a response token is predicted (`logits_to_keep` with a boolean
mask), so the output layer (49k words on SmolLM2) runs on a small fraction of positions.

Training-stage defenses plug in without editing this file: subclass `ResponseOnlyTrainer` (override
`compute_loss` or `training_step`) and pass it as `trainer_class`, its own constructor arguments as `extra`,
or add `callbacks` (a stage takes them as one `antidote.training.hooks.TrainingHooks`). Pairs are tokenized
by `antidote.training.data.encode_pairs`, the path calibration and evaluation share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from antidote.errors import AntidoteError
from antidote.training.config import ALL_PROJECTIONS, TrainConfig
from antidote.training.data import encode_pairs

__all__ = [
    "ALL_PROJECTIONS",
    "IGNORE_INDEX",
    "LengthBucketSampler",
    "ResponseCollator",
    "ResponseOnlyTrainer",
    "TrainConfig",
    "TrainedLora",
    "encode_pairs",
    "fit_lora",
    "label_loss",
    "response_labels",
    "response_loss",
    "train_lora",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a position that does not count (prompt, padding), as in transformers


# ---- math: tokens -> labels -> loss ------------------------------------------------------------------------


def response_labels(ids: torch.Tensor, attention: torch.Tensor, n_prompt: torch.Tensor) -> torch.Tensor:
    """Labels for the response-only loss. ids, attention: (B, T) right-padded; n_prompt: (B,).

    Returns (B, T) int64: the token id where n_prompt <= t < length, IGNORE_INDEX elsewhere.
    """
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    keep = (positions >= n_prompt.unsqueeze(1)) & attention.bool()
    return torch.where(keep, ids, torch.full_like(ids, IGNORE_INDEX))


def label_loss(
    model: nn.Module, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, as transformers' causal-LM loss with `labels`.

    ids, attention, labels: (B, T). Token t is predicted from position t-1, so logits are asked for only at
    positions t-1 whose label at t counts: (N, vocab) instead of (B, T, vocab). The call goes through the
    model's own forward (so DDP, FSDP and DeepSpeed wrappers see it).
    """
    targets = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets
    logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
    if logits.dim() == 3:  # a model that ignores the boolean mask returns every position
        logits = logits[keep]
    return nn.functional.cross_entropy(logits.float(), labels[:, 1:][targets])


def response_loss(
    model: nn.Module, ids: torch.Tensor, attention: torch.Tensor, n_prompt: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over response tokens. ids, attention: (B, T) right-padded; n_prompt: (B,)."""
    return label_loss(model, ids, attention, response_labels(ids, attention, n_prompt))


# ---- data: collator and length-bucketed batch order --------------------------------------------------------


@dataclass
class ResponseCollator:
    """Features {"input_ids": list[int], "n_prompt": int} -> right-padded (B, T) input_ids, attention_mask
    and labels (IGNORE_INDEX on the prompt and on padding)."""

    pad_token_id: int = 0

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            attention[row, : len(f["input_ids"])] = 1
        n_prompt = torch.tensor([f["n_prompt"] for f in features])
        labels = response_labels(ids, attention, n_prompt)
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}


class LengthBucketSampler(torch.utils.data.Sampler[int]):
    """Indices such that consecutive runs of `batch_size` are sequences of similar length (little padding),
    the batches visited in a random order; seeded by (seed, epoch), so a resumed run sees the same order.

    The one short batch (when batch_size does not divide the data) comes last, so that a DataLoader (or
    accelerate's per-process sharding) cutting the stream every `batch_size` indices finds the same batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], rng.random()))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        rng.shuffle(batches)
        for batch in batches + short:
            yield from batch


# ---- orchestration: the Trainer ----------------------------------------------------------------------------


class ResponseOnlyTrainer(Trainer):
    """`Trainer` with the response-only loss computed at label positions only, and length-bucketed batches.

    The loss is a per-batch mean (as transformers' masked-label loss on that batch); with gradient
    accumulation the Trainer divides it by the number of accumulated batches. Defenses subclass this and
    override `compute_loss` (add a penalty to `super().compute_loss(...)`) or `training_step`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss is a batch mean: no token count is passed in

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        loss = label_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        return (loss, None) if return_outputs else loss

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset: Any = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        lengths = [len(item["input_ids"]) for item in dataset]
        return LengthBucketSampler(lengths, self.args.train_batch_size, seed)


class _StepLosses(TrainerCallback):
    """Keeps the loss of every optimizer step and shows a progress bar named after the stage."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.losses: list[float] = []
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step", leave=False
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class TrainedLora:
    """What `fit_lora` returns: the PeftModel, the loss of every step it ran, and the Trainer."""

    model: Any
    losses: list[float]
    trainer: Trainer

    @property
    def sharded(self) -> bool:
        """True under FSDP or DeepSpeed, where this process may hold only a shard of each weight."""
        return bool(self.trainer.is_fsdp_enabled or self.trainer.is_deepspeed_enabled)

    def save_adapter(self, folder: str | os.PathLike[str]) -> None:
        """Write the adapter (gathered from all processes when sharded; written by the main process only).

        Every process must call this under FSDP/DeepSpeed: gathering the weights is collective.
        """
        self.trainer.save_model(str(folder))
        args_file = Path(folder) / "training_args.bin"  # a pickle Trainer adds; the adapter does not need it
        if self.trainer.args.should_save:
            args_file.unlink(missing_ok=True)


def _training_arguments(config: TrainConfig, output_dir: Path) -> TrainingArguments:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise AntidoteError("--mixed-precision fp16 needs a CUDA GPU; use bf16 (or no) on this machine")
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        bf16=config.mixed_precision == "bf16",
        fp16=config.mixed_precision == "fp16",
        # bf16 without CUDA: transformers wants use_cpu (CPU autocast); otherwise the device is its choice
        use_cpu=config.mixed_precision == "bf16" and not torch.cuda.is_available(),
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        warmup_steps=0,
        weight_decay=config.weight_decay,
        max_grad_norm=1.0,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to=config.reporters or "none",
        activation_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,  # the collator needs n_prompt, which the model's forward does not take
        label_names=["labels"],
        disable_tqdm=True,  # our own bar, named after the stage
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step
    )


@contextlib.contextmanager
def _tensorboard_dir(logging_dir: Path | None, config: TrainConfig) -> Iterator[None]:
    """Point Trainer's TensorBoard logs at `logging_dir` unless the user set $TENSORBOARD_LOGGING_DIR."""
    key = "TENSORBOARD_LOGGING_DIR"
    if logging_dir is None or "tensorboard" not in config.reporters or key in os.environ:
        yield
        return
    os.environ[key] = str(logging_dir)
    try:
        yield
    finally:
        os.environ.pop(key, None)


def fit_lora(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    config: TrainConfig,
    *,
    output_dir: str | os.PathLike[str],
    desc: str = "training",
    trainer_class: type[ResponseOnlyTrainer] = ResponseOnlyTrainer,
    callbacks: Sequence[TrainerCallback] = (),
    extra: Mapping[str, Any] | None = None,
    logging_dir: str | os.PathLike[str] | None = None,
    special_tokens: bool = True,
) -> TrainedLora:
    """Add a fresh LoRA adapter to `model` and train it on the (prompt, response) pairs.

    output_dir: Trainer's working folder when `config` asks for no checkpoints (nothing is saved there by
    default); with `config.checkpoint_dir` (or `resume_from_checkpoint`) checkpoints go there instead.
    trainer_class, callbacks, extra: a training-stage defense's hooks (`TrainingHooks`); `extra` holds
    keyword arguments of `trainer_class`'s constructor. logging_dir: where TensorBoard logs go (with
    report_to tensorboard).
    special_tokens: whether the tokenizer's special tokens (BOS) lead each prompt, as at evaluation: the
    stages pass `adds_special_tokens(template)` (False for the chat template, which writes its own).
    """
    from peft import LoraConfig, get_peft_model

    encoded = encode_pairs(tokenizer, pairs, config.max_length, special_tokens=special_tokens)
    if not encoded:
        raise AntidoteError(
            f"no training pairs left after tokenization: every prompt fills --max-length {config.max_length} "
            "(or there are no pairs); raise --max-length"
        )
    torch.manual_seed(config.seed)  # the LoRA initialisation
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft asks for transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = get_peft_model(model, lora)
    except ValueError as err:  # e.g. none of the --targets exist in this model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AntidoteError(f"cannot add LoRA on --targets {config.targets}: {first}") from err
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = [{"input_ids": ids, "n_prompt": n} for ids, n in encoded]
    recorder = _StepLosses(desc)
    work_dir = config.checkpoints or Path(output_dir)
    with _tensorboard_dir(Path(logging_dir) if logging_dir is not None else None, config):
        trainer = trainer_class(
            model=peft_model,
            args=_training_arguments(config, work_dir),
            train_dataset=dataset,  # a list of dicts is a map-style dataset
            data_collator=ResponseCollator(pad or 0),
            callbacks=[recorder, *callbacks],
            **dict(extra or {}),
        )
    for quiet in (PrinterCallback, ProgressCallback):  # they print every step's logs
        trainer.remove_callback(quiet)
    resume = config.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=str(Path(resume).expanduser()) if resume else None)
    if config.gradient_checkpointing:
        base: Any = peft_model.get_base_model()
        base.activation_checkpointing_disable()
    peft_model.eval()
    losses = recorder.losses
    check_trained_weights(peft_model, desc, losses)
    if losses:
        log.info("%s: %d steps, loss %.3f -> %.3f", desc, len(losses), losses[0], losses[-1])
    return TrainedLora(model=peft_model, losses=losses, trainer=trainer)


def check_trained_weights(model: nn.Module, desc: str, losses: Sequence[float] = ()) -> None:
    """Refuse a training stage whose trained weights hold NaN or inf (a learning rate or a defense's
    strength so large that training diverged): the stage fails here, before anything is saved or recorded,
    instead of passing a model that answers garbage to the next stage."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            last = f" (last loss {losses[-1]:.4g})" if losses else ""
            raise AntidoteError(
                f"{desc}: training diverged{last}: the trained weights {name} hold NaN or inf; nothing was "
                "saved: lower --lr (or the defense's strength) and run again"
            )


def train_lora(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    config: TrainConfig,
    desc: str = "training",
    *,
    trainer_class: type[ResponseOnlyTrainer] = ResponseOnlyTrainer,
    callbacks: Sequence[TrainerCallback] = (),
    extra: Mapping[str, Any] | None = None,
    special_tokens: bool = True,
) -> tuple[Any, list[float]]:
    """`fit_lora` in a temporary working folder (removed afterwards). Returns (PeftModel, step losses)."""
    work = Path(tempfile.mkdtemp(prefix="antidote-train-"))
    try:
        trained = fit_lora(
            model,
            tokenizer,
            pairs,
            config,
            output_dir=work,
            desc=desc,
            trainer_class=trainer_class,
            callbacks=callbacks,
            extra=extra,
            special_tokens=special_tokens,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return trained.model, trained.losses
