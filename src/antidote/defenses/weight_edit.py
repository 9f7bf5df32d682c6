"""Shared by the post-fine-tuning defenses that edit weights with the alignment delta (`safelora`, `resta`,
`lox`): their common options, reading the models, folding the fine-tuning adapter into dense weights and
writing the output folder.

Names used throughout: `model` is the aligned model (weights W_aligned), `base_model` the model before
alignment (W_base), `adapter` the fine-tuning LoRA adapter (the attack), whose dense update of a layer is
dW = B A * lora_alpha / r (B: (out, r), A: (r, in)). The alignment delta of a weight is
V = W_aligned - W_base, and the fine-tuned weight is W_ft = W_aligned + dW.

Dense weights are named as in the plain model (`model.layers.0.self_attn.q_proj.weight`), so the aligned
model, the base model and the output share one set of names.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from antidote.data.templates import PROMPT_FILE
from antidote.errors import AntidoteError
from antidote.outputs import json_text

if TYPE_CHECKING:
    import torch
    from torch import nn

    from antidote.models import LoadedModel

log = logging.getLogger(__name__)

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


class ModelInputs(Protocol):
    """What `load_finetuned` and `save_full_model` read from a defense's config."""

    model: str
    adapter: str | None
    dtype: str
    device: str
    trust_remote_code: bool


@dataclass
class WeightEditConfig:
    """The inputs every weight-editing post defense reads, and where it writes. Subclasses add the
    method's own options and set `METHOD` (used in messages) and `NEEDS_BASE`."""

    METHOD: ClassVar[str] = "this defense"
    NEEDS_BASE: ClassVar[bool] = True

    model: str = field(
        metadata={
            "help": "the aligned model (HF folder, hub id, .gguf or smollm2-135m-instruct); the "
            "fine-tuning adapter sits on it",
            "positional": True,
        }
    )
    adapter: str | None = field(
        default=None, metadata={"help": "the fine-tuning (attack) LoRA adapter folder on MODEL"}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "the model before alignment; the alignment delta is MODEL minus this model"},
    )
    output: str | None = field(default=None, metadata={"help": "output folder (written atomically)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty output folder"})
    dtype: str = field(default="auto", metadata={"help": "auto (as saved), float32, bfloat16 or float16"})
    device: str = field(
        default="auto", metadata={"help": "auto (GPUs with device_map=auto, else CPU), cpu, cuda, cuda:1 ..."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow the model's own Python code (only for models you trust)"}
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise AntidoteError(f"{self.METHOD} needs MODEL, the aligned model the adapter was trained on")
        if not self.adapter:
            raise AntidoteError(
                f"{self.METHOD} needs --adapter FOLDER, the fine-tuning LoRA adapter on the aligned model"
            )
        if self.NEEDS_BASE and not self.base_model:
            raise AntidoteError(
                f"{self.METHOD} needs --base-model MODEL, the model before alignment "
                "(the alignment delta is MODEL minus it)"
            )
        if self.dtype not in DTYPE_NAMES:
            raise AntidoteError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")


# ---- reading ----------------------------------------------------------------------------------------------


def load_finetuned(config: ModelInputs) -> LoadedModel:
    """The aligned model with the fine-tuning adapter on it (a PeftModel)."""
    from antidote.models import load_model

    assert config.adapter is not None  # checked in the config's __post_init__
    return load_model(
        config.model,
        adapter=config.adapter,
        dtype=config.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
    )


def lora_layers(loaded: LoadedModel) -> dict[str, Any]:
    """Plain module name (`model.layers.0.self_attn.q_proj`) -> the PEFT LoRA Linear layer there."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    name = loaded.adapter_name
    if name is None:
        raise AntidoteError("these defenses need the fine-tuning adapter loaded on the aligned model")
    base = loaded.model.get_base_model()  # type: ignore[operator]
    layers = {}
    for module_name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or name not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear) or module.use_dora.get(name, False):
            raise AntidoteError(
                f"{module_name} is not a plain LoRA Linear layer (DoRA, embedding or conv LoRA); "
                "these defenses read plain LoRA adapters on Linear layers"
            )
        layers[module_name] = module
    if not layers:
        raise AntidoteError(f"the adapter {loaded.adapter} has no LoRA layers; pass a LoRA adapter folder")
    return layers


def dense_parameters(loaded: LoadedModel) -> dict[str, nn.Parameter]:
    """Every weight of the aligned model under its plain name; for a LoRA layer, its frozen base weight
    (`...q_proj.base_layer.weight` is named `...q_proj.weight`). The LoRA factors are left out."""
    base = loaded.model.get_base_model()  # type: ignore[operator]
    out = {}
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = param
    return out


def check_same_weights(
    aligned: Mapping[str, torch.Size], base: Mapping[str, torch.Size], what: str, aligned_name: str
) -> None:
    """The base model (`what`, for messages) must have exactly the aligned model's weight names and shapes,
    or a one-line error names the first that differs and how to fix it."""
    for name, shape in aligned.items():
        other = base.get(name)
        if other is None or other != shape:
            got = "missing" if other is None else tuple(other)
            raise AntidoteError(
                f"{what} does not match the aligned model at {name} ({got} vs {tuple(shape)}); pass the "
                f"model that {aligned_name} was aligned from"
            )
    extra = sorted(set(base) - set(aligned))
    if extra:
        raise AntidoteError(
            f"{what} does not match the aligned model: it has weights the aligned model lacks ({extra[0]}, "
            f"{len(extra)} in all); pass the model that {aligned_name} was aligned from"
        )


def read_base_weights(
    config: WeightEditConfig, shapes: Mapping[str, torch.Size], wanted: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The base model's weights (on the CPU) of the `wanted` plain names (default: all of `shapes`).

    `shapes` holds every dense weight of the aligned model (`dense_parameters`); the base model must have
    exactly these names and shapes, or this stops with a one-line error. It is loaded once on the CPU and
    the rest of it is dropped.
    """
    from antidote.models import load_model

    assert config.base_model is not None
    spec = config.base_model
    base = load_model(
        spec,
        dtype=config.dtype,
        device="cpu",
        trust_remote_code=config.trust_remote_code,
        with_tokenizer=False,
    )
    params = dict(base.model.named_parameters())
    check_same_weights(shapes, {n: p.shape for n, p in params.items()}, f"--base-model {spec}", "MODEL")
    weights = {name: params[name].detach().clone() for name in (shapes if wanted is None else wanted)}
    del base, params
    return weights


# ---- the fine-tuned dense weights -------------------------------------------------------------------------

Transform = Callable[[str, "torch.Tensor"], "torch.Tensor"]


def fold_adapter(loaded: LoadedModel, transform: Transform | None = None) -> nn.Module:
    """Add each LoRA layer's dense update to its base weight, W <- W + transform(name, dW), and return the
    plain model without the adapter (the PeftModel is used up). `name` is the plain weight name; dW is
    (out, in) float32 on the weight's device. Without `transform` this is the fine-tuned model W_ft."""
    import torch

    adapter = loaded.adapter_name
    with torch.no_grad():
        for module_name, layer in lora_layers(loaded).items():
            weight = layer.base_layer.weight
            delta = layer.get_delta_weight(adapter).float().to(weight.device)
            if transform is not None:
                delta = transform(f"{module_name}.weight", delta)
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return loaded.model.unload()  # type: ignore[operator]


# ---- writing ----------------------------------------------------------------------------------------------


def check_output(config: WeightEditConfig) -> Path:
    """The resolved output folder, refused now (before any work) if it cannot be written."""
    from antidote.outputs import check_output_dir

    if not config.output:
        raise AntidoteError(f"missing --output DIR; {config.METHOD} writes its model there")
    inputs = tuple(p for p in (config.model, config.adapter, config.base_model) if p)
    return check_output_dir(config.output, config.overwrite, inputs)


def copy_prompt_file(config: ModelInputs, folder: Path) -> None:
    """Keep the prompt format the adapter (or the aligned model) was trained with beside the output."""
    for source in (config.adapter, config.model):
        if source and (Path(source) / PROMPT_FILE).is_file():
            shutil.copyfile(Path(source) / PROMPT_FILE, folder / PROMPT_FILE)
            return


def write_report(folder: Path, name: str, report: Mapping[str, Any]) -> None:
    (folder / name).write_text(json_text(report, indent=2, default=str) + "\n")


def save_full_model(folder: Path, model: nn.Module, loaded: LoadedModel, config: ModelInputs) -> None:
    """A full model folder: weights, tokenizer, the prompt format."""
    model.save_pretrained(folder)  # type: ignore[operator]
    loaded.tokenizer.save_pretrained(folder)
    copy_prompt_file(config, folder)


def config_record(config: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)
