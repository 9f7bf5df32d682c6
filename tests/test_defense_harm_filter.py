"""`harm-filter` (ours): the update dW' = dW M is the least-squares solution it claims to be (checked
against numpy's lstsq on the stacked problem), and the written adapters are A M with M rebuilt by hand from
the layer inputs of the aligned model, collected one pair at a time with plain hooks on plain transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get
from antidote.defenses.harm_filter import filtered
from antidote.errors import AntidoteError
from conftest import BENIGN, HARMFUL, copy_run, write_jsonl

PREFIX = "base_model.model."


def test_the_update_is_the_least_squares_solution() -> None:
    """dW M minimises ||(D - dW) Xt||^2/nt + s ||D Xh||^2/nh + r ||D - dW||^2: the stacked system by lstsq."""
    rng = np.random.default_rng(0)
    d_in, d_out, nt, nh, s, ridge = 6, 4, 40, 30, 3.0, 0.05
    xt = rng.normal(size=(d_in, nt))
    xh = rng.normal(size=(d_in, nh)) + 2.0 * rng.normal(size=(d_in, 1))  # harmful inputs share a direction
    dw = rng.normal(size=(d_out, d_in))
    ct, ch = xt @ xt.T / nt, xh @ xh.T / nh
    r = ridge * np.trace(ct) / d_in
    # rows of the stacked problem, each a residual linear in D^T: [Xt^T; sqrt(s) Xh^T; sqrt(r) I] D^T = ...
    lhs = np.vstack([xt.T / np.sqrt(nt), np.sqrt(s) * xh.T / np.sqrt(nh), np.sqrt(r) * np.eye(d_in)])
    rhs = np.vstack([xt.T @ dw.T / np.sqrt(nt), np.zeros((nh, d_out)), np.sqrt(r) * dw.T])
    expected = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
    got = filtered(torch.tensor(dw), torch.tensor(ct), torch.tensor(ch), s, ridge).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10)


def test_task_only_directions_keep_the_update_and_harm_only_ones_lose_it() -> None:
    """Task inputs in the first two coordinates, harmful ones in the last two: a large strength keeps the
    update on the first (up to the ridge) and takes it out of the last; strength 0 is the identity."""
    ct = torch.diag(torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    ch = torch.diag(torch.tensor([0.0, 0.0, 1.0, 3.0], dtype=torch.float64))
    eye = torch.eye(4, dtype=torch.float64)
    m = filtered(eye, ct, ch, 1e6, 1e-6)  # rows of the identity: M itself
    np.testing.assert_allclose(m.numpy(), np.diag([1.0, 1.0, 0.0, 0.0]), atol=1e-5)
    np.testing.assert_allclose(filtered(eye, ct, ch, 0.0, 0.01).numpy(), np.eye(4), atol=1e-12)


def layer_inputs(model_dir: Path, sequences: list[list[int]], modules: list[str]) -> dict[str, np.ndarray]:
    """C = sum x x^T / tokens per module, the aligned model's inputs, one unpadded pair at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    sums = {m: np.zeros((model.config.hidden_size,) * 2) for m in modules}

    def hook(name: str) -> Any:
        def pre(module: Any, args: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double().numpy()
            sums[name] += x.T @ x

        return pre

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    with torch.no_grad():
        for seq in sequences:
            model(input_ids=torch.tensor([seq]))
    for h in handles:
        h.remove()
    tokens = sum(len(s) for s in sequences)
    return {m: v / tokens for m, v in sums.items()}


def test_the_written_adapters_are_a_times_m_from_the_aligned_models_inputs(tiny, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from antidote.data import load_examples, tokenize_examples

    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    keep = write_jsonl(tmp_path / "keep.jsonl", BENIGN)
    out = tmp_path / "out"
    argv = ["defend", "harm-filter", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--data"]
    argv += [str(harmful), "--benign-data", str(keep), "--template", "plain", "--dtype", "float32"]
    assert main([*argv, "--strength", "0,4", "--ridge", "0.1", "--output", str(out)]) == 0

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    seqs = {
        name: tokenize_examples(load_examples(str(path), max_samples=64, seed=0), tokenizer, "plain", 256)
        for name, path in (("harm", harmful), ("keep", keep))
    }
    trained = load_file(tiny["adapter"] / "adapter_model.safetensors")
    modules = sorted({k.split(".lora_A.")[0].removeprefix(PREFIX) for k in trained if ".lora_A." in k})
    c_harm = layer_inputs(tiny["model"], seqs["harm"], modules)
    c_keep = layer_inputs(tiny["model"], seqs["keep"], modules)
    for strength in (0.0, 4.0):
        written = load_file(out / f"strength-{strength:g}" / "adapter_model.safetensors")
        report = json.loads((out / f"strength-{strength:g}" / "harm_filter_report.json").read_text())
        assert report["strength"] == strength and report["harmful_pairs"] == len(HARMFUL)
        for module in modules:
            key = f"{PREFIX}{module}.lora_A.weight"
            ct, ch = c_keep[module], c_harm[module]
            keep_m = ct + 0.1 * np.trace(ct) / ct.shape[0] * np.eye(ct.shape[0])
            m = keep_m @ np.linalg.inv(keep_m + strength * ch)
            want = trained[key].double().numpy() @ m
            np.testing.assert_allclose(written[key].double().numpy(), want, rtol=1e-4, atol=1e-5)
            b_key = key.replace("lora_A", "lora_B")
            assert torch.equal(written[b_key], trained[b_key])  # B is untouched
            b = trained[b_key].double().numpy()
            for kind, c in (("task", ct), ("harm", ch)):  # ||B A' X||^2 / ||B A X||^2 by hand
                ratio = np.trace(b @ want @ c @ want.T @ b.T) / np.trace(
                    b @ trained[key].double().numpy() @ c @ trained[key].double().numpy().T @ b.T
                )
                got = report["per_layer_action_kept"][module][kind]
                assert got == pytest.approx(ratio, rel=1e-3), (module, kind)
        if strength > 0:  # more of the update's action is left on the task's inputs than on harmful ones
            assert report["harm_action_kept"] < report["task_action_kept"] <= 1.0
        else:
            assert report["harm_action_kept"] == pytest.approx(1.0, rel=1e-6)


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = ["defend", "harm-filter", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--output"]
    argv += [str(tmp_path / "o"), "--data", str(tiny["harmful"])]
    assert main(argv) == 2
    assert "harm-filter needs the data to keep" in capsys.readouterr().err
    argv += ["--benign-data", str(tiny["benign"])]
    assert main([*argv, "--strength", "-1"]) == 2
    assert "--strength must be a number >= 0, got -1" in capsys.readouterr().err
    assert main([*argv, "--strength", "1,1"]) == 2
    assert "--strength needs distinct values" in capsys.readouterr().err
    assert main([*argv, "--ridge", "0"]) == 2
    assert "--ridge must be a number > 0" in capsys.readouterr().err
    assert main([*argv, "--task", "sst2"]) == 2
    assert "give --task and --task-data together" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="needs --data"):
        get("harm-filter").config(model="m", adapter="a")
    assert not (tmp_path / "o").exists()


def test_runs_in_the_pipeline_and_keeps_the_attacks_own_pairs(tiny, tiny_run, tmp_path: Path) -> None:
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    section: dict[str, Any] = {"data": str(tiny["harmful"]), "strengths": [1.0, 10.0]}
    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"harm-filter": section}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    rows = [r for r in summary["rows"] if r["model"].startswith("harm-filter")]
    assert len(rows) == 2
    for row in rows:
        report = json.loads((Path(row["adapter"]) / "harm_filter_report.json").read_text())
        assert report["task_pairs"] == len(BENIGN) and report["config"]["benign_data"] == str(tiny["benign"])
