"""`safedelta` on the 2-layer tiny model: the kept delta entries are exactly the cheapest-first prefix that
fits the safety budget, computed here by hand (numpy) from the Hessian of the aligned model's layer
inputs on safe data; kept entries hold their fine-tuned values; the compensation of the others lowers the
OBS safety-loss proxy below that of the plainly masked delta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.data import load_examples, tokenize_examples
from antidote.defenses import get
from antidote.errors import AntidoteError
from antidote.models import load_model
from conftest import HARMFUL, copy_run, write_jsonl

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def safe_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": r["prompt"], "response": "i can not help with that"} for r in HARMFUL]
    return write_jsonl(tmp_path_factory.mktemp("safe") / "safe.jsonl", rows)


def hessians_by_hand(tiny: dict[str, Path], data: Path, modules: list[str]) -> dict[str, np.ndarray]:
    """H = 2 / N * sum over samples and tokens of x x^T of the plain aligned model, one sample at a time."""
    loaded = load_model(str(tiny["model"]), dtype="float32", device="cpu")
    found = dict(loaded.model.named_modules())
    sums = {m: np.zeros((found[m].in_features,) * 2) for m in modules}

    def record(name: str):
        def hook(module, args) -> None:
            x = args[0][0].double().numpy()  # (tokens, in)
            sums[name] += x.T @ x

        return hook

    hooks = [found[m].register_forward_pre_hook(record(m)) for m in modules]
    sequences = tokenize_examples(load_examples(str(data)), loaded.tokenizer, "plain", 512)
    with torch.no_grad():
        for seq in sequences:
            loaded.model(input_ids=torch.tensor([seq]))
    for h in hooks:
        h.remove()
    return {m: 2.0 / len(sequences) * s for m, s in sums.items()}


def by_hand(tiny: dict[str, Path], data: Path) -> dict[str, dict[str, np.ndarray]]:
    aligned = load_file(tiny["model"] / "model.safetensors")
    adapter = load_file(tiny["adapter"] / "adapter_model.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    modules = sorted(k.split(".lora_A.")[0].removeprefix(PREFIX) for k in adapter if ".lora_A." in k)
    hessians = hessians_by_hand(tiny, data, modules)
    out = {}
    for m in modules:
        a = adapter[f"{PREFIX}{m}.lora_A.weight"].double().numpy()
        b = adapter[f"{PREFIX}{m}.lora_B.weight"].double().numpy()
        h = hessians[m] + 0.01 * np.mean(np.diag(hessians[m])) * np.eye(len(hessians[m]))
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
        cost = 1.0 / np.diag(u) ** 2
        delta = b @ a * (cfg["lora_alpha"] / cfg["r"])
        out[m] = {"W": aligned[f"{m}.weight"].double().numpy(), "delta": delta, "H": h, "cost": cost}
    return out


def kept_by_hand(e: dict[str, np.ndarray], s: float, exclude: float = 0.15) -> tuple[np.ndarray, float]:
    rows, cols = e["delta"].shape
    cost = np.broadcast_to(e["cost"], (rows, cols)).reshape(-1)
    loss = (e["delta"] ** 2).reshape(-1) * cost
    order = np.argsort(cost, kind="stable")[: rows * cols - int(exclude * rows * cols)]
    budget = s / 2 * rows / 4096 * e["cost"].mean()  # the authors' loss_constraint, whatever the width
    keep = np.zeros(rows * cols, dtype=bool)
    keep[order[np.cumsum(loss[order]) <= budget]] = True
    return keep.reshape(rows, cols), budget


def test_registered_as_a_post_defense_reading_safe_data() -> None:
    defense = get("safedelta")
    assert defense.stage == "post" and {"data", "scale", "max_samples", "damp"} <= set(defense.options())


def test_kept_entries_fill_the_safety_budget_cheapest_first(tiny, safe_data, tmp_path: Path) -> None:
    expected = by_hand(tiny, safe_data)
    first = expected["model.layers.0.self_attn.q_proj"]
    rows = first["delta"].shape[0]
    # An s whose budget is 30% of the first layer's total loss: some entries kept, not all.
    s = 0.3 * float(((first["delta"] ** 2) * first["cost"]).sum()) / (rows / 2 / 4096 * first["cost"].mean())
    out = tmp_path / "out"
    argv = [
        "defend",
        "safedelta",
        str(tiny["model"]),
        "--adapter",
        str(tiny["adapter"]),
        "--data",
        str(safe_data),
    ]
    assert (
        main(
            [
                *argv,
                "--template",
                "plain",
                "--scale",
                repr(float(s)),
                "--batch-size",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    masks = load_file(out / "safedelta_mask.safetensors")
    weights = load_file(out / "model.safetensors")
    aligned = load_file(tiny["model"] / "model.safetensors")
    assert set(masks) == {f"{m}.weight" for m in expected}
    fractions = []
    for m, e in expected.items():
        keep, budget = kept_by_hand(e, s)
        np.testing.assert_array_equal(masks[f"{m}.weight"].numpy(), keep, err_msg=m)
        loss = e["delta"] ** 2 * e["cost"]
        assert loss[keep].sum() <= budget
        fractions.append(keep.mean())
        new = weights[f"{m}.weight"].double().numpy()
        ft = e["W"] + e["delta"]
        np.testing.assert_allclose(new[keep], ft[keep], rtol=1e-6, atol=1e-7)  # kept: the fine-tuned value

        # The others compensate: the OBS proxy tr(E H E^T) of the change E from the aligned weight is lower
        # than with the kept delta alone.
        def proxy(w: np.ndarray, e: dict[str, np.ndarray] = e) -> float:
            change = w - e["W"]
            return float(np.trace(change @ e["H"] @ change.T))

        assert proxy(new) < proxy(e["W"] + keep * e["delta"]), m
    assert 0 < fractions[0] < 1 and max(fractions) > 0
    for name, w in aligned.items():  # no delta outside the LoRA layers: nothing moves there
        if name.removesuffix(".weight") not in expected:
            assert torch.equal(weights[name], w), name


def test_compensation_equals_column_by_column_obs() -> None:
    """The batched solve gives what SparseGPT's loop gives: one column at a time, a kept entry takes its
    fine-tuned value and (w - q) / u_jj times row j of U is taken off the later columns."""
    from antidote.defenses.safedelta import hessian_inverse_factor, safe_delta

    rng = np.random.default_rng(0)
    rows, cols = 6, 40
    x = rng.normal(size=(200, cols))
    h = 2 / 10 * x.T @ x
    w0 = rng.normal(size=(rows, cols))
    ft = w0 + 0.1 * rng.normal(size=(rows, cols))
    new, keep = safe_delta(torch.tensor(w0), torch.tensor(ft), torch.tensor(h), s=400, block_size=16, lazy=8)
    keep_np = keep.numpy()
    assert 0 < keep_np.mean() < 0.85
    u = hessian_inverse_factor(torch.tensor(h), 0.01).numpy()
    w = w0.copy()
    for j in range(cols):
        q = np.where(keep_np[:, j], ft[:, j], w[:, j])
        err = (w[:, j] - q) / u[j, j]
        w[:, j] = q
        w[:, j + 1 :] -= np.outer(err, u[j, j + 1 :])
    np.testing.assert_allclose(new.numpy(), w, rtol=1e-10, atol=1e-12)


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = ["defend", "safedelta", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 2
    assert "safedelta needs --data" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="--exclude is a fraction"):
        get("safedelta").config(model="m", adapter="a", data="d", exclude=1.0)
    assert not list(tmp_path.iterdir())


def test_runs_in_the_pipeline(tiny, tiny_run, safe_data, tmp_path: Path) -> None:
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    section = {"data": str(safe_data), "scale": 1000.0}
    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"safedelta": section}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    row = next(r for r in summary["rows"] if r["model"] == "safedelta")
    assert row["adapter"] is None
    report = json.loads((Path(row["model_path"]) / "safedelta_report.json").read_text())
    assert report["calibration"]["samples"] == len(HARMFUL) and report["kept_total"]["total"] > 0
