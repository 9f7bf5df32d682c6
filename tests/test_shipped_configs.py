"""The shipped configs plan offline; compare-paper is the paper's protocol on the largest local data, with
calibration disjoint from the attack's pool and a validate section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from antidote.cli import main
from antidote.data import load_examples

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# ../shared/data beside the checkout (or beside the folder of worktrees)
SHARED = next(
    (d for d in (Path(__file__).resolve().parents[i] / "shared" / "data" for i in (2, 3)) if d.is_dir()),
    Path("missing"),
)
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")


def _paper() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((CONFIGS / "compare-paper.yaml").read_text())
    return config


@needs_shared
def test_compare_paper_plans_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["compare", str(CONFIGS / "compare-paper.yaml"), "--plan", "--data-dir", str(SHARED)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "18 cells" in out and "validate-antidote" in out
    assert not (tmp_path / "out").exists()  # a plan does no work


def test_compare_demo_plans(tmp_path: Path, capsys: Any) -> None:
    assert main(["compare", str(CONFIGS / "compare-demo.yaml"), "--plan", "--out", str(tmp_path / "o")]) == 0
    assert "cells" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["demo", "shared-data.yaml"])
def test_run_configs_check(name: str) -> None:
    from antidote.experiments.pipeline import check, load_run_config, packaged_config

    if name == "shared-data.yaml" and not SHARED.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    data_dir = str(SHARED) if name == "shared-data.yaml" else None  # its named sets are checked there
    config = load_run_config(
        str(packaged_config(name) if name == "demo" else CONFIGS / name), data_dir=data_dir
    )
    check(config)


@needs_shared
def test_compare_paper_calibrates_on_data_disjoint_from_the_attack() -> None:
    paper = _paper()
    pool = load_examples(paper["finetune"]["harmful"], data_dir=SHARED)
    n_p = [
        n * p for n in paper["matrix"]["num_samples"] for p in paper["matrix"]["harmful_ratio"]
    ]  # the one-at-a-time sweep needs fewer, the product bounds them all
    assert max(n_p) <= len(pool) == 200
    attacked = {e.prompt.strip() for e in pool}
    for name in ("antidote", "wei-set-difference"):
        calibration = load_examples(paper["defenses"][name]["data"], data_dir=SHARED)
        assert len(calibration) == 135 and not {e.prompt.strip() for e in calibration} & attacked


@needs_shared
def test_compare_paper_uses_the_largest_local_data() -> None:
    from antidote.data.builtin import harmful_split

    paper = _paper()
    builtin = len(harmful_split("align"))  # 72: what Lisa, Booster and RepNoise had before
    defenses = paper["defenses"]
    assert len(load_examples(paper["align"]["data"], data_dir=SHARED)) == 2483  # every local refusal pair
    assert len(load_examples(defenses["lisa"]["align_data"], data_dir=SHARED)) == 2483 > builtin
    booster = load_examples(defenses["booster"]["harmful_data"], data_dir=SHARED)
    assert len(booster) == 135 > builtin
    assert defenses["repnoise"]["data"] == defenses["repnoise"]["harmful_data"] == "builtin"  # no local pairs
    prompts = load_examples(paper["evaluate"]["harmful_prompts"], data_dir=SHARED, require_response=False)
    assert len(prompts) >= paper["evaluate"]["max_prompts"] == 1000
    assert paper["align"]["max_length"] == 2048 and paper["finetune"]["preset"] == "paper"


def test_compare_paper_chooses_operating_points_on_validation_data() -> None:
    paper = _paper()
    validate, evaluate = paper["validate"], paper["evaluate"]
    assert validate["harmful_prompts"] != evaluate["harmful_prompts"]
    assert validate["task_data"] != evaluate["task_data"]
    for task, sections in paper["matrix"]["tasks"].items():
        if sections:
            assert sections["validate"]["task_data"] == f"{task}:train" != sections["evaluate"]["task_data"]


@needs_shared
@pytest.mark.parametrize(
    ("name", "cells", "stages"),
    [("compare-cpu.yaml", 21, "all"), ("compare-cpu-agnews.yaml", 3, "not align")],
)
def test_compare_cpu_plans_offline_on_data_that_share_no_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, name: str, cells: int, stages: str
) -> None:
    """configs/compare-cpu.yaml (SST-2) and compare-cpu-agnews.yaml (AG News): every defense (the AG News
    one: all but the alignment-stage ones) at three seeds per setting; the attack's harmful pool, the
    calibration data, the validation and the reported prompts share no prompt, nor the task's three parts
    their items; the reported prompts cover every CatQA category; the sizes are at least the floor (100
    harmful, 200 task, 50 harmless)."""
    from antidote.defenses import REGISTRY

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = CONFIGS / name
    argv = ["compare", str(path), "--plan", "--data-dir", str(SHARED), "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    assert f"{cells} cells" in capsys.readouterr().out and not (tmp_path / "o").exists()
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    wanted = {d for d, cls in REGISTRY.items() if stages == "all" or cls.stage != "align"}
    assert set(config["matrix"]["all_seeds_for"]) == set(config["defenses"]) == {"sft", *wanted}
    assert config["matrix"]["seeds"] == [1, 2, 3]
    ev, va = config["evaluate"], config["validate"]
    assert ev["max_prompts"] >= 100 and ev["max_task"] >= 200 and ev["max_harmless"] >= 50

    def prompts(source: str) -> set[str]:
        rows = load_examples(source, data_dir=SHARED, require_response=False)
        return {" ".join(e.prompt.lower().split()) for e in rows}

    sets = {
        "attack": prompts(config["finetune"]["harmful"]),
        "calibration": prompts(config["defenses"]["antidote"]["data"]),
        "validation": prompts(va["harmful_prompts"]),
        "evaluation": prompts(ev["harmful_prompts"]),
    }
    for a in sets:
        for b in sets:
            assert a == b or not sets[a] & sets[b], (a, b)

    from antidote.data.catalog import read_rows

    def items(split: str, first: int | None = None) -> set[str]:
        """The items' own text: SST-2's sentence, AG News's article body (its train file holds the body
        alone, its test file a title and the body)."""
        rows = read_rows(split, SHARED)[:first]
        return {" ".join(str(r.get("sentence") or r.get("text") or r["description"]).split()) for r in rows}

    task = items(ev["task_data"], ev["max_task"])
    train = items(va["task_data"])
    attack = items(config["finetune"]["task_data"])
    assert len(task) >= 200 and not task & train and not train & attack and not task & attack
    categories = {
        e.category
        for e in load_examples(
            ev["harmful_prompts"], data_dir=SHARED, require_response=False, category_field="category"
        )
    }
    assert ev["category_field"] == "category" and ev["max_prompts"] == 10 * len(categories)


@needs_shared
def test_the_ablation_config_is_compare_cpu_default_setting_with_variants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """configs/compare-cpu-ablation.yaml: compare-cpu's data, attack, evaluation, validation and judges
    (so its rows sit beside compare-cpu's default setting), three seeds, and every variant a registered
    method under a name of its own."""
    from antidote.defenses import REGISTRY

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = CONFIGS / "compare-cpu-ablation.yaml"
    argv = ["compare", str(path), "--plan", "--data-dir", str(SHARED), "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 cells" in out and "validate-antidote-contrast" in out and not (tmp_path / "o").exists()
    ablation: dict[str, Any] = yaml.safe_load(path.read_text())
    full: dict[str, Any] = yaml.safe_load((CONFIGS / "compare-cpu.yaml").read_text())
    for key in ("model", "judges", "max_fa_drop", "align", "finetune", "evaluate", "validate"):
        assert ablation[key] == full[key], key
    assert ablation["matrix"]["seeds"] == [1, 2, 3]
    assert set(ablation["matrix"]["all_seeds_for"]) == set(ablation["defenses"])
    for name, options in ablation["defenses"].items():
        method = (options or {}).get("method")
        if method is None:
            assert name in REGISTRY or name == "sft"
        else:
            assert name not in REGISTRY and method in REGISTRY
        if name in full["defenses"]:
            assert options == full["defenses"][name], name  # the shipped defenses as compare-cpu runs them
