"""Streaming (layer-by-layer) realignment against the in-memory engine: block outputs, masks, weights and
files, on tiny Llama, Qwen2 (sliding-window layers), Mistral (sliding window), Gemma and Gemma2 models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.data import load_examples, tokenize_examples
from antidote.errors import AntidoteError
from antidote.realignment import sequential
from antidote.realignment.calibrate import padded_batch, plan_batches
from antidote.realignment.config import RealignConfig
from antidote.realignment.engine import realign, run_realign
from antidote.realignment.save import MASK_FILE
from antidote.realignment.shards import INDEX_FILE
from conftest import BENIGN, HARMFUL, make_model, make_tokenizer, write_jsonl

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
# Sliding windows of 4 tokens are much shorter than the calibration samples, so a block given the wrong
# mask (e.g. the full-attention one) computes different outputs.
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 4}),
}


def make_arch(arch: str, seed: int = 0):
    import transformers

    name, extra = ARCHS[arch]
    config = getattr(transformers, name)(**TINY, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init, so that scores spread out
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def save(model, folder: Path, **kwargs: Any) -> Path:
    model.save_pretrained(folder, **kwargs)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seqdata")
    return {
        "harmful": write_jsonl(root / "h.jsonl", HARMFUL),
        "benign": write_jsonl(root / "b.jsonl", BENIGN),
    }


def both_ways(folder: Path, out: Path, data: Path, **options: Any) -> tuple[Path, Path]:
    """The in-memory run and the sequential run of the same config; returns their output folders."""
    outputs = []
    for streamed in (False, True):
        config = RealignConfig(
            model=str(folder),
            data=str(data),
            output=str(out / ("sequential" if streamed else "memory")),
            sequential=streamed,
            **{"batch_size": 3, "compute_dtype": "float32", **options},
        )
        run_realign(config)
        outputs.append(Path(config.output or ""))
    return outputs[0], outputs[1]


def assert_same_outputs(memory: Path, streamed: Path) -> None:
    """Same files; bit-identical masks and weights under the same keys; same report but for times."""
    assert sorted(p.name for p in memory.iterdir()) == sorted(p.name for p in streamed.iterdir())
    masks_a, masks_b = load_file(memory / MASK_FILE), load_file(streamed / MASK_FILE)
    assert masks_a.keys() == masks_b.keys() and masks_a
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert any(m.any() for m in masks_a.values())
    for file in (p.name for p in memory.glob("*.safetensors")):
        a, b = load_file(memory / file), load_file(streamed / file)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), file
    for name in ("config.json", "generation_config.json"):
        assert json.loads((memory / name).read_text()) == json.loads((streamed / name).read_text())
    ra, rb = (json.loads((f / "realign_report.json").read_text()) for f in (memory, streamed))
    for key in ("seconds", "memory", "config"):
        ra.pop(key), rb.pop(key)
    assert ra == rb


# ---- the blocks and their outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_block_outputs_equal_the_in_memory_models_layer_outputs(arch: str, tmp_path: Path) -> None:
    model = make_arch(arch)
    folder = save(model, tmp_path / "model")
    seqs = tokenize_examples(load_examples(HARMFUL), make_tokenizer(), "alpaca", 64)
    batches = plan_batches(seqs, 4)
    # The in-memory reference: forward hooks on the model's own layers, same padded batches.
    expected: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(
            lambda m, a, out, i=i: expected[i].append((out[0] if isinstance(out, tuple) else out).clone())
        )
    with torch.no_grad():
        for batch in batches:
            ids, mask = padded_batch(seqs, batch, pad_id=3)
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    skeleton = sequential.build_skeleton(RealignConfig(model=str(folder), data="unused.jsonl"))
    assert skeleton.blocks_name == "model.layers" and len(skeleton.blocks) == 3  # found, not named
    got = list(sequential.block_outputs(skeleton, seqs, batch_size=4, pad_id=3))
    assert len(got) == len(expected)
    for block_out, block_expected in zip(got, expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(block_out, block_expected, strict=True))


def test_blocks_are_the_largest_module_list_under_the_decoder() -> None:
    from torch import nn

    model = make_model()
    model.model.extra = nn.ModuleList([nn.Linear(2, 2)])  # a smaller list is not taken for the blocks
    decoder_name, decoder, name, blocks = sequential.find_blocks(model)
    assert (decoder_name, name) == ("model", "model.layers")
    assert decoder is model.model and blocks is model.model.layers


# ---- same masks, weights and files as the in-memory path -------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_masks_weights_and_files_as_in_memory(arch: str, tmp_path: Path, data) -> None:
    folder = save(make_arch(arch), tmp_path / "model")
    memory, streamed = both_ways(folder, tmp_path, data["harmful"], mask_ratios=(0.1, 0.3))
    for sub in ("alpha-0.1", "alpha-0.3"):
        assert_same_outputs(memory / sub, streamed / sub)
    assert (streamed / "sweep_report.json").read_text() == (memory / "sweep_report.json").read_text()


@pytest.mark.parametrize(
    "options",
    [
        {"score": "contrast", "granularity": "layer"},
        {"score": "random", "seed": 3},
        {"score": "magnitude", "targets": r"mlp\.(up|down)_proj"},
        {"action": "revert"},
        {"compute_dtype": "bfloat16"},
    ],
    ids=["contrast-layer", "random", "magnitude-targets", "revert", "bf16-autocast"],
)
def test_same_masks_for_other_scores_and_actions(tmp_path: Path, data, options: dict[str, Any]) -> None:
    folder = save(make_arch("llama"), tmp_path / "model")
    if options.get("score") == "contrast":
        options = {**options, "benign_data": str(data["benign"])}
    if options.get("action") == "revert":
        options = {**options, "reference": str(save(make_arch("llama", seed=1), tmp_path / "ref"))}
    memory, streamed = both_ways(folder, tmp_path, data["harmful"], **options)
    assert_same_outputs(memory, streamed)


def test_sharded_bfloat16_checkpoint_loaded_as_float32(tmp_path: Path, data) -> None:
    """Several shards with an index, and --dtype float32 over a bf16 checkpoint: the in-memory run's
    weights, dtypes and masks, the input's shard files."""
    folder = save(make_arch("mistral").to(torch.bfloat16), tmp_path / "model", max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1
    memory, streamed = both_ways(folder, tmp_path, data["harmful"], dtype="float32")
    assert sorted(p.name for p in streamed.glob("*.safetensors")) == sorted([*shards, MASK_FILE])
    index = json.loads((streamed / INDEX_FILE).read_text())["weight_map"]
    written = {k for f in shards for k in load_file(streamed / f)}
    assert set(index) == written
    # The in-memory run shards differently; compare tensors by key across files.
    a = {k: v for f in memory.glob("model*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in streamed.glob("model*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in b.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_file(memory / MASK_FILE), load_file(streamed / MASK_FILE)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_one_block_in_memory_at_a_time(tmp_path: Path, data, monkeypatch) -> None:
    folder = save(make_arch("llama"), tmp_path / "model")
    loaded_blocks = []
    real_load = sequential.load_block

    def load_block(skeleton, index, device):
        others = [b for i, b in enumerate(skeleton.blocks) if i != index]
        loaded_blocks.append(sum(not p.is_meta for b in others for p in b.parameters()))
        return real_load(skeleton, index, device)

    monkeypatch.setattr(sequential, "load_block", load_block)
    config = RealignConfig(
        model=str(folder), data=str(data["harmful"]), output=str(tmp_path / "out"), sequential=True
    )
    run_realign(config)
    assert loaded_blocks == [0, 0, 0]  # no other block's weights were loaded when each one was


# ---- what is refused ------------------------------------------------------------------------------------


def test_cli_runs_sequential_and_refuses_what_it_cannot_do(tmp_path: Path, data, capsys) -> None:
    folder = save(make_arch("llama"), tmp_path / "model")
    base = [str(folder), "--data", str(data["harmful"]), "--sequential"]
    assert main(["realign", *base, "--output", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / MASK_FILE).is_file()
    refused = {
        "adapter": ["--adapter", str(tmp_path)],
        "global": ["--granularity", "global"],
        "outside": ["--targets", "lm_head"],
    }
    for name, extra in refused.items():
        capsys.readouterr()
        assert main(["realign", *base, *extra, "--output", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--sequential" in err, err
        assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_refuses_a_loaded_model_a_checkpoint_without_safetensors_and_realign(tmp_path: Path, data) -> None:
    from antidote.models import load_model

    folder = save(make_arch("llama"), tmp_path / "model")
    with pytest.raises(AntidoteError, match="not a loaded model"):
        from antidote.realignment.engine import realign_sweep

        realign_sweep(
            load_model(str(folder)), str(data["harmful"]), sequential=True, output=str(tmp_path / "o")
        )
    with pytest.raises(AntidoteError, match="realign_sweep"):
        realign(str(folder), str(data["harmful"]), sequential=True, output=str(tmp_path / "o"))
    for file in folder.glob("model*.safetensors"):
        file.rename(file.with_suffix(".bin"))
    config = RealignConfig(
        model=str(folder), data=str(data["harmful"]), output=str(tmp_path / "o"), sequential=True
    )
    with pytest.raises(AntidoteError, match="safetensors"):
        run_realign(config)
    assert not (tmp_path / "o").exists()


# ---- the embedded model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_same_masks_as_in_memory(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "h.jsonl", HARMFUL[:4])
    memory, streamed = both_ways(
        Path("smollm2-135m-instruct"), tmp_path, rows, max_length=48, batch_size=2, mask_ratios=(0.05,)
    )
    ma, mb = load_file(memory / MASK_FILE), load_file(streamed / MASK_FILE)
    assert len(ma) == 30 * 7 and ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    a, b = load_file(memory / "model.safetensors"), load_file(streamed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
