"""`wei-set-difference`: the mask equals, in every LoRA factor, top_q(Wanda on harmful data) minus
top_p(Wanda on utility data), brute-forced here: the statistics from a plain forward hook, one sample at
a time, over the response tokens only (the default, as the authors') or every token, the scores
|W| * sqrt(s), the top entries of the whole tensor (the default, as the authors') or of each row by a full
sort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.data import load_examples, tokenize_examples
from antidote.defenses import get
from antidote.errors import AntidoteError
from antidote.models import load_model
from conftest import copy_run


def wanda_by_hand(tiny: dict[str, Path], data: Path, response_only: bool) -> dict[str, torch.Tensor]:
    """Saved LoRA weight name -> |W| * sqrt(mean over samples of the sum over tokens of x^2), the tokens
    being those after the prompt when `response_only` (the prompt still runs through the model)."""
    loaded = load_model(str(tiny["model"]), adapter=str(tiny["adapter"]), dtype="float32", device="cpu")
    targets = {
        name: m
        for name, m in loaded.model.named_modules()
        if isinstance(m, torch.nn.Linear) and (".lora_A." in name or ".lora_B." in name)
    }
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in targets.items()}
    first = [0]

    def record(name: str):
        def hook(module, args, output) -> None:
            sums[name] += (args[0][0, first[0] :].double() ** 2).sum(0)  # (tokens, in) of the one sample

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in targets.items()]
    examples = load_examples(str(data))
    sequences = tokenize_examples(examples, loaded.tokenizer, "plain", 512)
    with torch.no_grad():
        for example, seq in zip(examples, sequences, strict=True):  # one at a time: no padding anywhere
            prompt = loaded.tokenizer(example.prompt)["input_ids"]  # the plain template: the prompt as is
            assert seq[: len(prompt)] == prompt and len(seq) > len(prompt)  # the response follows it
            first[0] = len(prompt) if response_only else 0
            loaded.model(input_ids=torch.tensor([seq]))
    for h in hooks:
        h.remove()
    return {
        name.removesuffix(".default") + ".weight": m.weight.detach().abs().double()
        * (sums[name] / len(sequences)).sqrt()
        for name, m in targets.items()
    }


def top_by_sort(scores: torch.Tensor, ratio: float, per_row: bool) -> torch.Tensor:
    """The k = n - int(n (1 - ratio)) largest entries of each row (or of the whole tensor), by sorting."""
    flat = scores if per_row else scores.reshape(1, -1)
    n = flat.shape[1]
    k = n - int(n * (1 - ratio))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.argsort(dim=1, descending=True)[:, :k], True)
    return mask.reshape(scores.shape)


def defend(tiny: dict[str, Path], out: Path, *options: str) -> int:
    argv = ["defend", "wei-set-difference", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    data = ["--data", str(tiny["harmful"]), "--utility-data", str(tiny["benign"]), "--template", "plain"]
    return main([*argv, *data, "--compute-dtype", "float32", "--output", str(out), *options])


def test_registered_as_a_post_defense_with_two_data_sets() -> None:
    defense = get("wei-set-difference")
    assert defense.stage == "post"
    assert {"data", "utility_data", "safety_ratios", "utility_ratio", "granularity"} <= set(defense.options())


@pytest.mark.parametrize("granularity", [None, "row"])
def test_mask_is_the_set_difference_of_the_two_top_fractions(
    tiny, tmp_path: Path, granularity: str | None
) -> None:
    """granularity None: the defaults (whole-tensor top fractions over response-token activations);
    row: per-row top fractions over every token's activations."""
    out = tmp_path / "out"
    options = ["--safety-ratio", "0.25,0.5", "--utility-ratio", "0.3", "--batch-size", "3"]
    if granularity is not None:
        options += ["--granularity", granularity, "--tokens", "all"]
    assert defend(tiny, out, *options) == 0
    safety = wanda_by_hand(tiny, tiny["harmful"], response_only=granularity is None)
    utility = wanda_by_hand(tiny, tiny["benign"], response_only=granularity is None)
    before = load_file(tiny["adapter"] / "adapter_model.safetensors")
    per_row = granularity == "row"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["q-0.25", "q-0.5"]
    for q in (0.25, 0.5):
        folder = out / f"q-{q:g}"
        masks = load_file(folder / "antidote_mask.safetensors")
        after = load_file(folder / "adapter_model.safetensors")
        assert set(masks) == set(safety) == set(before)
        some_spared = 0
        for name, s in safety.items():
            top_safety = top_by_sort(s, q, per_row)
            expected = top_safety & ~top_by_sort(utility[name], 0.3, per_row)
            assert torch.equal(masks[name], expected), (q, name)
            assert (after[name][expected] == 0).all() and torch.equal(
                after[name][~expected], before[name][~expected]
            )
            some_spared += int((top_safety & ~expected).sum())
        assert some_spared > 0  # the utility set really removed something from the safety top q
        report = json.loads((folder / "realign_report.json").read_text())
        assert report["method"] == "wei-set-difference" and report["safety_ratio"] == q


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path: Path, capsys) -> None:
    argv = ["defend", "wei-set-difference", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    assert main([*argv, "--data", str(tiny["harmful"]), "--output", str(tmp_path / "a")]) == 2
    assert "needs --utility-data" in capsys.readouterr().err
    assert defend(tiny, tmp_path / "b", "--utility-ratio", "1.5") == 2
    assert "--utility-ratio 1.5 is outside (0, 1)" in capsys.readouterr().err
    with pytest.raises(AntidoteError, match="unknown --granularity 'global'"):
        get("wei-set-difference").config(model="m", data="d", utility_data="u", granularity="global")
    assert not list(tmp_path.iterdir())


def test_runs_in_the_pipeline(tiny, tiny_run, tmp_path: Path) -> None:
    """In a run: one adapter row per q, named by q."""
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    section = {"data": str(tiny["harmful"]), "utility_data": str(tiny["benign"]), "safety_ratios": [0.2, 0.4]}
    path = copy_run(
        tiny_run, tiny, tmp_path, validate=None, evaluate_base=False, defenses={"wei-set-difference": section}
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    rows = {r["model"]: r for r in summary["rows"]}
    assert {"wei-set-difference@0.2", "wei-set-difference@0.4"} <= set(rows)
    assert (Path(rows["wei-set-difference@0.4"]["adapter"]) / "antidote_mask.safetensors").is_file()
