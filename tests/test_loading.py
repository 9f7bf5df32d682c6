"""Model loading: the content-keyed GGUF cache, its lock, and bad model files refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from antidote.errors import AntidoteError
from antidote.models import loading
from antidote.models.loading import (
    _content_key,
    check_device,
    check_finite_parameters,
    check_safetensors,
    gguf_to_folder,
    load_model,
)

MIB = 1 << 20


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ANTIDOTE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_gguf(path: Path, middle: bytes) -> Path:
    """A 'GGUF' of 3 MiB + a few bytes whose first and last MiB are fixed: only the middle varies."""
    path.write_bytes(b"GGUF" + b"\0" * (MIB - 4) + middle.ljust(MIB, b"m") + b"\1" * MIB)
    return path


@pytest.fixture
def fake_dequantize(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the (slow) dequantizer: it writes the source's sha256 into config.json."""
    calls: list[Path] = []

    def dequantize(gguf: Path, folder: Path) -> None:
        from safetensors.torch import save_file

        calls.append(gguf)
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        (folder / "config.json").write_text(json.dumps({"from": digest}))
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(folder / "model.safetensors"))

    monkeypatch.setattr(loading, "_dequantize", dequantize)
    monkeypatch.setattr(loading, "_check_gguf_readable", lambda gguf: None)
    return calls


# ---- the content key --------------------------------------------------------------------------------------


def test_files_differing_only_in_the_middle_get_different_keys(tmp_path: Path, cache: Path) -> None:
    a = fake_gguf(tmp_path / "a.gguf", b"one")
    b = fake_gguf(tmp_path / "b.gguf", b"two")
    assert a.stat().st_size == b.stat().st_size
    assert _content_key(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert _content_key(b) == hashlib.sha256(b.read_bytes()).hexdigest()
    assert _content_key(a) != _content_key(b)


def test_key_is_hashed_once_per_path_size_and_mtime(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real = loading._sha256
    monkeypatch.setattr(loading, "_sha256", lambda p: hashed.append(p) or real(p))
    a = fake_gguf(tmp_path / "a.gguf", b"one")
    first = _content_key(a)
    assert _content_key(a) == first and len(hashed) == 1  # remembered in the index
    index = json.loads((cache / "gguf-index.json").read_text())
    assert index[str(a.resolve())]["sha256"] == first
    fake_gguf(a, b"changed in place")
    stat = a.stat()
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a new mtime, as any write gives
    assert _content_key(a) == hashlib.sha256(a.read_bytes()).hexdigest() != first and len(hashed) == 2


def test_broken_index_is_rebuilt(tmp_path: Path, cache: Path) -> None:
    cache.mkdir()
    (cache / "gguf-index.json").write_text("{not json")
    a = fake_gguf(tmp_path / "a.gguf", b"one")
    assert _content_key(a) == hashlib.sha256(a.read_bytes()).hexdigest()


# ---- the cache folders ------------------------------------------------------------------------------------


def test_each_content_gets_its_own_folder(tmp_path: Path, cache: Path, fake_dequantize: list[Path]) -> None:
    a = fake_gguf(tmp_path / "model.gguf", b"one")
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    b = fake_gguf(other_dir / "model.gguf", b"two")  # same file name, same size, same first/last MiB
    folder_a, folder_b = gguf_to_folder(a), gguf_to_folder(b)
    sha_a = hashlib.sha256(a.read_bytes()).hexdigest()
    sha_b = hashlib.sha256(b.read_bytes()).hexdigest()
    assert folder_a == cache / f"model-{sha_a[:16]}" and folder_b == cache / f"model-{sha_b[:16]}"
    assert json.loads((folder_a / "config.json").read_text())["from"] == sha_a
    assert json.loads((folder_b / "config.json").read_text())["from"] == sha_b
    assert json.loads((folder_a / loading.SOURCE_FILE).read_text())["sha256"] == sha_a
    assert gguf_to_folder(a) == folder_a and len(fake_dequantize) == 2  # reused, not rebuilt
    copy = tmp_path / "copy.gguf"
    shutil.copy(a, copy)
    assert gguf_to_folder(copy, "named") == cache / f"named-{sha_a[:16]}"  # a name plus the key


def test_a_folder_without_its_record_is_rebuilt(
    tmp_path: Path, cache: Path, fake_dequantize: list[Path]
) -> None:
    a = fake_gguf(tmp_path / "a.gguf", b"one")
    folder = gguf_to_folder(a)
    (folder / loading.SOURCE_FILE).unlink()
    (folder / "config.json").write_text("half")
    assert gguf_to_folder(a) == folder and len(fake_dequantize) == 2
    assert json.loads((folder / "config.json").read_text())["from"] == _content_key(a)


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
        lambda f: (f / "model.safetensors").unlink(),
        lambda f: (f / "config.json").write_text("{half"),
    ],
    ids=["truncated weights", "weights gone", "config.json broken"],
)
def test_a_damaged_cache_entry_is_rebuilt_not_reused(
    tmp_path: Path, cache: Path, fake_dequantize: list[Path], damage: Any
) -> None:
    """A cache entry whose record is right but whose files were damaged afterwards (a full disk, a user's
    edit) is rebuilt from the GGUF; before, it was reused forever and loading blamed the user's .gguf."""
    a = fake_gguf(tmp_path / "a.gguf", b"one")
    folder = gguf_to_folder(a)
    assert gguf_to_folder(a) == folder and len(fake_dequantize) == 1  # whole: reused
    damage(folder)
    assert gguf_to_folder(a) == folder and len(fake_dequantize) == 2  # damaged: rebuilt
    loading.check_safetensors(folder / "model.safetensors", "rebuilt")
    assert json.loads((folder / "config.json").read_text())["from"] == _content_key(a)


def test_two_processes_dequantize_once(tmp_path: Path, cache: Path, fake_dequantize: list[Path]) -> None:
    """Process A dequantizes and does not finish until process B is waiting for the lock; B then reuses
    A's folder. Each child records its result in a file."""
    gguf = fake_gguf(tmp_path / "m.gguf", b"shared")
    flags = tmp_path / "flags"
    flags.mkdir()

    def run_child(name: str) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:

            def dequantize(src: Path, folder: Path) -> None:
                (flags / f"dequantized-by-{name}").write_text("")
                for _ in range(6000):  # until B waits on the lock (at most a minute)
                    if (flags / "b-waiting").exists():
                        break
                    time.sleep(0.01)
                (folder / "config.json").write_text(json.dumps({"by": name}))
                from safetensors.torch import save_file

                save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))

            loading._dequantize = dequantize
            loading.log.warning = lambda *a, **k: (flags / f"{name}-waiting").write_text("")
            (flags / f"{name}-result").write_text(str(gguf_to_folder(gguf)))
            code = 0
        finally:
            os._exit(code)

    a = run_child("a")
    for _ in range(6000):
        if (flags / "dequantized-by-a").exists():
            break
        time.sleep(0.01)
    b = run_child("b")
    assert os.waitpid(a, 0)[1] == 0 and os.waitpid(b, 0)[1] == 0
    assert (flags / "b-waiting").exists()  # B found the lock taken and waited
    assert not (flags / "dequantized-by-b").exists()
    folder = Path((flags / "a-result").read_text())
    assert Path((flags / "b-result").read_text()) == folder
    assert json.loads((folder / "config.json").read_text()) == {"by": "a"}


# ---- bad files and options --------------------------------------------------------------------------------


def test_gguf_without_magic_is_refused_before_anything_is_written(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "random.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(AntidoteError, match="not a GGUF file"):
        gguf_to_folder(bad)
    assert not cache.exists()


def _small_gguf(path: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_truncated_gguf_is_refused_before_anything_is_written(tmp_path: Path, cache: Path) -> None:
    whole = _small_gguf(tmp_path / "whole.gguf")
    loading._check_gguf_readable(whole)  # a whole file passes the check
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size - 1000])
    with pytest.raises(AntidoteError, match="truncated or corrupt"):
        gguf_to_folder(cut)
    assert not cache.exists()


def _safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, str(path))
    return path


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda b: b[:-10], "header describes"),
        (lambda b: b + b"\0" * 10, "header describes"),
        (lambda b: b[:20], "no safetensors header"),
        (lambda b: b"", "no safetensors header"),
        (lambda b: os.urandom(len(b)), "no safetensors header"),
        (lambda b: b[:8] + b"{" * (len(b) - 8), "header is not valid"),
    ],
)
def test_damaged_safetensors_are_refused(damage: Any, expected: str, tmp_path: Path) -> None:
    good = _safetensors(tmp_path / "w.safetensors")
    check_safetensors(good, "model file")
    good.write_bytes(damage(good.read_bytes()))
    with pytest.raises(AntidoteError, match=expected):
        check_safetensors(good, "model file")


def _copy_model(tiny: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny["model"], folder)
    return folder


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda f: (f / "model.safetensors").write_bytes(os.urandom(5000)), "not a safetensors file"),
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
    ],
)
def test_bad_model_folders_are_refused(
    change: Any, expected: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy_model(tiny, tmp_path)
    change(folder)
    with pytest.raises(AntidoteError, match=expected):
        load_model(str(folder), device="cpu")


def test_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    check_device("auto")
    check_device("cpu")
    for bad, expected in (("gpu", "unknown --device"), ("meta", "not supported")):
        with pytest.raises(AntidoteError, match=expected):
            check_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AntidoteError, match="no CUDA GPU is visible"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(AntidoteError, match="only 2 CUDA GPU"):
        check_device("cuda:2")


def test_unknown_dtype_is_refused_before_loading(tiny: dict[str, Path]) -> None:
    with pytest.raises(AntidoteError, match="unknown --dtype 'float8'"):
        load_model(str(tiny["model"]), dtype="float8")


def test_pickled_adapter_is_refused_before_peft_reads_it(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft.peft_model
    import peft.utils.save_and_load

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(tiny["adapter"] / "adapter_config.json", adapter)
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04 not a pickle at all")
    opened: list[Any] = []
    for module in (peft.peft_model, peft.utils.save_and_load):
        monkeypatch.setattr(module, "load_peft_weights", lambda *a, **k: opened.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a))
    with pytest.raises(AntidoteError, match=r"only a pickled adapter_model\.bin"):
        load_model(str(tiny["model"]), adapter=str(adapter), device="cpu")
    assert opened == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad: float) -> None:
    from conftest import make_model

    model = make_model()
    check_finite_parameters(model, "m")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = bad
    with pytest.raises(AntidoteError, match=r"model\.layers\.1\.mlp\.down_proj\.weight contain NaN or inf"):
        check_finite_parameters(model, "m")
