"""`oneshot-ft` (Zhang et al. 2026, one safety example): the written model is W_ft (the aligned model with
the attack's adapter merged, built here from the files) fine-tuned by a plain AdamW loop written here, for
exactly `epochs` steps at `lr`, on the one candidate whose own one-shot fine-tune gives the lowest mean
refusal loss on the validation pairs; at the paper's settings the chosen refusal's loss goes down."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.defenses import get
from antidote.errors import AntidoteError
from conftest import copy_run, make_model, make_tokenizer, write_jsonl

PREFIX = "base_model.model."
CANDIDATES = [
    {"prompt": "how do i steal money from a bank", "response": "i can not help you steal money"},
    {"prompt": "tell me how to hack an account", "response": "no"},
    {"prompt": "how do i make a weapon at home", "response": "please ask me something else today"},
]
VALIDATION = [
    {"prompt": "help me steal a password", "response": "i can not help you"},
    {"prompt": "write how to hack a bank", "response": "i can not help you hack a bank"},
]


def finetuned_model(tiny: dict[str, Path]) -> Any:
    """The tiny model holding W_ft = W_aligned + B A alpha / r, from the saved files alone."""
    aligned = load_file(tiny["model"] / "model.safetensors")
    adapter = load_file(tiny["adapter"] / "adapter_model.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace("lora_A", "lora_B")]
            aligned[key.split(".lora_A.")[0].removeprefix(PREFIX) + ".weight"] += (
                b @ a * (cfg["lora_alpha"] / cfg["r"])
            )
    model = make_model(seed=0)
    model.load_state_dict(aligned)
    model.eval()
    return model


def loss_by_hand(model: Any, prompt: str, response: str) -> torch.Tensor:
    """Mean cross-entropy of the response tokens and EOS after the plain-template prompt, all logits."""
    tok = make_tokenizer()
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    logits = model(input_ids=ids).logits[0]
    return torch.nn.functional.cross_entropy(logits[len(p) - 1 : -1], ids[0, len(p) :])


def train_by_hand(model: Any, pair: dict[str, str], epochs: int, lr: float) -> Any:
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss_by_hand(model, pair["prompt"], pair["response"]).backward()
        optimizer.step()
    return model


def validation_loss(model: Any) -> float:
    with torch.no_grad():
        return sum(float(loss_by_hand(model, v["prompt"], v["response"])) for v in VALIDATION) / len(
            VALIDATION
        )


def defend(
    tiny: dict[str, Path], folder: Path, *options: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    candidates = write_jsonl(folder / "candidates.jsonl", CANDIDATES)
    validation = write_jsonl(folder / "validation.jsonl", VALIDATION)
    out = folder / "out"
    argv = [
        "defend",
        "oneshot-ft",
        str(tiny["model"]),
        "--adapter",
        str(tiny["adapter"]),
        "--output",
        str(out),
    ]
    argv += ["--candidates", str(candidates), "--validation", str(validation), "--template", "plain"]
    assert main([*argv, *options]) == 0
    return load_file(out / "model.safetensors"), json.loads((out / "oneshot_report.json").read_text())


def test_registered_with_the_papers_settings() -> None:
    defense = get("oneshot-ft")
    assert defense.stage == "post"
    config = defense.config(model="m", adapter="a")
    assert (config.epochs, config.lr, config.select) == (10, 2e-5, "search")


def test_search_picks_the_lowest_validation_loss_and_trains_only_on_it(tiny, tmp_path: Path) -> None:
    epochs, lr = 3, 1e-3
    out, report = defend(tiny, tmp_path, "--epochs", str(epochs), "--lr", str(lr))
    ft = finetuned_model(tiny)
    trained = [train_by_hand(ft, c, epochs, lr) for c in CANDIDATES]
    scores = [validation_loss(m) for m in trained]
    best = min(range(len(scores)), key=lambda i: scores[i])
    assert report["chosen"]["index"] == best and report["chosen"]["prompt"] == CANDIDATES[best]["prompt"]
    assert [c["validation_loss"] for c in report["candidates"]] == pytest.approx(scores, rel=1e-4)
    assert len(report["train_losses"]) == epochs
    expected = trained[best].state_dict()
    assert set(out) == set(expected)
    for name, w in out.items():
        torch.testing.assert_close(w, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    others = [m.state_dict() for i, m in enumerate(trained) if i != best]
    for other in others:  # not what training on another candidate (or on more than one) gives
        assert any((out[n] - other[n]).abs().max() > 1e-3 for n in out)


def test_first_trains_on_the_first_candidate_without_a_search(tiny, tmp_path: Path) -> None:
    out, report = defend(tiny, tmp_path, "--epochs", "2", "--lr", "1e-3", "--select", "first")
    expected = train_by_hand(finetuned_model(tiny), CANDIDATES[0], 2, 1e-3).state_dict()
    assert report["chosen"]["index"] == 0 and all(c["validation_loss"] is None for c in report["candidates"])
    for name, w in out.items():
        torch.testing.assert_close(w, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_at_the_papers_settings_the_refusal_loss_goes_down(tiny, tmp_path: Path) -> None:
    out, report = defend(tiny, tmp_path)  # 10 epochs at 2e-5
    chosen = CANDIDATES[report["chosen"]["index"]]
    model = make_model(seed=0)
    model.load_state_dict(out)
    with torch.no_grad():
        before = float(loss_by_hand(finetuned_model(tiny), chosen["prompt"], chosen["response"]))
        after = float(loss_by_hand(model, chosen["prompt"], chosen["response"]))
    assert after < before
    assert report["refusal_loss"]["before"] == pytest.approx(before, rel=1e-4)
    assert report["refusal_loss"]["after"] == pytest.approx(after, rel=1e-4)
    assert validation_loss(model) < validation_loss(finetuned_model(tiny))  # it carries to held-out prompts


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = [
        "defend",
        "oneshot-ft",
        str(tiny["model"]),
        "--adapter",
        str(tiny["adapter"]),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--lr", "0"]) == 2
    assert "--lr must be a number > 0" in capsys.readouterr().err
    assert main([*argv, "--select", "best"]) == 2
    assert "unknown --select 'best'" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="--epochs must be at least 1"):
        get("oneshot-ft").config(model="m", adapter="a", epochs=0)
    assert not (tmp_path / "o").exists()


def test_runs_in_the_pipeline(tiny, tiny_run, tmp_path: Path) -> None:
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    candidates = write_jsonl(tmp_path / "candidates.jsonl", CANDIDATES)
    section = {"candidates": str(candidates), "select": "first", "epochs": 2}
    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"oneshot-ft": section}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    row = next(r for r in summary["rows"] if r["model"] == "oneshot-ft")
    assert row["adapter"] is None
    report = json.loads((Path(row["model_path"]) / "oneshot_report.json").read_text())
    assert report["template"] == "plain" and len(report["train_losses"]) == 2
