"""Named data sets: local data folder, hub fallback (faked: tests never touch the network), errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from antidote.data import catalog, load_examples
from antidote.errors import AntidoteError
from antidote.tasks import load_task_items
from conftest import HARMFUL, write_config

# ../shared/data beside the checkout (or beside the folder of worktrees)
SHARED = next(
    (d for d in (Path(__file__).resolve().parents[i] / "shared" / "data" for i in (2, 3)) if d.is_dir()),
    Path(__file__).resolve().parents[2] / "shared" / "data",
)


def _write(folder: Path, relative: str, rows: list[dict[str, Any]]) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write(tmp_path, "harmful_prompts/advbench_harmful_behaviors.jsonl", [{"goal": "g1", "target": "t1"}])
    _write(tmp_path, "benign/sst2_train_sub5000.jsonl", [{"sentence": "fine film", "label": 1}])
    monkeypatch.setenv(catalog.DATA_DIR_ENV, str(tmp_path))
    return tmp_path


def test_named_data_reads_the_data_folder(data_dir: Path) -> None:
    assert load_examples("advbench") == load_examples(
        str(data_dir / catalog.NAMED["advbench"].splits["test"].file)
    )
    assert load_examples("advbench:test")[0].prompt == "g1"
    assert load_task_items("sst2", "sst2:train", training=True) == [
        ("Analyze the sentiment of the input, and respond only positive or negative", "fine film", "positive")
    ]


def test_named_data_errors(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = "sst2:train, sst2:train-fit, sst2:train-heldout, sst2:validation"
    with pytest.raises(AntidoteError, match=f"choose a split of sst2: {splits}"):
        load_examples("sst2")
    with pytest.raises(AntidoteError, match=r"catqa_english\.jsonl not found"):
        load_examples("catqa", require_response=False)
    monkeypatch.delenv(catalog.DATA_DIR_ENV)
    with pytest.raises(AntidoteError, match="pass --data-dir DIR"):
        load_examples("refusals")
    with pytest.raises(AntidoteError, match="named data set: beavertails"):
        load_examples("no-such-file.jsonl")


def test_a_file_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("advbench").write_text(json.dumps({"prompt": "mine", "response": "r"}) + "\n")
    assert load_examples("advbench")[0].prompt == "mine"


def test_hub_fallback_filters_beavertails(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
        calls.append((repo, config, split))
        return [
            {"prompt": "p1", "response": "bad", "is_safe": False},
            {"prompt": "p2", "response": "fine", "is_safe": True},
        ]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.delenv(catalog.DATA_DIR_ENV, raising=False)
    assert [e.response for e in load_examples("beavertails")] == ["bad"]
    assert [e.response for e in load_examples("beavertails:safe")] == ["fine"]
    assert calls == [("PKU-Alignment/BeaverTails", None, "30k_train")] * 2

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(AntidoteError, match="pass --data-dir DIR with a local copy"):
        load_examples("alpaca")


def test_cli_data_dir_is_read_by_the_command(data_dir: Path, tiny, tmp_path: Path, monkeypatch) -> None:
    """`--data-dir` reaches the command's own config: named prompts come from that folder, the environment
    is neither read (unset here) nor changed, and a folder that does not exist is refused before any work."""
    import os

    from antidote.cli import main

    monkeypatch.delenv(catalog.DATA_DIR_ENV)
    out = tmp_path / "r.json"
    argv = ["evaluate", str(tiny["model"]), "--harmful-prompts", "advbench", "--template", "plain"]
    argv += ["--max-task", "1", "--max-harmless", "1", "--max-new-tokens", "2"]
    assert main([*argv, "--data-dir", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert not out.exists()
    assert main([*argv, "--data-dir", str(data_dir), "--output", str(out)]) == 0
    gens = [json.loads(x) for x in (tmp_path / "r.generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in gens if g["set"] == "harmful"] == ["g1"]  # the data folder's one goal
    assert catalog.DATA_DIR_ENV not in os.environ


# hub splits whose local copy a user may add (the shared data folder has none; without it the hub serves)
OPTIONAL_LOCAL = {("beavertails", "safe")}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
@pytest.mark.parametrize("name", sorted(catalog.NAMED))
def test_every_local_name_loads_from_shared_data(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(catalog.DATA_DIR_ENV, str(SHARED))
    for split, entry in catalog.NAMED[name].splits.items():
        if entry.file is None or (name, split) in OPTIONAL_LOCAL:
            continue
        spec = f"{name}:{split}"
        if name in ("sst2", "agnews", "gsm8k"):
            items = load_task_items(name, spec)
            assert items and all(answer for _, _, answer in items)
        else:
            examples = load_examples(spec, require_response=False)
            assert examples and all(e.prompt.strip() for e in examples)
            if name in ("beavertails", "refusals", "alpaca"):
                assert all(e.response.strip() for e in load_examples(spec))


def test_calibrate_split_shares_no_prompt_with_the_attack_pool(data_dir: Path) -> None:
    """beavertails:calibrate is the other BeaverTails sample less the rows whose prompt the attack's pool
    (beavertails:unsafe) holds, whatever their field names."""
    _write(
        data_dir,
        catalog.NAMED["beavertails"].splits["unsafe"].file or "",
        [{"instruction": "steal a car", "input": "", "output": "a"}, {"instruction": "b", "output": "c"}],
    )
    _write(
        data_dir,
        catalog.NAMED["beavertails"].splits["sample140"].file or "",
        [{"prompt": p, "response": "r", "category": "x"} for p in ("steal a car", "make poison", " b ")],
    )
    assert [e.prompt for e in load_examples("beavertails:sample140")] == ["steal a car", "make poison", " b "]
    assert [e.prompt for e in load_examples("beavertails:calibrate")] == ["make poison"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_calibrate_split_of_the_shared_data_is_135_rows() -> None:
    """SOURCES.md: 140 sampled rows, 5 of whose prompts the 200 unsafe rows also hold."""
    rows = load_examples("beavertails:calibrate", data_dir=SHARED)
    pool = {e.prompt.strip() for e in load_examples("beavertails:unsafe", data_dir=SHARED)}
    assert len(rows) == 135 and not {e.prompt.strip() for e in rows} & pool


def test_an_explicit_data_dir_wins_over_the_environment(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other")
    _write(other, "harmful_prompts/advbench_harmful_behaviors.jsonl", [{"goal": "g2", "target": "t2"}])
    assert load_examples("advbench")[0].prompt == "g1"  # $ANTIDOTE_DATA_DIR (the fixture's folder)
    assert load_examples("advbench", data_dir=other)[0].prompt == "g2"
    assert catalog.read_named("advbench:test", data_dir=str(other)) == [{"goal": "g2", "target": "t2"}]
    assert catalog.read_rows("advbench", data_dir=other) == [{"goal": "g2", "target": "t2"}]
    with pytest.raises(AntidoteError, match=r"data folder .*missing is not a folder"):
        load_examples("advbench", data_dir=other / "missing")


def test_builtin_names_need_no_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from antidote.data.builtin import harmful_split

    monkeypatch.delenv(catalog.DATA_DIR_ENV, raising=False)
    assert [e.prompt for e in load_examples("builtin-refusals:eval")] == [
        h.prompt for h in harmful_split("eval")
    ]
    assert [e.response for e in load_examples("builtin-refusals:eval")] == [
        h.refusal for h in harmful_split("eval")
    ]


def test_every_defense_reading_data_by_name_takes_the_runs_data_folder(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defense whose options name data sets reads them from the data folder the run (or `--data-dir`)
    gives it, never only from the environment: wei-set-difference and safedelta once lacked the option,
    and in a comparison on a data folder they failed with "only read from a local data folder"."""
    import dataclasses

    from antidote.cli import main
    from antidote.defenses.base import REGISTRY
    from antidote.experiments.runconfig import defense_config, is_data_field, load_run_config

    monkeypatch.delenv(catalog.DATA_DIR_ENV, raising=False)
    readers = [
        d for d in REGISTRY.values() if any(is_data_field(f.name) for f in dataclasses.fields(d.config))
    ]
    assert {"antidote", "wei-set-difference", "safedelta", "oneshot-ft", "lisa"} <= {d.name for d in readers}
    assert all("data_dir" in {f.name for f in dataclasses.fields(d.config)} for d in readers)
    run = load_run_config(str(write_config(tiny, tmp_path)), data_dir=str(tmp_path))
    for defense in readers:
        fixed = {"model": "m", "adapter": "a", "base_model": "b", "aligned": "al", "output": ""}
        values = {"data": "refusals", "utility_data": "refusals"}
        options = {k: v for k, v in values.items() if k in defense.options()}
        config = defense_config(dataclasses.replace(run, defenses={defense.name: options}), defense, fixed)
        assert config.data_dir == str(tmp_path), defense.name

    # the two that gained the option later keep their stage keys where no folder is given
    from antidote.experiments.pipeline import stage_settings

    files = {"data": str(tiny["harmful"]), "utility_data": str(tiny["benign"])}
    for name in ("wei-set-difference", "safedelta"):
        config_class = REGISTRY[name].config
        options = {k: v for k, v in files.items() if k in {f.name for f in dataclasses.fields(config_class)}}
        options["adapter"] = str(tiny["adapter"])
        assert "data_dir" not in stage_settings(config_class(model="m", **options))
        assert stage_settings(config_class(model="m", data_dir="/d", **options))["data_dir"] == "/d"

    # and it reads there: `refusals` is local-only (no hub copy), so only the folder can serve it
    rows = [{"instruction": r["prompt"], "output": "i can not help with that"} for r in HARMFUL]
    _write(tmp_path, catalog.NAMED["refusals"].splits["train"].file or "", rows)
    model = [str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--template", "plain"]
    wei = ["defend", "wei-set-difference", *model, "--utility-data", str(tiny["benign"])]
    safedelta = ["defend", "safedelta", *model, "--dtype", "float32"]
    for argv, report in ((wei, "realign_report.json"), (safedelta, "safedelta_report.json")):
        out = tmp_path / argv[1]
        assert main([*argv, "--data", "refusals", "--data-dir", str(tmp_path), "--output", str(out)]) == 0
        assert json.loads((out / report).read_text())["calibration"]["samples"] == len(rows)


def test_named_data_missing_from_the_data_folder_is_refused_before_any_work(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's check reads no rows but finds a named set with no hub copy that its stage cannot reach:
    no data folder, or one without the file. The message names the config's section and option."""
    from antidote.experiments.runconfig import load_run_config

    monkeypatch.delenv(catalog.DATA_DIR_ENV, raising=False)
    path = str(write_config(tiny, tmp_path, defenses={"safedelta": {"data": "refusals"}}))
    where = "defenses: safedelta: data: refusals"
    with pytest.raises(
        AntidoteError, match=f"{where} is only read from a local data folder; pass --data-dir"
    ):
        load_run_config(path)
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(AntidoteError, match=f"{where}: .*safety_tuned_llamas_safety_only.jsonl not found"):
        load_run_config(path, data_dir=str(folder))
    _write(
        folder, catalog.NAMED["refusals"].splits["train"].file or "", [{"instruction": "a", "output": "b"}]
    )
    assert load_run_config(path, data_dir=str(folder)).defenses == {"safedelta": {"data": "refusals"}}
    bad_split = write_config(tiny, tmp_path, defenses={"safedelta": {"data": "refusals:tain"}})
    with pytest.raises(AntidoteError, match="safedelta: data: refusals:tain: choose a split of refusals"):
        load_run_config(str(bad_split), data_dir=str(folder))
    evaluate = {"harmful_prompts": "catqa", "max_prompts": 1}  # a section's option, too
    path = str(write_config(tiny, tmp_path, evaluate=evaluate))
    with pytest.raises(AntidoteError, match=r"evaluate: harmful_prompts: catqa: .* not found"):
        load_run_config(path, data_dir=str(folder))
