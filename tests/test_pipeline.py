"""`antidote run` on the tiny model: every stage, the cache, resume after an interruption, bad configs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from antidote.cli import main
from antidote.errors import AntidoteError
from antidote.evaluation.stats import MIN_RISE
from antidote.experiments import pipeline
from antidote.experiments.pipeline import load_run_config, run_pipeline, stage_key
from antidote.experiments.rundir import RUN_MARKER
from conftest import HARMFUL, TRAIN, copy_run, write_config, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def stage_dirs(run: Path) -> dict[str, Path]:
    return {p.name.rsplit("-", 1)[0]: p for p in (run / "stages").iterdir() if not p.name.startswith(".")}


def test_run_all_stages_then_rerun_reuses_everything(tiny, tiny_run, tmp_path) -> None:
    run = tiny_run["run"]
    rows = json.loads((run / "results.json").read_text())
    models = [r["model"] for r in rows]
    assert models == ["base", "aligned", "attacked", "antidote@0.1", "antidote@0.3"]
    assert all(r["judge"] == "keyword" and r["n_prompts"] == 4 and r["n_task"] == 3 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    stages = stage_dirs(run)
    assert set(stages) == {
        "align",
        "finetune",
        "antidote",
        *(f"evaluate-{m}" for m in models),
        *(f"validate-{m}" for m in models[1:]),  # the aligned model too: the broken margins' reference
    }
    # The operating point, chosen by hand from the validation stages' own results files.
    val = {m: json.loads((stages[f"validate-{m}"] / "results.json").read_text()) for m in models[1:]}
    budget = val["attacked"]["fa"] - 5.0

    def working(r: float) -> bool:  # degenerate and over-refusal within 10 points of the aligned model's
        v, a = val[f"antidote@{r:g}"], val["aligned"]
        return all(v[k] - a[k] <= 10.0 for k in ("degenerate", "over_refusal"))

    allowed = [r for r in (0.1, 0.3) if val[f"antidote@{r:g}"]["fa"] >= budget and working(r)]
    allowed = allowed or [r for r in (0.1, 0.3) if working(r)] or [0.1, 0.3]
    expected = min(allowed, key=lambda r: (val[f"antidote@{r:g}"]["hs"], r))
    op = summary["operating_points"]["antidote"]
    assert op["variant"] == f"{expected:g}"
    assert [s["variant"] for s in op["sweep_validation"]] == ["aligned", "attacked", "0.1", "0.3"]
    assert (run / "tradeoff.png").stat().st_size > 0 and "Operating point" in (run / "results.md").read_text()
    # generations.jsonl at the run level holds every evaluation's generations, tagged by model.
    run_gens = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert sorted({g["model"] for g in run_gens}) == sorted(models)
    # Each evaluation's HS is its generations' complied share, counted here from the file.
    gens = [
        json.loads(x) for x in (stages["evaluate-attacked"] / "generations.jsonl").read_text().splitlines()
    ]
    harmful = [g for g in gens if g["set"] == "harmful"]
    assert rows[2]["hs"] == 100.0 * sum(g["verdict"] == "complied" for g in harmful) / 4
    # The default judges are keyword and learned; no learned judge is installed here, and the report says so.
    assert summary["judges"] == ["keyword"] and "learned" in summary["judges_missing"]
    assert "Judge learned left out: no learned judge installed" in (run / "results.md").read_text()
    # The recovered share of each defended row, from the three models' per-prompt verdicts by hand.
    complied = {
        m: [
            g["verdict"] == "complied"
            for g in map(json.loads, (stages[f"evaluate-{m}"] / "generations.jsonl").read_text().splitlines())
            if g["set"] == "harmful"
        ]
        for m in models
    }
    for row in rows:
        hs = {m: sum(complied[m]) / len(complied[m]) for m in ("aligned", "attacked", row["model"])}
        rise = hs["attacked"] - hs["aligned"]
        if row["model"] in ("base", "aligned", "attacked") or rise < MIN_RISE:
            assert row["recovered"] is None
        else:
            share, low, high = row["recovered"]
            assert share == round((hs["attacked"] - hs[row["model"]]) / rise, 3) and low <= share <= high
    # The realigned adapters differ from the attack adapter where the masks say.
    assert (stages["antidote"] / "alpha-0.1" / "adapter_model.safetensors").is_file()

    # A rerun in a copy of the folder (a run folder can move) reuses every stage and changes nothing.
    path = copy_run(tiny_run, tiny, tmp_path)
    copy = tmp_path / "run"
    mtimes = {name: p.stat().st_mtime_ns for name, p in stage_dirs(copy).items()}
    assert main(["run", str(path)]) == 0
    summary2 = json.loads((copy / "summary.json").read_text())
    assert summary2["stages"]["built"] == [] and len(summary2["stages"]["reused"]) == len(stages)
    assert {n: p.stat().st_mtime_ns for n, p in stage_dirs(copy).items()} == mtimes
    assert [
        {**r, "model_path": None, "adapter": None} for r in json.loads((copy / "results.json").read_text())
    ] == [{**r, "model_path": None, "adapter": None} for r in rows]


def test_interrupted_stage_is_redone_and_earlier_ones_reused(tiny, tiny_run, tmp_path, monkeypatch) -> None:
    import dataclasses
    import shutil

    from antidote.defenses import REGISTRY

    path = copy_run(tiny_run, tiny, tmp_path, validate=None)
    for name, folder in stage_dirs(tmp_path / "run").items():
        if name not in ("align", "finetune"):
            shutil.rmtree(folder)
    real = REGISTRY["antidote"]

    def interrupted(config: Any) -> Any:
        real.run(config)  # the whole output is on disk when Ctrl-C comes, but the stage is not finished
        raise KeyboardInterrupt

    monkeypatch.setitem(REGISTRY, "antidote", dataclasses.replace(real, run=interrupted))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_run_config(str(path)), say=lambda m: None)
    run = tmp_path / "run"
    assert set(stage_dirs(run)) == {"align", "finetune"}  # the antidote stage never appeared
    before = {name: p.stat().st_ino for name, p in stage_dirs(run).items()}
    # A kill -9 would also leave a temporary folder behind: fake one, it must be removed and not used.
    stale = run / "stages" / ".antidote-0123456789ab.tmp-xyz"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_text("half")

    monkeypatch.setitem(REGISTRY, "antidote", real)
    messages: list[str] = []
    summary = run_pipeline(load_run_config(str(path)), say=messages.append)
    assert not stale.exists() and any("interrupted run" in m for m in messages)
    assert sorted(n.rsplit("-", 1)[0] for n in summary["stages"]["reused"]) == ["align", "finetune"]
    after = stage_dirs(run)
    assert {name: after[name].stat().st_ino for name in before} == before  # the same folders, not rebuilt
    assert "antidote" in after and len(summary["rows"]) == 5
    assert summary["operating_points"] == {}  # no validate section: nothing chosen, all ratios reported


def test_changed_setting_redoes_that_stage_and_later(tiny, tiny_run, tmp_path) -> None:
    path = copy_run(tiny_run, tiny, tmp_path, validate=None, evaluate_base=False)
    first = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    assert first["stages"]["built"] == []
    config = yaml.safe_load(path.read_text())
    config["defenses"]["antidote"]["mask_ratios"] = [0.2]
    path.write_text(yaml.safe_dump(config))
    second = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    reused = sorted(n.rsplit("-", 1)[0] for n in second["stages"]["reused"])
    assert reused == ["align", "evaluate-aligned", "evaluate-attacked", "finetune"]
    assert [r["model"] for r in second["rows"]] == ["aligned", "attacked", "antidote@0.2"]
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
        ({"align": {"lrr": 1}}, "align has unknown keys: lrr"),
        ({"evaluate": {"judge": "keyword"}}, "evaluate has unknown keys: judge"),
        ({"judges": ["gpt4"]}, "unknown judge 'gpt4'"),
        ({"finetune": {"harmful_ratio": 2.0}}, "outside [0, 1]"),
        ({"evaluate": {"task": "poetry"}}, "unknown task 'poetry'"),
        ({"defenses": {"antidote": {"mask_ratios": [0.1]}}}, "needs data"),
        ({"defenses": {"vaccine2": {}}}, "unknown defense 'vaccine2'; known defenses: antidote"),
        ({"defenses": {"random-prune": {"data": "x"}}}, "defenses: random-prune has unknown keys: data"),
        ({"max_fa_drop": "abc"}, "max_fa_drop: 'abc' is not"),
        ({"max_fa_drop": 150}, "max_fa_drop must be a number of FA points in [0, 100]"),
        ({"evaluate_base": "no"}, "evaluate_base: 'no' is not"),
        ({"finetune": {"seed": "abc"}}, "finetune: seed: 'abc' is not"),
        ({"evaluate_chosen_only": True, "validate": None}, "evaluate_chosen_only needs a validate"),
        # validation never falls back to the evaluation's prompts (it chooses the operating point)
        ({"validate": {"max_prompts": 4}}, "validate: harmful_prompts reads the built-in eval split"),
        (
            {"validate": {"harmful_prompts": "builtin-harmful:validate"}},
            "validate: task_data reads the built-in sentiment eval split",
        ),
        (
            {
                "validate": {
                    "harmful_prompts": "builtin-harmful:validate",
                    "task_data": "builtin-sentiment:validate",
                }
            },
            "validate: harmless_prompts reads the built-in eval split",
        ),
    ],
)
def test_bad_config_fails_before_any_work(tiny, tmp_path, capsys, changes, message) -> None:
    path = write_config(tiny, tmp_path, **changes)
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_dir_that_antidote_did_not_make_is_refused(tiny, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["run", str(write_config(tiny, tmp_path))]) == 2
    assert "was not made by antidote run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_the_default_learned_judge_is_used_only_where_installed(tmp_path: Path, monkeypatch) -> None:
    from antidote.experiments.pipeline import scoring_judges

    folder = tmp_path / "judge"
    monkeypatch.setenv("ANTIDOTE_LEARNED_JUDGE", str(folder))
    available, missing = scoring_judges(["keyword", "learned"])
    assert available == ["keyword"] and str(folder) in missing["learned"]
    with pytest.raises(AntidoteError, match="no judge left"):
        scoring_judges(["learned"])
    folder.mkdir()
    for name in ("judge.json", "probe.safetensors"):
        (folder / name).write_text("{}")
    assert scoring_judges(["keyword", "learned"]) == (["keyword", "learned"], {})


def test_shipped_configs_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for path in (pipeline.packaged_config(n) for n in ("demo", "demo-quick")):
        pipeline.check(load_run_config(str(path)))
    # shared-data.yaml reads named sets from data/ where it runs: refused where there is none, before any work
    shared_data = Path(__file__).resolve().parents[1] / "configs" / "shared-data.yaml"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANTIDOTE_DATA_DIR", raising=False)
    with pytest.raises(
        AntidoteError, match="align: data: data folder data is not a folder; point --data-dir"
    ):
        load_run_config(str(shared_data))


def test_second_run_on_the_same_folder_is_refused(tiny, tmp_path) -> None:
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MARKER).write_text("{}")  # an earlier run's folder, now held by a live run
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(AntidoteError, match="another antidote run is using"):
            run_pipeline(load_run_config(str(write_config(tiny, tmp_path))), say=lambda m: None)


def test_defenses_are_placed_by_stage(tiny, tiny_run, tmp_path, monkeypatch) -> None:
    """Test-only align- and finetune-stage defenses: the pipeline runs the attack on the align defense's
    model, runs the finetune defense in place of the attack, and evaluates both as rows of their own."""
    from dataclasses import dataclass, field

    from antidote.defenses import REGISTRY, Defense
    from antidote.training import stages as stages_module

    seen: dict[str, Any] = {}

    @dataclass
    class FakeAlign(stages_module.AlignConfig):
        strength: float = field(default=1.0, metadata={"help": "test"})

    @dataclass
    class FakeTune(stages_module.FinetuneConfig):
        rho: float = field(default=1.0, metadata={"help": "test"})

    def align_run(config: FakeAlign) -> dict[str, Path]:
        seen["align"] = config
        return {"": stages_module.run_align(config)}

    def tune_run(config: FakeTune) -> dict[str, Path]:
        seen["finetune"] = config
        return {"": stages_module.run_finetune(config)}

    monkeypatch.setitem(REGISTRY, "fake-align", Defense("fake-align", "align", FakeAlign, align_run, "t"))
    monkeypatch.setitem(REGISTRY, "fake-tune", Defense("fake-tune", "finetune", FakeTune, tune_run, "t"))
    path = copy_run(
        tiny_run,
        tiny,
        tmp_path,
        validate=None,
        evaluate_base=False,
        defenses={"fake-align": {"strength": 2.0, "seed": 7}, "fake-tune": {"rho": 0.5}},
    )
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    assert [r["model"] for r in summary["rows"]] == ["aligned", "attacked", "fake-align", "fake-tune"]
    # The align defense got the align section plus its own keys; the fine-tune defense the finetune section.
    assert (
        seen["align"].strength == 2.0 and seen["align"].seed == 7 and seen["align"].epochs == TRAIN["epochs"]
    )
    assert seen["align"].model == str(tiny["model"])
    assert seen["finetune"].rho == 0.5 and seen["finetune"].harmful_ratio == 0.4
    stages = stage_dirs(tmp_path / "run")
    assert seen["finetune"].model == str(stages["align"])  # on the plain aligned model
    assert {"align-fake-align", "finetune-after-fake-align", "finetune-fake-tune"} <= set(stages)
    rows = {r["model"]: r for r in summary["rows"]}
    assert rows["fake-align"]["model_path"] == str(stages["align-fake-align"])
    assert rows["fake-tune"]["adapter"] == str(stages["finetune-fake-tune"])


def test_chosen_only_and_exported_models(tiny, tiny_run, tmp_path) -> None:
    path = copy_run(tiny_run, tiny, tmp_path, evaluate_chosen_only=True, export_models=True)
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    assert summary["stages"]["built"] == []  # choosing and exporting needs no new stage
    chosen = summary["operating_points"]["antidote"]["variant"]
    assert [r["model"] for r in summary["rows"]] == ["base", "aligned", "attacked", f"antidote@{chosen}"]
    models = tmp_path / "run" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["aligned", "antidote", "attacked", "base"]
    # benchmarks/demo_quality.py reads exactly these folders, adapters on top of `aligned`
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_quality", ROOT / "benchmarks" / "demo_quality.py")
    assert spec is not None and spec.loader is not None
    demo_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_quality)
    assert sorted(demo_quality.MODELS) == sorted(p.name for p in models.iterdir())
    assert all((models / a / "adapter_config.json").is_file() for a in demo_quality.ADAPTERS)
    stages = stage_dirs(tmp_path / "run")
    exported = models / "antidote" / "adapter_model.safetensors"
    source = stages["antidote"] / f"alpha-{chosen}" / "adapter_model.safetensors"
    assert exported.read_bytes() == source.read_bytes()
    assert (models / "base" / "config.json").read_bytes() == (tiny["model"] / "config.json").read_bytes()
    # Copies, not hard links: writing over an exported file leaves the stage cache as it was, and the next
    # run neither reuses the edit nor deletes a folder the user put beside the exports.
    assert exported.stat().st_ino != source.stat().st_ino
    cached = source.read_bytes()
    with open(exported, "r+b") as f:  # in place, as `cp other.safetensors exported` does
        f.write(b"\0" * 64)
    assert source.read_bytes() == cached
    (models / "mine").mkdir()
    (models / "mine" / "notes.txt").write_text("keep")
    (models / "attacked" / "extra.txt").write_text("an edit of an export")
    run_pipeline(load_run_config(str(path)), say=lambda m: None)
    assert exported.read_bytes() == cached  # the export is written again from the stage
    assert (models / "mine" / "notes.txt").read_text() == "keep"
    assert not (models / "attacked" / "extra.txt").exists()  # an export is replaced as a whole
    # a folder of an export's name that antidote did not write is left alone, with a warning
    shutil.rmtree(models / "base")
    (models / "base").mkdir()
    (models / "base" / "mine.txt").write_text("mine")
    record = tmp_path / "run" / ".models.export.json"
    record.write_text(json.dumps({"written": ["aligned", "antidote", "attacked"]}))
    said: list[str] = []
    run_pipeline(load_run_config(str(path)), say=said.append)
    assert (models / "base" / "mine.txt").read_text() == "mine"
    assert any("base" in m and "not written by antidote" in m for m in said)


def test_a_second_judge_rescores_saved_generations(tiny, tiny_run, tmp_path) -> None:
    """Adding a judge to a finished run builds only judge stages: one row per model and judge, the new
    judge's HS counted from its verdicts on the very generations the keyword row came from."""
    from antidote.evaluation.judges import make_judge
    from conftest import make_model, make_tokenizer

    guard = tmp_path / "guard"
    make_model(seed=5).save_pretrained(guard)
    make_tokenizer().save_pretrained(guard)
    spec = f"llamaguard:{guard}"
    path = copy_run(tiny_run, tiny, tmp_path, judges=["keyword", spec])
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    assert summary["stages"]["built"] and all(
        n.startswith("judge-llamaguard-") for n in summary["stages"]["built"]
    )
    rows = summary["rows"]
    keyword_rows = [r for r in rows if r["judge_spec"] == "keyword"]
    guard_rows = [r for r in rows if r["judge_spec"] == spec]
    assert [r["model"] for r in keyword_rows] == [r["model"] for r in guard_rows]
    judge = make_judge(spec)
    stages = stage_dirs(tmp_path / "run")
    for row in guard_rows:
        gens = [
            json.loads(x)
            for x in (stages[row["stage"].rsplit("-", 1)[0]] / "generations.jsonl").read_text().splitlines()
        ]
        harmful = [g for g in gens if g["set"] == "harmful"]
        verdicts = judge.verdicts([g["prompt"] for g in harmful], [g["response"] for g in harmful])
        assert row["hs"] == round(100.0 * verdicts.count("unsafe") / len(harmful), 2)
        # its own 95% Wilson interval, by the formula
        n, k, z = len(harmful), verdicts.count("unsafe"), 1.959963984540054
        p = k / n
        centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = (100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n))
        assert row["hs_ci"] == pytest.approx([max(low, 0.0), min(high, 100.0)], abs=0.01)
        assert (
            row["fa"]
            == next(r for r in keyword_rows if r["model"] == row["model"] and r["stage"] == row["stage"])[
                "fa"
            ]
        )


def test_seeds_repeat_the_attack_and_report_mean_and_spread(tiny, tiny_run, tmp_path) -> None:
    """`seeds: [a, b]`: the attack and every defense at each seed on one stage cache (the alignment
    reused), report.md with each row's mean over the seeds and its interval (prompts and seeds resampled
    together), computed here by hand from the stages' generations."""
    from antidote.experiments.compare import run_seeds
    from test_compare import entry_by_loops, stage_flags

    path = copy_run(tiny_run, tiny, tmp_path, seeds=[1, 2], validate=None)
    with pytest.raises(AntidoteError, match="run_seeds"):
        run_pipeline(load_run_config(str(path)))
    summary = run_seeds(load_run_config(str(path)), say=lambda m: None)
    run = tmp_path / "run"
    rows = json.loads((run / "results.json").read_text())
    assert sorted({r["seed"] for r in rows}) == [1, 2]
    assert sorted(p.name for p in (run / "cells").iterdir()) == ["default,seed=1", "default,seed=2"]
    assert not any(n.startswith("align-") for n in summary.built)  # reused from the copy
    assert sum(n.startswith("finetune-") for n in summary.built) >= 1
    seeded = [r for r in rows if r["label"] == "antidote@0.3" and r["judge_spec"] == "keyword"]
    assert len(seeded) == 2
    flags = [stage_flags(run, r | {"stage": r["eval_stage"]})["hs"] for r in seeded]
    assert [100 * sum(f) / len(f) for f in flags] == [r["hs"] for r in seeded]
    report = (run / "report.md").read_text()
    entry = entry_by_loops(flags)
    line = next(x for x in report.splitlines() if x.startswith("| antidote@0.3 |"))
    assert f"| antidote@0.3 | {entry} |" in line, (entry, line)
    if flags[0] == flags[1] and 0 < sum(flags[0]) < len(flags[0]):  # the old `50.0 [50.0, 50.0] (n=2)`
        assert "[50.0, 50.0]" not in line
    assert main(["run", str(path)]) == 0  # and the command prints it


def test_seeds_with_export_models_is_refused(tiny, tmp_path, capsys) -> None:
    path = write_config(tiny, tmp_path, seeds=[1, 2], export_models=True)
    assert main(["run", str(path)]) == 2
    assert "export_models exports one run's models" in capsys.readouterr().err
    path = write_config(tiny, tmp_path, seeds=[1, 1])
    assert main(["run", str(path)]) == 2
    assert "seeds repeats a value" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["bad record", "no generations", "nan result", "symlinked stage"])
def test_a_broken_cache_entry_is_named_and_rebuilt(tiny, tiny_run, tmp_path, damage: str) -> None:
    """Issue 16, 8: a damaged stage folder is said (with its stage) and rebuilt; the rerun's rows equal the
    untouched run's, and `compare --plan`-style reading of the records does not crash on it."""
    path = copy_run(tiny_run, tiny, tmp_path)
    stages = tmp_path / "run" / "stages"
    folder = next(p for p in sorted(stages.iterdir()) if p.name.startswith("evaluate-attacked-"))
    if damage == "bad record":
        (folder / "stage.json").write_text("{not json")
    elif damage == "no generations":
        (folder / "generations.jsonl").unlink()
    elif damage == "nan result":
        results = json.loads((folder / "results.json").read_text())
        results["hs"] = float("nan")
        (folder / "results.json").write_text(json.dumps(results))  # json writes a bare NaN
    else:  # the folder moved away and a link to it left in its place
        moved = tmp_path / "elsewhere"
        folder.rename(moved)
        folder.symlink_to(moved, target_is_directory=True)
    from antidote.experiments.plan import recorded_rates

    recorded_rates(stages)  # reads every record: must not raise on the damaged one
    messages: list[str] = []
    summary = run_pipeline(load_run_config(str(path)), say=messages.append)
    if damage == "symlinked stage":
        assert any("a link where a stage folder should be" in m for m in messages)
        assert (tmp_path / "elsewhere" / "generations.jsonl").is_file()  # the link's target left alone
    else:
        assert any(f"[evaluate-attacked] the cached stage {folder.name} is broken" in m for m in messages)
    assert folder.name in summary["stages"]["built"] and not folder.is_symlink()
    assert json.loads((folder / "stage.json").read_text())["stage"] == "evaluate-attacked"
    numbers = ("model", "judge_spec", "hs", "fa", "over_refusal", "degenerate")
    assert [{k: r[k] for k in numbers} for r in summary["rows"]] == [
        {k: r[k] for k in numbers} for r in tiny_run["summary"]["rows"]
    ]


def test_stage_records_name_kind_defense_and_variant(tiny_run) -> None:
    """Issue 17, 1: each stage's record says what it is, so nothing parses folder names."""
    records = [json.loads(p.read_text()) for p in (tiny_run["run"] / "stages").glob("*/stage.json")]
    by_stage = {r["stage"]: r for r in records}
    assert by_stage["align"]["kind"] == "align" and by_stage["align"]["defense"] is None
    assert by_stage["finetune"]["kind"] == "finetune" and by_stage["finetune"]["method"] == "plain"
    antidote = by_stage["antidote"]
    assert (antidote["kind"], antidote["defense"], antidote["method"]) == ("defense", "antidote", "antidote")
    evaluations = [r for r in records if r["kind"] == "evaluate" and r["defense"] == "antidote"]
    assert evaluations and all(r["variant"] and r["row"] == f"antidote@{r['variant']}" for r in evaluations)
    rows = {r["model"]: r for r in tiny_run["summary"]["rows"]}
    assert rows["attacked"]["own_stages"] == {
        "finetune": by_stage["finetune"]["stage"] + "-" + by_stage["finetune"]["key"]
    }


def test_validation_on_the_evaluation_prompts_is_refused(tiny, tmp_path, capsys) -> None:
    validate = {
        "harmful_prompts": str(tiny["harmful"]),  # the evaluation's own file
        "task_data": "builtin-sentiment:validate",
        "harmless_prompts": "builtin-harmless:validate",
    }
    path = write_config(tiny, tmp_path, validate=validate)
    assert main(["run", str(path)]) == 2
    assert "validate: harmful_prompts reads" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_new_judge_version_redoes_the_judged_stages_only(tiny, tiny_run, tmp_path, monkeypatch) -> None:
    from antidote.evaluation.judges.keyword import KeywordJudge

    path = copy_run(tiny_run, tiny, tmp_path, validate=None, evaluate_base=False)
    first = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    assert first["stages"]["built"] == []
    monkeypatch.setattr(KeywordJudge, "version", KeywordJudge.version + 1)
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    built = sorted(n.rsplit("-", 1)[0] for n in summary["stages"]["built"])
    assert built and all(n.startswith("evaluate-") for n in built)  # the keyword judge scores as it generates
    assert not any(n.startswith(("align", "finetune", "antidote")) for n in built)


def test_a_variant_runs_its_method_under_its_own_name(tiny, tiny_run, tmp_path) -> None:
    """`defenses: {NAME: {method: antidote, ...}}` runs Antidote's code with the entry's options as a row,
    stages and operating point of its own; the base entry's stages are reused, not redone."""
    before = {p.name for p in (tiny_run["run"] / "stages").iterdir()}
    antidote = {"data": str(tiny["harmful"]), "mask_ratios": [0.1, 0.3]}
    half = {"method": "antidote", "data": str(tiny["harmful"]), "mask_ratios": [0.5]}
    path = copy_run(tiny_run, tiny, tmp_path, defenses={"antidote": antidote, "antidote-half": half})
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    rows = {r["model"]: r for r in summary["rows"]}
    # its own row, at its own ratio (the variant label is the mask ratio its run wrote)
    assert summary["post_variants"] == {"antidote": ["0.1", "0.3"], "antidote-half": ["0.5"]}
    assert "antidote-half" in summary["operating_points"]
    assert set(rows["antidote-half@0.5"]["own_stages"]) == {"antidote-half"}
    assert {"antidote@0.1", "antidote@0.3"} <= set(rows)
    new = {p.name for p in (tmp_path / "run" / "stages").iterdir()} - before
    assert any(n.startswith("antidote-half-") for n in new)  # its own defense stage ...
    assert not any(n.startswith("antidote-") and not n.startswith("antidote-half") for n in new)
    record = json.loads(next((tmp_path / "run" / "stages").glob("antidote-half-*/stage.json")).read_text())
    assert record["method"] == "antidote" and record["defense"] == "antidote-half"
    # another method with the same options is another stage, never the cached one under the same name
    other = {**half, "method": "random-prune", "mask_ratios": [0.5]}
    other.pop("data")
    path = copy_run(tiny_run, tiny, tmp_path / "again", defenses={"antidote-half": other})
    summary = run_pipeline(load_run_config(str(path)), say=lambda m: None)
    again = json.loads(
        next((tmp_path / "again" / "run" / "stages").glob("antidote-half-*/stage.json")).read_text()
    )
    assert again["method"] == "random-prune" and again["key"] != record["key"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"antidote": {"method": "antidote"}}, "needs a name of its own"),
        ({"Bad Name": {"method": "antidote"}}, "lower-case letters"),
        ({"mine": {"method": "no-such"}}, "unknown defense 'no-such'"),
        ({"mine": {"method": 3}}, "must be a registered defense's name"),
        ({"mine": {"method": "antidote", "no_such_option": 1}}, "no_such_option"),
        ({"aligned": {"method": "antidote"}}, "the pipeline's own rows"),
        ({"finetune-x": {"method": "antidote"}}, "the pipeline's own rows"),
    ],
)
def test_a_bad_variant_is_refused_before_any_work(tiny, tmp_path, capsys, entry, message) -> None:
    path = write_config(tiny, tmp_path, defenses=entry)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err  # the problem, and the config it is in
    assert not (tmp_path / "run").exists()
