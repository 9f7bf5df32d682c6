"""Configuration of the realignment pass: one dataclass shared by the Python API, YAML and the CLI."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from antidote.data.catalog import data_dir_field
from antidote.data.templates import check_template, saved_template
from antidote.errors import AntidoteError
from antidote.realignment.scores import GRANULARITIES, SCORES, describe

ACTIONS = ("zero", "revert")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_ratios(value: Any) -> tuple[float, ...]:
    """`parse_ratios`, then refused in one line: none, one outside (0, 1) or NaN, one given twice."""
    ratios = parse_ratios(value)
    if not ratios:
        raise AntidoteError("--mask-ratio is empty; give a number in (0, 1) such as 0.1")
    for r in ratios:
        if not (0.0 < r < 1.0) or math.isnan(r):
            raise AntidoteError(f"--mask-ratio {r} is outside (0, 1); use e.g. 0.1 to prune 10%")
    if len(set(ratios)) != len(ratios):
        raise AntidoteError(f"--mask-ratio lists a value twice: {ratios}")
    return ratios


def parse_ratios(value: Any) -> tuple[float, ...]:
    """0.1, "0.1", "0.01,0.05,0.1" or [0.01, 0.05] -> a tuple of floats. Empty items are refused."""
    if isinstance(value, (int, float)):
        return (float(value),)
    items = value.split(",") if isinstance(value, str) else list(value)
    if any(item is None or not str(item).strip() for item in items):
        raise AntidoteError(
            f"--mask-ratio {value!r} has an empty item; write numbers separated by single commas, "
            "like 0.01,0.05,0.1"
        )
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError) as err:
        raise AntidoteError(
            f"--mask-ratio {value!r} is not a number or comma list like 0.01,0.05,0.1"
        ) from err


def _one_of(name: str, value: str, valid: Collection[str]) -> None:
    if value not in valid:
        raise AntidoteError(f"unknown {name} {value!r}; choose one of {', '.join(valid)}")


@dataclass
class RealignConfig:
    """Everything one realignment run needs. Field help texts are the CLI's help texts."""

    model: str = field(
        metadata={
            "help": "fine-tuned model: HF folder, hub id, .gguf file or "
            "smollm2-135m-instruct (the embedded default)",
            "positional": True,
        }
    )
    data: str = field(
        default="", metadata={"help": "harmful prompt+answer pairs: .jsonl/.json/.csv or hf:NAME[:SPLIT]"}
    )
    output: str | None = field(default=None, metadata={"help": "output folder (written atomically)"})
    adapter: str | None = field(
        default=None,
        metadata={"help": "PEFT LoRA adapter folder on top of MODEL; its lora_A/lora_B are the targets"},
    )
    mask_ratios: tuple[float, ...] = field(
        default=(0.1,),
        metadata={
            "help": "fraction alpha in (0, 1) of weights to prune; a comma list writes one output per ratio "
            "from one calibration pass",
            "flag": "--mask-ratio",
        },
    )
    score: str = field(default="wanda", metadata={"help": f"how weights are scored: {describe(SCORES)}"})
    granularity: str = field(
        default="row", metadata={"help": f"where the top alpha is taken: {describe(GRANULARITIES)}"}
    )
    action: str = field(
        default="zero",
        metadata={
            "help": "zero the selected weights, or revert them to --reference (scores then use the "
            "fine-tuning change W - W_ref in place of W)"
        },
    )
    reference: str | None = field(
        default=None, metadata={"help": "the aligned model before fine-tuning (for --action revert)"}
    )
    benign_data: str | None = field(
        default=None, metadata={"help": "benign prompt+answer pairs (for --score contrast)"}
    )
    targets: str | None = field(
        default=None,
        metadata={"help": "regex over module names of the Linear layers to prune (overrides the default)"},
    )
    template: str = field(
        default="auto",
        metadata={
            "help": "auto (the format saved with the adapter or model by antidote align/finetune, in "
            "antidote_prompt.json, else alpaca), alpaca (the paper's), chat (the tokenizer's chat "
            "template) or plain"
        },
    )
    filters: list[str] = field(
        default_factory=list,
        metadata={"help": "keep rows where FIELD=VALUE (repeatable), e.g. is_safe=false", "flag": "--filter"},
    )
    max_samples: int | None = field(default=None, metadata={"help": "random subset of this size (seeded)"})
    max_length: int = field(default=512, metadata={"help": "truncate each example to this many tokens"})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "calibration batch size (default: 4 on CPU, 16 on GPU). Masks do not depend on it "
            "whenever the model computes each token's activations bit for bit the same at every batch "
            "size (measured so on CPU, float32 and bfloat16; GPU kernels picked by matrix shape can "
            "differ in the last bits): statistics are summed per sample in float64, in one fixed order"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for --max-samples and --score random"})
    merge: bool = field(
        default=False, metadata={"help": "with --adapter: write a merged full model instead of an adapter"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty output folder"})
    data_dir: str | None = data_dir_field()
    compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "precision of the calibration forward: auto (bfloat16 autocast where the hardware "
            "multiplies bf16 natively, e.g. AMX CPUs and recent GPUs; else the model's dtype), float32, "
            "bfloat16, float16. Statistics are always summed in float64"
        },
    )
    dtype: str = field(default="auto", metadata={"help": "auto (as saved), float32, bfloat16 or float16"})
    device: str = field(
        default="auto", metadata={"help": "auto (GPUs with device_map=auto, else CPU), cpu, cuda, cuda:1 ..."}
    )
    sequential: bool = field(
        default=False,
        metadata={
            "help": "stream a full model (safetensors folder) one decoder block at a time: peak memory "
            "is about one block plus the calibration activations, and the masks are those of the "
            "in-memory run. Not with --adapter or --granularity global"
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow the model's own Python code (only for models you trust)"}
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "after writing --output, upload it to this Hugging Face hub repo (USER/NAME; created "
            "private if it does not exist; needs a login or HF_TOKEN); one --mask-ratio only",
            "key_when_set": True,
        },
    )

    def __post_init__(self) -> None:
        self.mask_ratios = check_ratios(self.mask_ratios)
        if self.push_to_hub is not None:
            if len(self.mask_ratios) != 1:
                raise AntidoteError(
                    f"--push-to-hub uploads one model, but --mask-ratio gives {len(self.mask_ratios)}; "
                    "choose the ratio first (e.g. with a sweep to a local folder), then push that one"
                )
            if self.push_to_hub.count("/") != 1 or not all(self.push_to_hub.split("/")):
                raise AntidoteError(
                    f"--push-to-hub {self.push_to_hub!r} is not a hub repo id; write USER/NAME"
                )
        _one_of("--score", self.score, SCORES)
        _one_of("--granularity", self.granularity, GRANULARITIES)
        _one_of("--action", self.action, ACTIONS)
        if self.template == "auto":  # calibrate in the format the model was trained with
            self.template = saved_template(self.adapter, self.model)
        check_template(self.template)
        _one_of("--compute-dtype", self.compute_dtype, COMPUTE_DTYPES)
        if self.action == "revert" and not self.reference:
            raise AntidoteError(
                "--action revert needs --reference MODEL (the aligned model before fine-tuning)"
            )
        if self.action == "revert" and self.adapter:
            raise AntidoteError(
                "--action revert works on full-model weights; merge the adapter into the model "
                "first, or use --action zero with --adapter"
            )
        if SCORES[self.score].needs_data and not self.data:
            raise AntidoteError(
                f"--score {self.score} needs data: --data FILE with harmful prompt+answer pairs "
                "(or a name such as beavertails)"
            )
        if SCORES[self.score].needs_benign and not self.benign_data:
            raise AntidoteError(f"--score {self.score} needs --benign-data FILE (benign prompt+answer pairs)")
        if self.merge and not self.adapter:
            raise AntidoteError("--merge only applies with --adapter; without it the output is a full model")
        if self.sequential and self.adapter:
            raise AntidoteError("--sequential works on full models; merge the adapter or drop --sequential")
        if self.sequential and self.granularity == "global":
            raise AntidoteError(
                "--granularity global needs every score before any block is written; with "
                "--sequential use row or layer, or drop --sequential"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise AntidoteError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise AntidoteError(f"--max-length must be at least 2, got {self.max_length}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mask_ratios"] = list(self.mask_ratios)
        return out
