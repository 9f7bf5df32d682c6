"""End-to-end `antidote realign` on a tiny Llama (+ LoRA adapter): every output reloaded and checked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.realignment.scores import num_selected


def run(*args: object) -> int:
    return main(["realign", *map(str, args)])


def realign_tiny(tiny: dict[str, Path], out: Path, *extra: object) -> int:
    """Realign the tiny full model on the tiny harmful data into `out`."""
    return run(tiny["model"], "--data", tiny["harmful"], "--output", out, *extra)


def folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_adapter_output_reloads_and_only_masked_entries_changed(tiny, tmp_path) -> None:
    from peft import PeftModel

    from conftest import make_model

    out = tmp_path / "out"
    assert run(tiny["model"], "--adapter", tiny["adapter"], "--data", tiny["harmful"], "--output", out) == 0
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "antidote_mask.safetensors",
        "realign_report.json",
        "README.md",
    } <= {p.name for p in out.iterdir()}
    before = load_file(tiny["adapter"] / "adapter_model.safetensors")
    after = load_file(out / "adapter_model.safetensors")
    masks = load_file(out / "antidote_mask.safetensors")
    assert set(masks) == set(before)  # every lora_A/lora_B, keyed as in the adapter file
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == before[name].shape
        assert torch.all(after[name][mask] == 0)
        assert torch.equal(after[name][~mask], before[name][~mask])
        assert int(mask.sum()) == mask.shape[0] * num_selected(mask.shape[1], 0.1)
    PeftModel.from_pretrained(make_model(), out)  # loads with PEFT
    report = json.loads((out / "realign_report.json").read_text())
    assert report["calibration"]["samples"] == 10 and report["mask_ratio"] == 0.1
    assert report["pruned_total"]["pruned"] == sum(int(m.sum()) for m in masks.values())
    assert {"load", "calibrate", "prune", "save"} <= set(report["seconds"])


def test_merge_writes_full_model_equal_to_masked_adapter_merged(tiny, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert (
        run(
            tiny["model"], "--adapter", tiny["adapter"], "--data", tiny["harmful"], "--output", out, "--merge"
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = load_file(tiny["model"] / "model.safetensors")
    lora = load_file(tiny["adapter"] / "adapter_model.safetensors")
    masks = load_file(out / "antidote_mask.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a = lora[f"{prefix}.lora_A.weight"] * ~masks[f"{prefix}.lora_A.weight"]
    b = lora[f"{prefix}.lora_B.weight"] * ~masks[f"{prefix}.lora_B.weight"]
    expected = base["model.layers.0.self_attn.q_proj.weight"] + scale * b @ a
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight.detach(), expected)


def test_full_model_output_reloads_with_masked_weights_zero(tiny, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "full"
    assert (
        realign_tiny(
            tiny,
            out,
            "--granularity",
            "global",
            "--mask-ratio",
            "0.2",
        )
        == 0
    )
    before = load_file(tiny["model"] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    masks = load_file(out / "antidote_mask.safetensors")
    assert "lm_head.weight" not in masks and len(masks) == 14
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == num_selected(total, 0.2)
    for name in before:
        if name in masks:
            assert torch.all(after[name][masks[name]] == 0)
            assert torch.equal(after[name][~masks[name]], before[name][~masks[name]])
        else:
            assert torch.equal(after[name], before[name])
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)


def test_sweep_writes_one_output_per_ratio_equal_to_single_runs(tiny, tmp_path) -> None:
    out = tmp_path / "sweep"
    assert realign_tiny(tiny, out, "--mask-ratio", "0.05,0.2") == 0
    assert (out / "sweep_report.json").is_file()
    single = tmp_path / "single"
    assert realign_tiny(tiny, single, "--mask-ratio", "0.2") == 0
    a = load_file(out / "alpha-0.2" / "model.safetensors")
    b = load_file(single / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)  # the 0.05 pass left no trace in the 0.2 output
    small = load_file(out / "alpha-0.05" / "antidote_mask.safetensors")
    large = load_file(out / "alpha-0.2" / "antidote_mask.safetensors")
    assert all(torch.all(large[k][small[k]]) for k in small)  # nested: same scores, larger top set


def test_random_score_same_seed_same_masks(tiny, tmp_path) -> None:
    masks = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        assert (
            realign_tiny(
                tiny,
                tmp_path / name,
                "--score",
                "random",
                "--seed",
                seed,
            )
            == 0
        )
        masks.append(load_file(tmp_path / name / "antidote_mask.safetensors"))
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert not all(torch.equal(masks[0][k], masks[2][k]) for k in masks[0])


def test_magnitude_score_masks_largest_weights_per_row(tiny, tmp_path) -> None:
    out = tmp_path / "mag"
    assert realign_tiny(tiny, out, "--score", "magnitude") == 0
    before = load_file(tiny["model"] / "model.safetensors")
    masks = load_file(out / "antidote_mask.safetensors")
    w = before["model.layers.1.mlp.down_proj.weight"]
    k = num_selected(w.shape[1], 0.1)
    for r in range(w.shape[0]):
        top = set(sorted(range(w.shape[1]), key=lambda j: (-abs(w[r, j].item()), j))[:k])
        assert {j for j in range(w.shape[1]) if masks["model.layers.1.mlp.down_proj.weight"][r, j]} == top


def test_revert_sets_masked_weights_to_reference(tiny, tmp_path) -> None:
    out = tmp_path / "revert"
    assert (
        realign_tiny(
            tiny,
            out,
            "--action",
            "revert",
            "--reference",
            tiny["reference"],
            "--targets",
            r"mlp\.",
        )
        == 0
    )
    ref = load_file(tiny["reference"] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    masks = load_file(out / "antidote_mask.safetensors")
    assert len(masks) == 6 and all(".mlp." in k for k in masks)
    for name, mask in masks.items():
        torch.testing.assert_close(after[name][mask], ref[name][mask])


def test_contrast_score_and_yaml_config(tiny, tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {tiny['harmful']}\nbenign_data: {tiny['benign']}\nscore: contrast\nmask_ratio: 0.05\n"
    )
    out = tmp_path / "contrast"
    assert main(["realign", str(tiny["model"]), "--config", str(cfg), "--output", str(out)]) == 0
    report = json.loads((out / "realign_report.json").read_text())
    assert report["score"] == "contrast" and report["mask_ratio"] == 0.05


def test_existing_output_needs_overwrite(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert realign_tiny(tiny, out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert realign_tiny(tiny, out, "--overwrite") == 2  # not an antidote output: never replaced
    assert "not written by antidote" in capsys.readouterr().err and (out / "keep.txt").is_file()
    mine = tmp_path / "mine"
    assert realign_tiny(tiny, mine) == 0
    (mine / "keep.txt").write_text("old output")
    assert realign_tiny(tiny, mine, "--overwrite") == 0
    assert not (mine / "keep.txt").exists() and (mine / "model.safetensors").is_file()


def _nan_model(tiny, tmp_path) -> Path:
    from conftest import make_model, make_tokenizer

    model = make_model()
    make_tokenizer().save_pretrained(tmp_path / "nan_model")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan_model")
    return tmp_path / "nan_model"


BAD_INPUTS = {
    "missing model": (lambda t, p: ["/nonexistent/model", "--data", t["harmful"]], "not found"),
    "model folder without config": (lambda t, p: [p, "--data", t["harmful"]], "config.json"),
    "missing data": (lambda t, p: [t["model"], "--data", p / "none.jsonl"], "not found"),
    "no usable fields": (
        lambda t, p: [t["model"], "--data", _write(p / "x.jsonl", '{"a": 1, "b": 2}')],
        "found a, b",
    ),
    "empty after filter": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--filter", "prompt=zzz"],
        "no examples left",
    ),
    "unknown filter field": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--filter", "is_safe=false"],
        "fields found",
    ),
    "ratio too big": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--mask-ratio", "1.0"],
        "outside (0, 1)",
    ),
    "ratio zero": (lambda t, p: [t["model"], "--data", t["harmful"], "--mask-ratio", "0"], "outside (0, 1)"),
    "targets match nothing": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--targets", "nothing_here"],
        "matches no Linear",
    ),
    "adapter does not fit": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--adapter", t["adapter_3layers"]],
        "does not fit",
    ),
    "adapter folder missing": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--adapter", p],
        "adapter_config.json",
    ),
    "nan weights": (lambda t, p: [_nan_model(t, p), "--data", t["harmful"]], "NaN"),
    "revert without reference": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--action", "revert"],
        "--reference",
    ),
    "revert with other shape": (
        lambda t, p: [
            t["model"],
            "--data",
            t["harmful"],
            "--action",
            "revert",
            "--reference",
            _other_shape(p),
        ],
        "does not match",
    ),
    "unknown score": (lambda t, p: [t["model"], "--data", t["harmful"], "--score", "best"], "choose one of"),
    "contrast without benign": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--score", "contrast"],
        "--benign-data",
    ),
    "yaml unknown key": (
        lambda t, p: [t["model"], "--config", _write(p / "c.yaml", "data: x\nalpah: 0.1\n")],
        "unknown keys: alpah",
    ),
    "output is the input": (
        lambda t, p: [t["model"], "--data", t["harmful"], "--output", t["model"], "--overwrite"],
        "is the input",
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _other_shape(p: Path) -> Path:
    from conftest import make_model

    make_model(hidden_size=48).save_pretrained(p / "other")
    return p / "other"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, tiny, tmp_path, capsys) -> None:
    make_args, expected = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    args = list(make_args(tiny, work))
    if "--output" not in map(str, args):
        args += ["--output", tmp_path / "out"]
    inputs_before = {k: folder_digest(v) for k, v in tiny.items() if k != "root"}
    assert run(*args) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress bars may come first
    errors = [line for line in lines if line.startswith("antidote: error: ")]
    assert errors == [lines[-1]] and expected in errors[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    assert inputs_before == {k: folder_digest(v) for k, v in tiny.items() if k != "root"}


def test_python_module_entry_point() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "antidote", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("antidote ")


def test_python_api_with_in_memory_records(tiny) -> None:
    import antidote
    from conftest import HARMFUL

    loaded = antidote.load_model(str(tiny["model"]))
    result = antidote.realign(loaded, HARMFUL[:4], mask_ratio=0.1, granularity="layer")
    assert result.output is None and result.report["calibration"]["samples"] == 4
    weight = dict(result.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.all(weight[result.masks["model.layers.0.self_attn.q_proj.weight"]] == 0)
