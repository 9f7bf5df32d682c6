"""The realignment package: score/granularity tables, config checks, the engine's loop and its results."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import antidote
from antidote.cli import main
from antidote.errors import AntidoteError
from antidote.realignment import engine
from antidote.realignment.config import RealignConfig, parse_ratios
from antidote.realignment.scores import GRANULARITIES, SCORES, ScoreSpec, num_selected
from conftest import HARMFUL, make_model

REPORT_KEYS = {
    "mask_ratio",
    "score",
    "granularity",
    "action",
    "targets",
    "pruned_total",
    "tensors",
    "calibration",
    "seconds",
    "memory",
    "config",
}


def realign_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "10000")  # no wrapping (argparse would also break words at hyphens)
        with pytest.raises(SystemExit):
            main(["realign", "--help"])
    return " ".join(capsys.readouterr().out.split())


# ---- the tables ---------------------------------------------------------------------------------------


def test_every_score_is_accepted_and_listed_in_help(capsys) -> None:
    text = realign_help(capsys)
    for name, spec in SCORES.items():
        config = RealignConfig(
            model="m", data="d.jsonl", score=name, benign_data="b.jsonl" if spec.needs_benign else None
        )
        assert config.score == name
        assert f"{name} ({' '.join(spec.help.split())})" in text


def test_every_granularity_is_accepted_and_listed_in_help(capsys) -> None:
    text = realign_help(capsys)
    for name, spec in GRANULARITIES.items():
        assert RealignConfig(model="m", data="d.jsonl", granularity=name).granularity == name
        assert f"{name} ({' '.join(spec.help.split())})" in text


@pytest.mark.parametrize(("option", "table"), [("score", SCORES), ("granularity", GRANULARITIES)])
def test_unknown_name_is_refused_with_the_list(option: str, table: dict[str, object]) -> None:
    with pytest.raises(AntidoteError) as err:
        RealignConfig(model="m", data="d.jsonl", **{option: "best"})
    message = str(err.value)
    assert "'best'" in message and "\n" not in message
    assert message.endswith("choose one of " + ", ".join(table))


def test_a_new_table_entry_is_validated_and_dispatched_without_other_edits(monkeypatch) -> None:
    # Every score equal: ties go to the lowest index, so each row keeps its first k columns.
    monkeypatch.setitem(SCORES, "flat", ScoreSpec("all equal", lambda i: torch.ones_like(i.weight).float()))
    assert RealignConfig(model="m", data="d.jsonl", score="flat").score == "flat"
    model = make_model()
    targets = antidote.find_targets(model)
    stats = antidote.collect_statistics(model, targets, [[5, 6, 7]], compute_dtype=None)
    masks = antidote.compute_masks(targets, stats, 0.1, score="flat", granularity="row")
    for name, mask in masks.items():
        k = num_selected(mask.shape[1], 0.1)
        expected = torch.zeros_like(mask)
        expected[:, :k] = True
        assert torch.equal(mask, expected), name


def test_engine_dispatch_refuses_unknown_names_with_the_list() -> None:
    model = make_model()
    targets = antidote.find_targets(model)
    stats = antidote.collect_statistics(model, targets, [[5, 6, 7]], compute_dtype=None)
    with pytest.raises(AntidoteError, match="choose one of wanda, magnitude, random, contrast"):
        antidote.compute_masks(targets, stats, 0.1, score="best")
    with pytest.raises(AntidoteError, match="choose one of row, layer, global"):
        antidote.compute_masks(targets, stats, 0.1, granularity="column")
    with pytest.raises(AntidoteError, match="--benign-data"):
        antidote.compute_masks(targets, stats, 0.1, score="contrast")


# ---- config ------------------------------------------------------------------------------------------


def test_parse_ratios() -> None:
    assert parse_ratios("0.01, 0.05,0.1") == (0.01, 0.05, 0.1)
    assert parse_ratios(0.2) == (0.2,)
    assert parse_ratios([0.1, "0.3"]) == (0.1, 0.3)


@pytest.mark.parametrize("value", ["0.1,,0.2", "0.1,", ",0.1", "0.1, ,0.2", "", [0.1, None]])
def test_parse_ratios_refuses_empty_items(value: object) -> None:
    with pytest.raises(AntidoteError, match="empty item"):
        parse_ratios(value)


def test_mask_ratio_with_empty_item_fails_cleanly_on_the_command_line(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["realign", tiny["model"], "--data", tiny["harmful"], "--mask-ratio", "0.1,,0.2", "--output", out]
    code = main([str(a) for a in argv])
    assert code == 2 and "empty item" in capsys.readouterr().err and not out.exists()


# ---- the engine ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["nothing_here", r"embed_tokens|norm"])  # the second: modules, no Linear
def test_targets_matching_no_linear_fail_before_calibration(tiny, monkeypatch, pattern: str) -> None:
    calls: list[int] = []
    monkeypatch.setattr(engine, "collect_statistics", lambda *a, **k: calls.append(1))
    with pytest.raises(AntidoteError) as err:
        antidote.realign(str(tiny["model"]), str(tiny["harmful"]), targets=pattern)
    assert "matches no Linear layer" in str(err.value) and "\n" not in str(err.value)
    assert calls == []


def test_merge_sweep_writes_full_models_equal_to_base_plus_masked_lora(tiny, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged-sweep"
    argv = ["realign", tiny["model"], "--adapter", tiny["adapter"], "--data", tiny["harmful"], "--merge"]
    argv += ["--mask-ratio", "0.2,0.5", "--compute-dtype", "float32", "--output", out]
    assert main([str(a) for a in argv]) == 0
    base = load_file(tiny["model"] / "model.safetensors")
    lora = load_file(tiny["adapter"] / "adapter_model.safetensors")
    cfg = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    sweep = json.loads((out / "sweep_report.json").read_text())
    assert [r["mask_ratio"] for r in sweep] == [0.2, 0.5]
    all_masks = {}
    for ratio in ("0.2", "0.5"):
        folder = out / f"alpha-{ratio}"
        assert not (folder / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        masks = all_masks[ratio] = load_file(folder / "antidote_mask.safetensors")
        assert set(masks) == set(lora)  # keyed by the adapter's names, every lora_A and lora_B
        lora_layers = set()
        for key in lora:
            if ".lora_A." not in key:
                continue
            prefix = key.split(".lora_A.")[0]  # base_model.model.<module>
            module = prefix.removeprefix("base_model.model.")
            a = lora[key] * ~masks[key]
            b = lora[f"{prefix}.lora_B.weight"] * ~masks[f"{prefix}.lora_B.weight"]
            expected = base[f"{module}.weight"] + scale * (b @ a)
            torch.testing.assert_close(merged[f"{module}.weight"], expected)
            lora_layers.add(f"{module}.weight")
        assert len(lora_layers) == 4
        for name, weight in base.items():  # everything else is the base model, bit for bit
            if name not in lora_layers:
                assert torch.equal(merged[name], weight), name
        report = json.loads((folder / "realign_report.json").read_text())
        assert set(report) == REPORT_KEYS and report["mask_ratio"] == float(ratio)
    # The 0.2 pass was undone before the 0.5 pass: 0.5 selects more, a superset of 0.2 (same scores).
    for key, small in all_masks["0.2"].items():
        large = all_masks["0.5"][key]
        assert torch.all(large[small]) and int(large.sum()) > int(small.sum())


def test_realign_sweep_returns_reports_and_leaves_the_model_as_it_was(tiny, tmp_path) -> None:
    loaded = antidote.load_model(str(tiny["model"]))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = antidote.realign_sweep(
        loaded, HARMFUL, mask_ratios=(0.1, 0.3), output=str(tmp_path / "sw"), compute_dtype="float32"
    )
    assert isinstance(result, antidote.SweepResult)
    assert [r["mask_ratio"] for r in result.reports] == [0.1, 0.3]
    assert result.folders == [tmp_path / "sw" / "alpha-0.1", tmp_path / "sw" / "alpha-0.3"]
    assert all(set(r) == REPORT_KEYS for r in result.reports)
    after = loaded.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # Each folder holds the original weights with exactly its own masks applied.
    for folder in result.folders:
        assert folder is not None
        saved = load_file(folder / "model.safetensors")
        masks = load_file(folder / "antidote_mask.safetensors")
        for name, weight in before.items():
            expected = weight.masked_fill(masks[name], 0) if name in masks else weight
            assert torch.equal(saved[name], expected), name


def test_realign_returns_the_pruned_model_and_its_masks(tiny) -> None:
    loaded = antidote.load_model(str(tiny["model"]), adapter=str(tiny["adapter"]))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = antidote.realign(loaded, HARMFUL, mask_ratio=0.25, compute_dtype="float32")
    assert isinstance(result, antidote.RealignResult) and result.output is None
    assert len(result.masks) == 8 and all(".lora_" in k for k in result.masks)
    state = result.model.state_dict()
    for saved, mask in result.masks.items():
        key = saved.replace(".weight", ".default.weight")  # the adapter name, dropped in saved files
        assert int(mask.sum()) == mask.shape[0] * num_selected(mask.shape[1], 0.25)
        assert torch.equal(state[key], before[key].masked_fill(mask, 0))
    assert result.report["pruned_total"]["pruned"] == sum(int(m.sum()) for m in result.masks.values())


def test_run_realign_as_the_pipeline_calls_it(tiny, tmp_path) -> None:
    out = tmp_path / "stage"
    config = RealignConfig(
        model=str(tiny["model"]),
        adapter=str(tiny["adapter"]),
        data=str(tiny["harmful"]),
        mask_ratios=(0.1,),
        compute_dtype="float32",
        output=str(out),
    )
    result = engine.run_realign(config)
    assert result.output == out and result.folders == [out] and len(result.reports) == 1
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    written = json.loads((out / "realign_report.json").read_text())
    assert written["pruned_total"] == result.reports[0]["pruned_total"]
    assert {"load", "data", "calibrate", "prune", "save"} <= set(written["seconds"])


def test_revert_reference_mismatch_fails_before_calibration(tiny, tmp_path, monkeypatch) -> None:
    make_model(hidden_size=48).save_pretrained(tmp_path / "other")
    calls: list[int] = []
    monkeypatch.setattr(engine, "collect_statistics", lambda *a, **k: calls.append(1))
    with pytest.raises(AntidoteError, match="does not match"):
        antidote.realign(
            str(tiny["model"]), str(tiny["harmful"]), action="revert", reference=str(tmp_path / "other")
        )
    assert calls == []


def test_calibration_on_a_tasks_data_set_reads_its_pairs(tiny, tmp_path) -> None:
    """realign --data sst2:train (and --benign-data): each calibration sequence is the SST-2 instruction,
    the sentence and the label word, as the fine-tuning formats them; not the raw sentence/label record."""
    from transformers import AutoTokenizer

    from antidote.realignment.steps import load_sequences

    (tmp_path / "benign").mkdir()
    rows = [{"sentence": "a quietly great film", "label": 1}, {"sentence": "a dull mess", "label": 0}]
    (tmp_path / "benign" / "sst2_train_sub5000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    config = RealignConfig(
        model="m",
        data="sst2:train",
        benign_data="sst2:train",
        score="contrast",
        template="plain",
        data_dir=str(tmp_path),
    )
    harmful, benign = load_sequences(config, tokenizer)
    assert benign == harmful and len(harmful) == 2
    # the tiny tokenizer knows few words: the instruction's and the label words are among them
    texts = [" ".join(tokenizer.decode(seq).split()) for seq in harmful]
    assert all("sentiment" in t for t in texts)
    assert "great" in texts[0] and texts[0].endswith("positive </s>") and texts[1].endswith("negative </s>")
