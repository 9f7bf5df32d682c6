"""The one training config: LoRA SFT settings shared by `antidote align`, `antidote finetune`, the demo and
the Python API. Its fields are the commands' flags (the CLI is generated from them), so this module imports
neither torch nor transformers: `antidote --help` stays fast.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from antidote.configfile import check_finite_fields
from antidote.errors import AntidoteError

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("cosine", "constant")
# --report-to name -> the package transformers' Trainer needs for it.
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
MIXED_PRECISION = ("no", "bf16", "fp16")
QUANTIZE = ("none", "4bit", "8bit")


@dataclass
class TrainConfig:
    """LoRA SFT on response tokens (`--preset paper`: the paper's settings; these defaults suit a 135M model).

    Training runs on transformers' `Trainer`: AdamW, gradient clipping at 1.0, no warm-up, batches of
    similar length, seeded. Nothing is written outside the output folder unless asked for
    (`checkpoint_dir`, or a `report_to` service that keeps its own files).
    """

    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    targets: str = field(
        default=",".join(ALL_PROJECTIONS), metadata={"help": "comma list of module names to adapt"}
    )
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    epochs: int = field(default=2, metadata={"help": "passes over the data"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step (per device)"})
    scheduler: str = field(
        default="cosine", metadata={"help": "learning-rate schedule: cosine (to 0) or constant"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_length: int = field(
        default=256, metadata={"help": "truncate each prompt+response to this many tokens"}
    )
    seed: int = field(default=0, metadata={"help": "seed for data choice, LoRA init and batch order"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass: less memory, ~20%% slower"},
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "log training to none, or a comma list of tensorboard (into OUTPUT/runs unless "
            "$TENSORBOARD_LOGGING_DIR is set), wandb, mlflow (their own settings and folders)"
        },
    )
    save_steps: int = field(
        default=0,
        metadata={"help": "write a resumable checkpoint every N steps into --checkpoint-dir (0: none)"},
    )
    checkpoint_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder for the checkpoint-N folders; unset: the folder holding --resume-from-checkpoint"
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "a checkpoint-N folder written by --save-steps: continue that training from there"},
    )
    # Options for big models on one GPU (docs/7b-one-gpu.md). At their defaults they are left out of a run's
    # stage keys (`key_when_set`), so stages cached before they existed stay valid.
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": "no (the model's dtype), bf16 (GPUs from Ampere on, and CPUs) or fp16 (CUDA): "
            "transformers' mixed-precision training",
            "key_when_set": True,
        },
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "optimizer step every N batches: the effective batch is batch-size x N at the memory of "
            "one batch",
            "key_when_set": True,
        },
    )
    quantize: str = field(
        default="none",
        metadata={
            "help": "none, 4bit (NF4, QLoRA) or 8bit: load the frozen base quantized with bitsandbytes "
            "(a CUDA GPU and pip install bitsandbytes); only the LoRA adapter trains. finetune only: "
            "align merges its adapter into the base, which a quantized base cannot take",
            "key_when_set": True,
        },
    )

    def __post_init__(self) -> None:
        check_finite_fields(self)  # every number, this class's and a defense subclass's (--rho, --lam, ...)
        if isinstance(self.targets, (list, tuple)):  # YAML may give a list
            self.targets = ",".join(str(t) for t in self.targets)
        for name, value in (
            ("lora-r", self.lora_r),
            ("epochs", self.epochs),
            ("batch-size", self.batch_size),
        ):
            if value < 1:
                raise AntidoteError(f"--{name} must be at least 1, got {value}")
        if not self.lr > 0:
            raise AntidoteError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise AntidoteError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            raise AntidoteError(f"unknown --scheduler {self.scheduler!r}; choose cosine or constant")
        if self.max_length < 2:
            raise AntidoteError(
                "--max-length must be at least 2 (a prompt token and a response token), "
                f"got {self.max_length}"
            )
        if not self.target_modules:
            raise AntidoteError("--targets is empty; name the modules to adapt, e.g. q_proj,k_proj,v_proj")
        self._check_report_to()
        if self.save_steps < 0:
            raise AntidoteError(f"--save-steps must be 0 (no checkpoints) or more, got {self.save_steps}")
        if self.resume_from_checkpoint is not None:
            state = Path(self.resume_from_checkpoint).expanduser() / "trainer_state.json"
            if not state.is_file():
                raise AntidoteError(
                    f"--resume-from-checkpoint {self.resume_from_checkpoint} is not a checkpoint folder "
                    "(no trainer_state.json); pass a checkpoint-N folder written with --save-steps"
                )
        if self.mixed_precision not in MIXED_PRECISION:
            raise AntidoteError(
                f"unknown --mixed-precision {self.mixed_precision!r}; choose one of "
                f"{', '.join(MIXED_PRECISION)}"
            )
        if self.gradient_accumulation_steps < 1:
            raise AntidoteError(
                f"--gradient-accumulation-steps must be at least 1, got {self.gradient_accumulation_steps}"
            )
        check_quantize(self.quantize)
        if self.save_steps and self.checkpoints is None:
            raise AntidoteError("--save-steps needs --checkpoint-dir DIR, the folder the checkpoints go to")

    def _check_report_to(self) -> None:
        if self.report_to == "none":
            return
        for name in self.reporters:
            if name not in REPORTERS:
                raise AntidoteError(
                    f"unknown --report-to {name!r}; choose none or a comma list of {', '.join(REPORTERS)}"
                )
            if importlib.util.find_spec(REPORTERS[name]) is None:
                raise AntidoteError(f"--report-to {name} needs the {REPORTERS[name]} package: pip install it")

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step on one device."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    @property
    def reporters(self) -> list[str]:
        """The --report-to services as a list (empty for none)."""
        return [] if self.report_to == "none" else [r.strip() for r in self.report_to.split(",") if r.strip()]

    @property
    def checkpoints(self) -> Path | None:
        """Where checkpoints go: --checkpoint-dir, else the folder holding --resume-from-checkpoint."""
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir).expanduser().resolve()
        if self.resume_from_checkpoint is not None:
            return Path(self.resume_from_checkpoint).expanduser().resolve().parent
        return None


def check_quantize(quantize: str) -> None:
    """--quantize names a known mode, and bitsandbytes is installed when one is asked for (checked before any
    work; bitsandbytes itself is imported only when a model is loaded)."""
    if quantize not in QUANTIZE:
        raise AntidoteError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise AntidoteError(
            f"--quantize {quantize} needs bitsandbytes and a CUDA GPU: pip install bitsandbytes (or leave "
            "--quantize out and load in --mixed-precision bf16)"
        )
