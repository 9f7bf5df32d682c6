"""`rollback` (gradient-guided rollback, Yang et al. 2025): the entries one step resets are exactly those a
brute-force reading of the authors' rule picks (sign(W_ft - W_aligned) == sign(g), then |g| above the k-th
largest among them, k = ceil(rate x all decoder-block parameters)), with g the gradient of -cos(batch mean
hidden state, harmful direction) computed here from transformers' own hidden_states; over several steps
every changed weight sits exactly at its aligned value and the harmful-direction cosine rises; rollback mode
and the checkpoint choice follow the task-accuracy limit."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get
from antidote.errors import AntidoteError
from conftest import HARMFUL, copy_run, make_model, make_tokenizer

PREFIX = "base_model.model."
EDITED_PREFIX = "model.layers.0."  # layer 1: only block 0 is edited


def finetuned_by_hand(tiny: dict[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(W_ft, W_aligned) per weight name, from the saved files alone."""
    aligned = load_file(tiny["model"] / "model.safetensors")
    adapter = load_file(tiny["adapter"] / "adapter_model.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    delta = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace("lora_A", "lora_B")]
            delta[key.split(".lora_A.")[0].removeprefix(PREFIX) + ".weight"] = (
                b @ a * (cfg["lora_alpha"] / cfg["r"])
            )
    return {k: w + delta[k] if k in delta else w for k, w in aligned.items()}, aligned


def model_with(weights: dict[str, torch.Tensor]) -> Any:
    """The tiny model with `weights`, its final norm replaced by the identity as the authors' truncated
    model has it (transformers applies it to the last entry of hidden_states)."""
    model = make_model(seed=0)
    model.load_state_dict(weights)
    model.model.norm = torch.nn.Identity()
    model.eval()
    return model


def states_by_hand(model: Any, prompts: list[str], layer: int) -> torch.Tensor:
    """(N, hidden): hidden_states[layer] at the last token, each prompt run alone (no padding)."""
    tok = make_tokenizer()
    rows = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1])
    return torch.stack(rows)


def grads_by_hand(
    model: Any, prompts: list[str], direction: torch.Tensor, layer: int, batch: int
) -> dict[str, torch.Tensor]:
    model.zero_grad()
    for i in range(0, len(prompts), batch):
        h = states_by_hand(model, prompts[i : i + batch], layer).mean(0)
        (-torch.nn.functional.cosine_similarity(h, direction, dim=0)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def brute_force_reset(
    current: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], k: int
) -> set[tuple[str, int]]:
    """Entry by entry, in plain Python: the sign-agreeing entries, then those with |g| above the k-th
    largest |g| among them."""
    candidates = []
    for name in current:
        for i, (w, a, g) in enumerate(
            zip(
                current[name].flatten().tolist(),
                anchor[name].flatten().tolist(),
                grads[name].flatten().tolist(),
                strict=True,
            )
        ):
            if (w - a > 0 and g > 0) or (w - a < 0 and g < 0):
                candidates.append((abs(g), name, i))
    values = sorted((c[0] for c in candidates), reverse=True)
    threshold = values[k - 1] if len(values) > k else -math.inf
    return {(name, i) for v, name, i in candidates if v > threshold}


def block_parameter_count() -> int:
    return sum(p.numel() for n, p in make_model(seed=0).named_parameters() if n.startswith("model.layers."))


def defend(tiny: dict[str, Path], out: Path, *options: str) -> dict[str, torch.Tensor]:
    argv = ["defend", "rollback", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--output", str(out)]
    argv += [
        "--data",
        str(tiny["harmful"]),
        "--template",
        "plain",
        "--max-task",
        "4",
        "--task-new-tokens",
        "2",
    ]
    assert main([*argv, *options]) == 0
    return load_file(out / "model.safetensors")


@pytest.fixture
def accuracy(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Task accuracies the defense will read, in order (the last one repeats); the tiny model scores 0."""
    from antidote.defenses import rollback

    scores: list[float] = [50.0]

    def fake(*args: Any, **kwargs: Any) -> float:
        return scores.pop(0) if len(scores) > 1 else scores[0]

    monkeypatch.setattr(rollback, "task_accuracy", fake)
    return scores


def test_registered_as_a_post_defense_with_the_authors_settings() -> None:
    defense = get("rollback")
    assert defense.stage == "post"
    config = defense.config(model="m", adapter="a")
    assert (config.rate, config.steps, config.warmup_steps, config.save_every) == (0.002, 20, 5, 5)
    assert (config.metric_drop, config.rollback_rate, config.batch_size, config.max_samples) == (
        0.05,
        0.2,
        8,
        256,
    )


def test_reset_masks_equal_a_brute_force_reading_of_the_rule() -> None:
    from antidote.defenses.rollback import reset_masks

    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (5, 7), "b": (13,)}
    current = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    anchor = {n: c.clone() for n, c in current.items()}
    for n in anchor:  # about half the entries differ from the anchor
        flip = torch.rand(shapes[n], generator=gen) < 0.5
        anchor[n][flip] += torch.randn(shapes[n], generator=gen)[flip]
    grads = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    grads["a"][0, :3] = 0.0
    for k in (1, 4, 9, 1000):
        masks = reset_masks(current, anchor, grads, count=k)
        got = {(n, i) for n, m in masks.items() for i in torch.nonzero(m.flatten()).flatten().tolist()}
        assert got == brute_force_reset(current, anchor, grads, k), k
        assert len(got) == min(k - 1, len(brute_force_reset(current, anchor, grads, 10**9))) or k == 1000
    # `fraction` within a mask: k = ceil(fraction x the candidates inside it)
    within = {n: torch.rand(s, generator=gen) < 0.6 for n, s in shapes.items()}
    masks = reset_masks(current, anchor, grads, fraction=0.2, within=within)
    inside = {n: torch.where(within[n], grads[n], torch.zeros_like(grads[n])) for n in grads}
    n_candidates = len(brute_force_reset(current, anchor, inside, 10**9))
    expected = brute_force_reset(current, anchor, inside, math.ceil(0.2 * n_candidates))
    assert {
        (n, i) for n, m in masks.items() for i in torch.nonzero(m.flatten()).flatten().tolist()
    } == expected


def test_the_gradient_is_that_of_minus_cosine_at_the_chosen_layer(tiny) -> None:
    """Left-padded batches with a hook on block L-1 give transformers' hidden_states[L] of each prompt
    alone."""
    from antidote.defenses.rollback import accumulate_gradient, mean_direction

    ft, aligned = finetuned_by_hand(tiny)
    tok = make_tokenizer()
    prompts = [h["prompt"] for h in HARMFUL]
    ids = [tok(p)["input_ids"] for p in prompts]
    for layer in (1, 2):
        ref = model_with(aligned)
        direction = mean_direction(ref, layer, ids, 3, tok.pad_token_id)
        with torch.no_grad():
            by_hand = states_by_hand(ref, prompts, layer).mean(0)
        torch.testing.assert_close(direction, by_hand, rtol=1e-5, atol=1e-6)
        model = model_with(ft)
        accumulate_gradient(model, layer, ids, direction, 4, tok.pad_token_id)
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        expected = grads_by_hand(model_with(ft), prompts, direction, layer, 4)
        assert set(got) == set(expected)
        for n in got:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_one_step_resets_exactly_the_brute_force_entries(tiny, tmp_path: Path, accuracy) -> None:
    ft, aligned = finetuned_by_hand(tiny)
    out = defend(tiny, tmp_path / "out", "--layer", "1", "--steps", "1", "--warmup-steps", "1")
    prompts = [h["prompt"] for h in HARMFUL]
    with torch.no_grad():
        direction = states_by_hand(model_with(aligned), prompts, 1).mean(0)
    grads = grads_by_hand(model_with(ft), prompts, direction, 1, 8)
    edited = [n for n in grads if n.startswith(EDITED_PREFIX) and "layernorm" not in n]
    k = math.ceil(block_parameter_count() * 0.002)
    expected = brute_force_reset({n: ft[n] for n in edited}, aligned, grads, k)
    assert len(expected) == k - 1  # strictly above the k-th largest |g| (no ties here)
    got = set()
    for name, w in out.items():
        changed = torch.nonzero((w != ft[name]).flatten()).flatten().tolist()
        got |= {(name, i) for i in changed}
        torch.testing.assert_close(w.flatten()[changed], aligned[name].flatten()[changed], rtol=0, atol=0)
    assert got == expected
    report = json.loads((tmp_path / "out" / "rollback_report.json").read_text())
    assert (
        report["reset_per_step"] == k and report["chosen_step"] == 1 and report["steps"][0]["reset"] == k - 1
    )


def test_steps_move_weights_exactly_to_aligned_and_raise_the_harmful_cosine(
    tiny, tmp_path: Path, accuracy
) -> None:
    ft, aligned = finetuned_by_hand(tiny)
    out = defend(
        tiny,
        tmp_path / "out",
        "--layer",
        "1",
        "--rate",
        "0.01",
        "--steps",
        "6",
        "--warmup-steps",
        "2",
        "--save-every",
        "2",
    )
    changed_total = 0
    for name, w in out.items():
        changed = w != ft[name]
        if changed.any():
            assert name.startswith(EDITED_PREFIX) and "layernorm" not in name, name
            assert torch.equal(w[changed], aligned[name][changed]), name
        changed_total += int(changed.sum())
    report = json.loads((tmp_path / "out" / "rollback_report.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [2, 4, 6] and report["chosen_step"] == 6
    assert changed_total == report["at_aligned"] > report["steps"][0]["reset"] > 0
    prompts = [h["prompt"] for h in HARMFUL]
    with torch.no_grad():
        direction = states_by_hand(model_with(aligned), prompts, 1).mean(0)
        before = torch.nn.functional.cosine_similarity(
            states_by_hand(model_with(ft), prompts, 1).mean(0), direction, dim=0
        )
        after = torch.nn.functional.cosine_similarity(
            states_by_hand(model_with(out), prompts, 1).mean(0), direction, dim=0
        )
    assert after > before
    assert report["harmful_cosine"]["written"] == pytest.approx(float(after), abs=1e-5)


def test_rollback_mode_and_the_checkpoint_choice_follow_the_accuracy_limit(
    tiny, tmp_path: Path, accuracy
) -> None:
    ft, aligned = finetuned_by_hand(tiny)
    options = ("--layer", "1", "--rate", "0.01", "--steps", "6", "--warmup-steps", "2", "--save-every", "2")
    # fine-tuned 50; after the warm-up 40 < 47.5: rollback mode from W_ft; checkpoints 2, 4 pass, 6 fails
    accuracy[:] = [50.0, 40.0, 49.0, 48.0, 47.5]
    out = defend(tiny, tmp_path / "a", *options)
    report = json.loads((tmp_path / "a" / "rollback_report.json").read_text())
    assert report["rollback_mode"] and report["chosen_step"] == 4
    assert [c["step"] for c in report["checkpoints"]] == [2, 4, 6]
    rollback_steps = [s for s in report["steps"] if s.get("rollback_mode")]
    assert [s["step"] for s in rollback_steps] == [1, 2, 3, 4, 5, 6]
    assert all(0 < s["undone"] <= math.ceil(0.2 * s["reset"]) for s in rollback_steps)
    for name, w in out.items():  # every entry is either fine-tuned or aligned
        assert torch.equal((w == ft[name]) | (w == aligned[name]), torch.ones_like(w, dtype=torch.bool)), name
    # the same run stopped at step 4 writes the same model
    accuracy[:] = [50.0, 40.0, 49.0, 48.0]
    shorter = defend(tiny, tmp_path / "b", *options[:5], "4", *options[6:])
    assert all(torch.equal(out[n], shorter[n]) for n in out)
    # no rollback mode: the warm-up model is kept going from; the first checkpoint failing writes W_ft
    accuracy[:] = [50.0, 40.0]
    out = defend(tiny, tmp_path / "c", *options, "--no-rollback")
    report = json.loads((tmp_path / "c" / "rollback_report.json").read_text())
    assert not report["rollback_mode"] and report["chosen_step"] == 0
    assert all(torch.equal(out[n], ft[n]) for n in out)


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = [
        "defend",
        "rollback",
        str(tiny["model"]),
        "--adapter",
        str(tiny["adapter"]),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--rate", "0"]) == 2
    assert "--rate is a fraction in (0, 1)" in capsys.readouterr().err
    assert main([*argv, "--layer", "3"]) != 0
    assert "beyond the model's 2 decoder blocks" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="--warmup-steps must be in"):
        get("rollback").config(model="m", adapter="a", steps=3, warmup_steps=4)
    with pytest.raises(AntidoteError, match="needs --task-data"):
        get("rollback").config(model="m", adapter="a", task="sst2")
    assert not (tmp_path / "o").exists()


def test_runs_in_the_pipeline(tiny, tiny_run, tmp_path: Path) -> None:
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    section = {"data": str(tiny["harmful"]), "steps": 2, "warmup_steps": 1, "save_every": 1, "max_task": 3}
    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"rollback": section}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    row = next(r for r in summary["rows"] if r["model"] == "rollback")
    assert row["adapter"] is None
    report = json.loads((Path(row["model_path"]) / "rollback_report.json").read_text())
    assert report["template"] == "plain" and report["config"]["steps"] == 2
    # the tiny model scores 0 on the task: nothing to lose, so every step runs (their rule kept none)
    assert (
        report["task_accuracy"]["fine_tuned"] == 0 and report["chosen_step"] == 2 and report["at_aligned"] > 0
    )


def test_in_a_run_it_guards_the_attack_task_unless_told_otherwise(tmp_path: Path) -> None:
    """A run (or a compare cell) whose attack trains on SST-2 makes rollback guard SST-2 accuracy on the
    validate section's SST-2 items, with the attack's SST-2 data as the benign direction and the task's
    own answer length; before, it guarded the built-in sentiment task whatever the attack was."""
    from antidote.configfile import config_from_mapping
    from antidote.experiments.runconfig import RunConfig, defense_config, placeholders

    rows = [{"sentence": f"a fine film number {k}", "label": k % 2} for k in range(4)]
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    for path in (train, heldout):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mapping: dict[str, Any] = {
        "finetune": {"task": "sst2", "task_data": str(train), "harmful": "builtin"},
        "validate": {"task": "sst2", "task_data": str(heldout)},
        "defenses": {"rollback": {}},
    }
    defense = get("rollback")

    def options(section: dict[str, Any]) -> Any:
        config = config_from_mapping(RunConfig, {**mapping, "defenses": {"rollback": section}}, "test")
        return defense_config(config, defense, placeholders(defense))

    cfg = options({})
    assert (cfg.task, cfg.task_data, cfg.benign_data) == ("sst2", str(heldout), str(train))
    assert cfg.task_new_tokens == 200  # the task's own length (the authors' SST-2 budget)
    assert options({"task_new_tokens": 16, "task_data": str(train)}).task_new_tokens == 16  # the user wins
    mapping["finetune"] = {"task": "sentiment", "harmful": "builtin"}  # a built-in task: rollback's defaults
    builtin = options({})
    assert (builtin.task, builtin.task_data, builtin.benign_data, builtin.task_new_tokens) == (
        "sentiment",
        None,
        None,
        8,
    )
