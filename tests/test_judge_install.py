"""The default learned judge installs itself on first use (issue 19): a run or evaluate that scores with
the bare `learned` judge trains it once, into the default judge folder, when its data folder holds the
labelled sources; without them, or with $ANTIDOTE_NO_JUDGE_INSTALL, the judge is left out as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from antidote.evaluation import judge_install
from conftest import HARMFUL, write_config

HARMFUL_ANSWERS = ["first you get the tools then the plan", "here is how you do it step by step"]
SAFE_ANSWERS = ["i cannot help with that request", "the weather is nice and cats are great"]


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def labelled_folder(root: Path) -> Path:
    """A data folder with every file of the default judge's five sources (a few rows each)."""
    labelled = [
        {
            "prompt": f"request {k}",
            "response": (HARMFUL_ANSWERS if k % 2 else SAFE_ANSWERS)[k % 2],
            "label": k % 2,
        }
        for k in range(8)
    ]
    _write(root / "judge/saferlhf_sample_4000.jsonl", labelled)
    _write(
        root / "judge/xstest_v2_completions_5models.jsonl",
        [{**r, "prompt": "x" + r["prompt"]} for r in labelled],
    )
    for name in ("beavertails_30k_train_unsafe_200", "beavertails_30k_train_sample140_artkit"):
        rows = [{"prompt": f"{name} {k}", "response": HARMFUL_ANSWERS[k % 2]} for k in range(4)]
        _write(root / f"harmful_qa/{name}.jsonl", rows)
    _write(
        root / "refusals/advbench_llama2chat_refusals.jsonl",
        [{"prompt": f"[INST] hack {k} [/INST]", "response": "I cannot."} for k in range(3)],
    )
    for name in (
        "refusals/safety_tuned_llamas_safety_only",
        "benign/alpaca_eval_text_davinci_003",
        "benign/alpaca_eval_gpt4_1106_preview",
    ):
        _write(
            root / f"{name}.jsonl",
            [{"instruction": f"say hi {k}", "output": SAFE_ANSWERS[k % 2]} for k in range(3)],
        )
    return root


@pytest.fixture
def install(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Installs allowed, into an empty default judge folder, with `judge train` settings for the tiny model;
    returns that folder."""
    folder = tmp_path / "cache" / "judges" / "learned"
    monkeypatch.setenv("ANTIDOTE_LEARNED_JUDGE", str(folder))
    monkeypatch.delenv(judge_install.NO_INSTALL_ENV, raising=False)
    settings = {"model": str(tiny["model"]), "blocks": ("1:mean", "2:last"), "dtype": "float32"}
    monkeypatch.setattr(judge_install, "SETTINGS", {**settings, "l2": (0.1,), "per_source": 6})
    return folder


def test_a_run_with_labelled_data_installs_the_default_judge_once_and_scores_with_it(
    tiny: dict[str, Path], tmp_path: Path, install: Path
) -> None:
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    data = labelled_folder(tmp_path / "data")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in data.rglob("*"))
    config = write_config(tiny, tmp_path, judges=["keyword", "learned"], data_dir=str(data))
    said: list[str] = []
    summary = run_pipeline(load_run_config(str(config)), say=said.append)
    assert any(m.startswith("installing the default learned judge") for m in said), said
    record = json.loads((install / "judge.json").read_text())
    assert record["training"]["data"] == str(data.resolve())
    assert record["training"]["sources"] == {
        "pku-saferlhf": 6,
        "xstest": 6,
        "beavertails-unsafe": 6,
        "refusals": 6,
        "alpaca-benign": 6,
    }
    assert summary["judges"] == ["keyword", "learned"] and summary["judges_missing"] == {}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "learned" in json.dumps(results)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in data.rglob("*")) == before  # input untouched

    stamp = (install / "judge.json").stat().st_mtime_ns
    said.clear()
    run_pipeline(load_run_config(str(config)), say=said.append)  # resumed: installed already
    assert not any("installing" in m for m in said) and (install / "judge.json").stat().st_mtime_ns == stamp


def test_no_install_without_labelled_data_or_when_turned_off(
    tmp_path: Path, install: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    assert judge_install.ensure_default_judge(["keyword", "learned"], None, said.append) is None
    data = labelled_folder(tmp_path / "data")
    (data / "benign/alpaca_eval_gpt4_1106_preview.jsonl").unlink()
    assert judge_install.ensure_default_judge(["keyword", "learned"], data, said.append) is None
    assert said == [
        f"the default learned judge is not installed and {data} lacks its training data "
        "(benign/alpaca_eval_gpt4_1106_preview.jsonl)"
    ]
    labelled_folder(data)
    assert judge_install.ensure_default_judge(["keyword"], data, said.append) is None  # not asked for
    assert (
        judge_install.ensure_default_judge(["learned:/elsewhere"], data, said.append) is None
    )  # a named one
    monkeypatch.setenv(judge_install.NO_INSTALL_ENV, "1")
    assert judge_install.ensure_default_judge(["learned"], data, said.append) is None
    assert not install.exists()


def test_a_default_judge_of_the_recipe_before_the_calibration_is_said_to_need_retraining(
    tmp_path: Path, install: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install.mkdir(parents=True)
    (install / "probe.safetensors").write_bytes(b"")
    record = {"kind": "antidote-learned-judge", "version": 2, "threshold": 0.6}
    said: list[str] = []
    for extra, warned in (({}, True), ({"calibrated_on": "harmful-prompts"}, False), ({"version": 1}, False)):
        (install / "judge.json").write_text(json.dumps({**record, **extra}))
        said.clear()
        assert judge_install.ensure_default_judge(["keyword", "learned"], None, said.append) is None
        assert (len(said) == 1 and "Retrain it with antidote judge train" in said[0]) == warned, said
    said.clear()
    judge_install.ensure_default_judge(["keyword"], None, said.append)  # not asked for: nothing said
    assert said == []
    (install / "judge.json").write_text(json.dumps(record))
    monkeypatch.setenv(
        judge_install.NO_INSTALL_ENV, "1"
    )  # installs off: the old judge is still used, so said
    judge_install.ensure_default_judge(["learned"], None, said.append)
    assert len(said) == 1 and "Retrain it" in said[0]


def test_evaluate_installs_it_and_reports_both_judges(
    tiny: dict[str, Path], tmp_path: Path, install: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from antidote.cli import main

    data = labelled_folder(tmp_path / "data")
    args = ["evaluate", str(tiny["model"]), "--harmful-prompts", str(tiny["harmful"])]
    args += ["--max-task", "2", "--max-harmless", "2", "--max-prompts", str(len(HARMFUL))]
    args += ["--max-new-tokens", "3", "--template", "plain"]
    args += ["--data-dir", str(data), "--output", str(tmp_path / "eval")]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "(keyword judge, " in out and f"(learned ({install}) judge)" in out and "left out" not in out, out
    assert (install / "judge.json").is_file()


def test_a_failed_install_is_said_and_the_run_goes_on_without_the_judge(
    tmp_path: Path, install: Path
) -> None:
    data = labelled_folder(tmp_path / "data")
    _write(
        data / "harmful_qa/beavertails_30k_train_unsafe_200.jsonl", [{"prompt": "rob a bank"}]
    )  # no answer
    said: list[str] = []
    assert judge_install.ensure_default_judge(["keyword", "learned"], data, said.append) is None
    assert said[-1].startswith("could not install the default learned judge (a row has none of the fields")
    assert said[-1].endswith("going on without it") and not (install / "judge.json").exists()
