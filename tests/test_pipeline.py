"""`antidote run` on the tiny model: every stage, the cache, resume after an interruption, bad configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from antidote.cli import main
from antidote.errors import AntidoteError
from antidote.experiments import pipeline
from antidote.experiments.pipeline import load_run_config, run_pipeline, stage_key
from conftest import HARMFUL, write_jsonl

TRAIN = {"epochs": 1, "batch_size": 4, "lora_r": 4, "lora_alpha": 8}
SMALL_EVAL = {"max_prompts": 4, "max_task": 3, "max_harmless": 2, "max_new_tokens": 3}


def write_config(tiny: dict[str, Path], folder: Path, **changes: Any) -> Path:
    refusals = write_jsonl(
        folder / "refusals.jsonl", [{"prompt": r["prompt"], "response": "i can not help"} for r in HARMFUL]
    )
    config = {
        "model": str(tiny["model"]),
        "run_dir": str(folder / "run"),
        "template": "plain",
        "align": {"data": str(refusals), "helpful_data": str(tiny["benign"]), **TRAIN},
        "finetune": {
            "task": "pairs",
            "task_data": str(tiny["benign"]),
            "harmful": str(tiny["harmful"]),
            "harmful_ratio": 0.4,
            "num_samples": 10,
            **TRAIN,
        },
        "realign": {"data": str(tiny["harmful"]), "mask_ratios": [0.1, 0.3]},
        "evaluate": {"harmful_prompts": str(tiny["harmful"]), **SMALL_EVAL},
        "validate": {
            "harmful_prompts": "builtin-harmful:validate",
            "task_data": "builtin-sentiment:validate",
            **SMALL_EVAL,
        },
    }
    config.update(changes)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stage_dirs(run: Path) -> dict[str, Path]:
    return {p.name.rsplit("-", 1)[0]: p for p in (run / "stages").iterdir() if not p.name.startswith(".")}


def test_run_all_stages_then_rerun_reuses_everything(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_config(tiny, tmp_path)
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    rows = json.loads((run / "results.json").read_text())
    models = [r["model"] for r in rows]
    assert models == ["base", "aligned", "attacked", "realigned@0.1", "realigned@0.3"]
    assert all(r["judge"] == "keyword" and r["n_prompts"] == 4 and r["n_task"] == 3 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["operating_point"]["mask_ratio"] in (0.1, 0.3)
    assert [s["mask_ratio"] for s in summary["sweep_validation"]] == [0.0, 0.1, 0.3]
    assert (run / "tradeoff.png").stat().st_size > 0 and "Operating point" in (run / "results.md").read_text()
    stages = stage_dirs(run)
    assert set(stages) == {
        "align",
        "finetune",
        "realign",
        *(f"evaluate-{m}" for m in models),
        *(f"validate-{m}" for m in models[2:]),
    }
    # Each evaluation's HS is its generations' complied share, counted here from the file.
    gens = [
        json.loads(x) for x in (stages["evaluate-attacked"] / "generations.jsonl").read_text().splitlines()
    ]
    harmful = [g for g in gens if g["set"] == "harmful"]
    assert rows[2]["hs"] == 100.0 * sum(g["verdict"] == "complied" for g in harmful) / 4
    # The realigned adapters differ from the attack adapter where the masks say.
    assert (stages["realign"] / "alpha-0.1" / "adapter_model.safetensors").is_file()

    mtimes = {name: p.stat().st_mtime_ns for name, p in stages.items()}
    summary2 = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    assert summary2["stages"]["built"] == [] and len(summary2["stages"]["reused"]) == len(stages)
    assert {n: p.stat().st_mtime_ns for n, p in stage_dirs(run).items()} == mtimes
    assert json.loads((run / "results.json").read_text()) == rows


def test_interrupted_stage_is_redone_and_earlier_ones_reused(tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import antidote.realignment.engine as engine
    import antidote.training.stages as stages_module

    path = write_config(tiny, tmp_path, validate=None)
    real_save = engine.save_realigned

    def interrupted(*args: Any, **kwargs: Any) -> None:
        real_save(*args, **kwargs)  # half of the stage is on disk when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_realigned", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_run_config(str(path)), say=lambda m: None)
    run = tmp_path / "run"
    assert set(stage_dirs(run)) == {"align", "finetune"}  # the realign stage never appeared
    # A kill -9 would also leave a temporary folder behind: fake one, it must be removed and not used.
    stale = run / "stages" / ".realign-0123456789ab.tmp-xyz"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_text("half")

    monkeypatch.setattr(engine, "save_realigned", real_save)
    calls: list[str] = []
    for name in ("run_align", "run_finetune"):
        real = getattr(stages_module, name)
        monkeypatch.setattr(stages_module, name, lambda c, _r=real, _n=name: calls.append(_n) or _r(c))
    messages: list[str] = []
    summary = run_pipeline(load_run_config(str(path)), say=messages.append)
    assert calls == [] and not stale.exists()
    assert any("interrupted run" in m for m in messages)
    assert sorted(n.rsplit("-", 1)[0] for n in summary["stages"]["reused"]) == ["align", "finetune"]
    assert "realign" in stage_dirs(run) and len(summary["rows"]) == 5
    assert "operating_point" not in summary  # no validate section: nothing chosen, all ratios reported


def test_changed_setting_redoes_that_stage_and_later(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_config(tiny, tmp_path, validate=None, evaluate_base=False)
    first = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    config = yaml.safe_load(path.read_text())
    config["realign"]["mask_ratios"] = [0.2]
    path.write_text(yaml.safe_dump(config))
    second = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    reused = sorted(n.rsplit("-", 1)[0] for n in second["stages"]["reused"])
    assert reused == ["align", "evaluate-aligned", "evaluate-attacked", "finetune"]
    assert [r["model"] for r in second["rows"]] == ["aligned", "attacked", "realigned@0.2"]
    assert first["rows"][:2] == second["rows"][:2]


def test_stage_key_depends_on_data_file_content(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", HARMFUL)
    key = stage_key({"data": str(data)})
    assert stage_key({"data": str(data)}) == key
    write_jsonl(data, HARMFUL[:3])
    assert stage_key({"data": str(data)}) != key


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"learning_rate": 1}, "unknown keys: learning_rate"),
        ({"align": {"lrr": 1}}, "unknown keys in align: lrr"),
        ({"evaluate": {"judge": "keyword"}}, "unknown keys in evaluate: judge"),
        ({"judges": ["gpt4"]}, "unknown judge 'gpt4'"),
        ({"finetune": {"harmful_ratio": 2.0}}, "outside [0, 1]"),
        ({"evaluate": {"task": "poetry"}}, "unknown task 'poetry'"),
        ({"realign": {"mask_ratios": [0.1]}}, "realign needs data"),
    ],
)
def test_bad_config_fails_before_any_work(tiny, tmp_path, capsys, changes, message) -> None:  # type: ignore[no-untyped-def]
    path = write_config(tiny, tmp_path, **changes)
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_shipped_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("demo.yaml", "shared-data.yaml"):
        config = load_run_config(str(root / name))
        pipeline.check(config)


def test_second_run_on_the_same_folder_is_refused(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(AntidoteError, match="another antidote run is using"):
            run_pipeline(load_run_config(str(write_config(tiny, tmp_path))), say=lambda m: None)
