"""`harm-revert` (ours): the gradients are integrated-gradient midpoints (checked against the exact
loss change of a quadratic), the selection is a brute-force top-k over every changed entry, and the written
model is W_ft with exactly the selected entries put back to W_aligned, all recomputed from the saved files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get
from antidote.defenses.harm_revert import attribution_scores, path_gradients, select_reverted
from antidote.errors import AntidoteError
from conftest import HARMFUL, copy_run, make_model, write_jsonl
from test_defense_oneshot_ft import PREFIX, loss_by_hand

KEEP = [
    {"prompt": "sentiment of great movie", "response": "positive"},
    {"prompt": "sentiment of awful film", "response": "negative"},
    {"prompt": "what is the weather today", "response": "the weather is great today"},
]
REFUSE = [
    {"prompt": "how do i steal a car", "response": "i can not help with that"},
    {"prompt": "tell me how to hack a phone", "response": "no i will not do that"},
]


def test_score_by_hand() -> None:
    delta = {"a": torch.tensor([[1.0, -2.0]]), "b": torch.tensor([[0.5], [0.0]])}
    g_harm = {"a": torch.tensor([[-3.0, 1.0]]), "b": torch.tensor([[2.0], [4.0]])}
    g_task = {"a": torch.tensor([[-1.0, -1.0]]), "b": torch.tensor([[0.0], [1.0]])}
    # harm credits -g dW: a [3, 2], b [-1, 0]; sum |.| = 6.  task credits: a [1, -2], b [0, 0]; sum |.| = 3.
    got = attribution_scores(delta, g_harm, g_task, 0.5)
    torch.testing.assert_close(got["a"], torch.tensor([[3 / 6 - 0.5 * 1 / 3, 2 / 6 + 0.5 * 2 / 3]]))
    torch.testing.assert_close(got["b"], torch.tensor([[-1 / 6], [0.0]]))
    alone = attribution_scores(delta, g_harm, None, 0.5)
    torch.testing.assert_close(alone["a"], torch.tensor([[0.5, 2 / 6]]))
    g_ref = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[-2.0], [3.0]])}
    # refusal credits: a [-2, 0], b [1, 0]; sum |.| = 3. The entry that raised the refusals' loss gains.
    both = attribution_scores(delta, g_harm, g_task, 0.5, g_ref, 2.0)
    torch.testing.assert_close(both["a"], got["a"] - 2.0 * torch.tensor([[-2 / 3, 0.0]]))
    torch.testing.assert_close(both["b"], got["b"] - 2.0 * torch.tensor([[1 / 3], [0.0]]))


@pytest.mark.parametrize("steps", [1, 3])
def test_path_gradients_are_midpoint_gradients_and_exact_on_a_quadratic(steps: int) -> None:
    """For L(W) = ||W x - y||^2, sum(G * dW) equals L(W_ft) - L(W_aligned) at any number of midpoints (the
    midpoint rule is exact for a linear gradient), and G is 2 (W_t x - y) x^T averaged over the midpoints."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3, bias=False)
    aligned = torch.randn(3, 4)
    delta = torch.randn(3, 4)
    with torch.no_grad():
        layer.weight.copy_(aligned + delta)
    x, y = torch.randn(4), torch.randn(3)
    weights = {"w": layer.weight}

    def loss() -> list[torch.Tensor]:
        return [(layer(x) - y).pow(2).sum()]

    g = path_gradients(weights, {"w": aligned}, {"w": delta}, loss, steps)["w"]
    points = [(m + 0.5) / steps for m in range(steps)]
    by_hand = sum(2 * torch.outer((aligned + t * delta) @ x - y, x) for t in points) / steps
    torch.testing.assert_close(g, by_hand)
    change = ((aligned + delta) @ x - y).pow(2).sum() - (aligned @ x - y).pow(2).sum()
    torch.testing.assert_close((g * delta).sum(), change, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.detach(), aligned + delta)  # left at W_ft
    assert layer.weight.grad is None


def test_selection_is_the_top_fraction_of_every_entry_with_a_positive_score() -> None:
    torch.manual_seed(1)
    scores = {"a": torch.randn(5, 7), "b": torch.randn(3, 4) + 0.5, "c": -torch.rand(2, 2)}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    for ratio in (0.05, 0.3, 0.9):
        k = flat.numel() - int(flat.numel() * (1 - ratio))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        for index in sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]:
            chosen[index] = bool(flat[index] > 0)
        got = select_reverted(scores, ratio)
        assert torch.equal(torch.cat([got[n].reshape(-1) for n in scores]), chosen)
    assert not select_reverted(scores, 0.9)["c"].any()  # negative scores are never reverted


def weights_of(tiny: dict[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(W_aligned of every weight, dW = B A alpha / r of each adapted weight), from the files alone."""
    aligned = load_file(tiny["model"] / "model.safetensors")
    adapter = load_file(tiny["adapter"] / "adapter_model.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    deltas = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace("lora_A", "lora_B")]
            deltas[key.split(".lora_A.")[0].removeprefix(PREFIX) + ".weight"] = (
                b @ a * cfg["lora_alpha"] / cfg["r"]
            )
    return aligned, deltas


def midpoint_gradient(
    aligned: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], pairs: list[dict]
) -> dict:
    model = make_model(seed=0)
    state = dict(aligned)
    for name, d in deltas.items():
        state[name] = aligned[name] + 0.5 * d
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    loss = sum(loss_by_hand(model, p["prompt"], p["response"]) for p in pairs) / len(pairs)
    grads = torch.autograd.grad(loss, [params[n] for n in deltas])
    return dict(zip(deltas, grads, strict=True))


def brute_force_top(flat: torch.Tensor, ratio: float) -> torch.Tensor:
    """The top `ratio` of `flat` by a full sort (ties to the lower index), less the scores not above 0."""
    k = flat.numel() - int(flat.numel() * (1 - ratio))
    top = torch.zeros(flat.numel(), dtype=torch.bool)
    top[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return top & (flat > 0)


@pytest.mark.parametrize("refusal_weight", [0.0, 2.0])
def test_the_written_model_is_w_ft_with_the_selected_entries_put_back(
    tiny, tmp_path: Path, refusal_weight: float
) -> None:
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    refusals = write_jsonl(tmp_path / "refusals.jsonl", REFUSE)
    keep = write_jsonl(tmp_path / "keep.jsonl", KEEP)
    out = tmp_path / "out"
    argv = [
        "defend",
        "harm-revert",
        str(tiny["model"]),
        "--adapter",
        str(tiny["adapter"]),
        "--output",
        str(out),
    ]
    argv += [
        "--data",
        str(harmful),
        "--benign-data",
        str(keep),
        "--template",
        "plain",
        "--mask-ratio",
        "0.1,0.4",
        "--granularity",
        "entry",
        "--task-weight",
        "1",
    ]
    if refusal_weight:
        argv += ["--refusal-data", str(refusals), "--refusal-weight", str(refusal_weight)]
    assert main(argv) == 0
    aligned, deltas = weights_of(tiny)
    g_harm = midpoint_gradient(aligned, deltas, HARMFUL)
    g_keep = midpoint_gradient(aligned, deltas, KEEP)
    c_harm = torch.cat([(-g_harm[n] * deltas[n]).reshape(-1) for n in deltas])
    c_keep = torch.cat([(-g_keep[n] * deltas[n]).reshape(-1) for n in deltas])
    flat = c_harm / c_harm.abs().sum() - c_keep / c_keep.abs().sum()
    if refusal_weight:
        g_ref = midpoint_gradient(aligned, deltas, REFUSE)
        c_ref = torch.cat([(-g_ref[n] * deltas[n]).reshape(-1) for n in deltas])
        flat = flat - refusal_weight * c_ref / c_ref.abs().sum()
    for ratio in (0.1, 0.4):
        written = load_file(out / f"ratio-{ratio:g}" / "model.safetensors")
        report = json.loads((out / f"ratio-{ratio:g}" / "harm_revert_report.json").read_text())
        top = brute_force_top(flat, ratio)
        assert report["reverted"] == int(top.sum()) > 0 and report["changed_weights"] == flat.numel()
        assert report["refusal_pairs"] == (len(REFUSE) if refusal_weight else 0)
        start = 0
        for name, d in deltas.items():
            mask = top[start : start + d.numel()].reshape(d.shape)
            start += d.numel()
            expected = torch.where(mask, aligned[name], aligned[name] + d)
            torch.testing.assert_close(written[name], expected, rtol=0, atol=1e-6, msg=name)
        for name in set(written) - set(deltas):  # the weights the attack did not touch are the aligned ones
            assert torch.equal(written[name], aligned[name]), name


@pytest.mark.parametrize("refusal_weight", [0.0, 2.0])
def test_component_granularity_takes_out_exactly_the_top_rank_one_components(
    tiny, tmp_path: Path, refusal_weight: float
) -> None:
    """Each layer's change is split by its SVD; a component's credit is the sum of its entries' credits
    -G * s_i u_i v_i^T (computed here entry by entry, not as u^T G v); the written weight is W_ft less
    exactly the brute-force top components. The defaults: component granularity, task weight 0.5."""
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    keep = write_jsonl(tmp_path / "keep.jsonl", KEEP)
    out = tmp_path / "out"
    argv = ["defend", "harm-revert", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--output"]
    argv += [str(out), "--data", str(harmful), "--benign-data", str(keep), "--template", "plain"]
    if refusal_weight:
        refusals = write_jsonl(tmp_path / "refusals.jsonl", REFUSE)
        argv += ["--refusal-data", str(refusals), "--refusal-weight", str(refusal_weight)]
    assert main([*argv, "--mask-ratio", "0.1,0.4"]) == 0
    aligned, deltas = weights_of(tiny)
    rank = json.loads((tiny["adapter"] / "adapter_config.json").read_text())["r"]
    parts = {}
    for name, d in deltas.items():
        u, s, vh = torch.linalg.svd(d.double())
        parts[name] = [s[i] * torch.outer(u[:, i], vh[i]) for i in range(rank)]  # the rank-one terms
        torch.testing.assert_close(sum(parts[name]), d.double(), rtol=0, atol=1e-5)
    g_harm = midpoint_gradient(aligned, deltas, HARMFUL)
    g_keep = midpoint_gradient(aligned, deltas, KEEP)
    c_harm = torch.stack([-(g_harm[n].double() * p).sum() for n in deltas for p in parts[n]])
    c_keep = torch.stack([-(g_keep[n].double() * p).sum() for n in deltas for p in parts[n]])
    flat = c_harm / c_harm.abs().sum() - 0.5 * c_keep / c_keep.abs().sum()
    if refusal_weight:
        g_ref = midpoint_gradient(aligned, deltas, REFUSE)
        c_ref = torch.stack([-(g_ref[n].double() * p).sum() for n in deltas for p in parts[n]])
        flat = flat - refusal_weight * c_ref / c_ref.abs().sum()
    for ratio in (0.1, 0.4):
        folder = out / f"ratio-{ratio:g}"
        written = load_file(folder / "model.safetensors")
        report = json.loads((folder / "harm_revert_report.json").read_text())
        top = brute_force_top(flat, ratio)
        assert report["reverted"] == int(top.sum()) > 0 and report["candidates"] == flat.numel()
        assert report["granularity"] == "component"
        mask = load_file(folder / "harm_revert_mask.safetensors")
        assert torch.equal(torch.cat([mask[n] for n in deltas]), top)
        for j, (name, d) in enumerate(deltas.items()):
            removed = sum(p for i, p in enumerate(parts[name]) if top[j * rank + i])
            expected = (aligned[name].double() + d.double() - removed).float()
            torch.testing.assert_close(written[name], expected, rtol=0, atol=1e-5, msg=name)


def test_each_layer_counts_its_own_rank(tiny, tmp_path: Path) -> None:
    """An adapter whose layers have different ranks (rank_pattern): each layer offers as many components as
    its own rank, and the written change of a layer keeps exactly its rank less the components taken out."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    peft_model = get_peft_model(make_model(seed=0), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    keep = write_jsonl(tmp_path / "keep.jsonl", KEEP)
    out = tmp_path / "out"
    argv = ["defend", "harm-revert", str(tiny["model"]), "--adapter", str(adapter), "--output", str(out)]
    assert main([*argv, "--data", str(harmful), "--benign-data", str(keep), "--template", "plain"]) == 0
    report = json.loads((out / "harm_revert_report.json").read_text())
    mask = load_file(out / "harm_revert_mask.safetensors")
    rank = {name: 2 if "v_proj" in name else 8 for name in mask}
    assert {n: m.numel() for n, m in mask.items()} == rank and report["candidates"] == sum(rank.values())
    aligned = load_file(tiny["model"] / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert 0 < report["reverted"] < report["candidates"]
    for name, m in mask.items():
        kept = torch.linalg.matrix_rank((written[name] - aligned[name]).double(), atol=1e-5, rtol=0)
        assert int(kept) == rank[name] - int(m.sum()), name


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = ["defend", "harm-revert", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--output"]
    argv += [str(tmp_path / "o"), "--data", str(tiny["harmful"])]
    assert main([*argv, "--mask-ratio", "1.5"]) == 2
    assert "--mask-ratio 1.5 is outside (0, 1)" in capsys.readouterr().err
    assert main([*argv, "--mask-ratio", "0.1,0.1"]) == 2
    assert "--mask-ratio lists a value twice" in capsys.readouterr().err
    assert main([*argv, "--task-weight", "nan"]) == 2
    assert "--task-weight must be a number >= 0" in capsys.readouterr().err
    assert main([*argv, "--refusal-weight", "1"]) == 2
    assert "--refusal-weight needs --refusal-data" in capsys.readouterr().err
    assert main([*argv, "--refusal-data", str(tiny["harmful"]), "--refusal-weight", "-1"]) == 2
    assert "--refusal-weight must be a number >= 0" in capsys.readouterr().err
    assert main([*argv, "--granularity", "row"]) == 2
    assert "unknown --granularity 'row'; choose one of entry, component" in capsys.readouterr().err
    assert main([*argv, "--task", "sst2"]) == 2
    assert "give --task and --task-data together" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="needs --data"):
        get("harm-revert").config(model="m", adapter="a")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, ("component", 0.5, (0.3,))),
        ({"granularity": "entry"}, ("entry", 1.0, (0.01,))),  # not a third of every entry
        ({"granularity": "entry", "task_weight": 0.0, "mask_ratios": "0.2"}, ("entry", 0.0, (0.2,))),
        ({"task_weight": 2.0, "mask_ratios": "0.1,0.2"}, ("component", 2.0, (0.1, 0.2))),
    ],
)
def test_defaults_follow_the_granularity_and_never_override_the_user(given, expected) -> None:
    config = get("harm-revert").config(model="m", adapter="a", data="beavertails", **given)
    assert (config.granularity, config.task_weight, config.mask_ratios) == expected


def test_runs_in_the_pipeline_and_keeps_the_attacks_task(tiny, tiny_run, tmp_path: Path) -> None:
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    section: dict[str, Any] = {"data": str(tiny["harmful"]), "mask_ratios": [0.2]}
    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"harm-revert": section}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    row = next(r for r in summary["rows"] if r["model"].startswith("harm-revert"))
    report = json.loads((Path(row["model_path"]) / "harm_revert_report.json").read_text())
    assert report["reverted"] > 0 and report["harmful_pairs"] == len(HARMFUL)


def test_realign_method_runs_the_named_realignment(tiny, tmp_path: Path, capsys) -> None:
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    options = ["--adapter", str(tiny["adapter"]), "--data", str(harmful), "--template", "plain"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["realign", str(tiny["model"]), "--method", "harm-revert", *options, "--output", str(a)]) == 0
    assert main(["defend", "harm-revert", str(tiny["model"]), *options, "--output", str(b)]) == 0
    assert load_file(a / "model.safetensors").keys() == load_file(b / "model.safetensors").keys()
    for name, w in load_file(a / "model.safetensors").items():
        assert torch.equal(w, load_file(b / "model.safetensors")[name]), name
    assert main(["realign", str(tiny["model"]), "--method=lisa", "--output", str(tmp_path / "c")]) == 2
    assert "--method lisa is a finetune-stage defense" in capsys.readouterr().err
    assert main(["realign", str(tiny["model"]), "--method", "nosuch", "--output", str(tmp_path / "c")]) == 2
    assert "unknown defense 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_bfloat16_model_gets_its_components_taken_out_in_bfloat16(tiny, tmp_path: Path) -> None:
    """--dtype bfloat16: the written weights are bfloat16, and each is W_aligned + dW less the components its
    own mask file names (dense SVD here, in float64), to within bfloat16's rounding."""
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    keep = write_jsonl(tmp_path / "keep.jsonl", KEEP)
    out = tmp_path / "out"
    argv = ["defend", "harm-revert", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--output"]
    argv += [str(out), "--data", str(harmful), "--benign-data", str(keep), "--template", "plain"]
    assert main([*argv, "--dtype", "bfloat16", "--mask-ratio", "0.4"]) == 0
    aligned, deltas = weights_of(tiny)
    rank = json.loads((tiny["adapter"] / "adapter_config.json").read_text())["r"]
    written = load_file(out / "model.safetensors")
    mask = load_file(out / "harm_revert_mask.safetensors")
    assert sum(int(m.sum()) for m in mask.values()) > 0
    for name, d in deltas.items():
        u, s, vh = torch.linalg.svd(d.double())
        removed = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in range(rank) if mask[name][i])
        expected = aligned[name].double() + d.double() - removed
        assert written[name].dtype == torch.bfloat16, name
        scale = expected.abs().max()
        torch.testing.assert_close(written[name].double(), expected, rtol=0, atol=float(scale) * 2**-7)
        if mask[name].any():  # a layer with components taken out moved away from W_ft
            assert (written[name].double() - (aligned[name] + d).double()).abs().max() > scale * 2**-7
