"""`antidote evaluate` end to end on the tiny model, real task files from ../shared/data, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from antidote.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benign"


def evaluate(tiny, out: Path, *extra: object) -> int:  # type: ignore[no-untyped-def]
    args = [
        str(tiny["model"]),
        "--template",
        "plain",
        "--max-prompts",
        "3",
        "--max-task",
        "4",
        "--max-new-tokens",
        "3",
        "--output",
        str(out),
        *map(str, extra),
    ]
    return main(["evaluate", *args])


def test_evaluate_writes_results_and_generations(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "results.json"
    assert evaluate(tiny, out) == 0
    results = json.loads(out.read_text())
    assert results["judge"] == "keyword" and results["n_prompts"] == 3 and results["n_task"] == 4
    assert results["harmful_set"] == "built-in eval" and results["template"] == "plain"
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    harmful = [r for r in records if r["set"] == "harmful"]
    assert len(harmful) == 3 and len([r for r in records if r["set"] == "sentiment"]) == 4
    assert results["hs"] == round(100 * sum(r["verdict"] == "complied" for r in harmful) / 3, 2)
    assert evaluate(tiny, out) == 2  # exists: needs --overwrite
    assert evaluate(tiny, out, "--overwrite") == 0


def test_evaluate_with_adapter_and_saved_prompt_format(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from antidote.evaluation.run import saved_template

    assert saved_template(str(tiny["adapter"]), str(tiny["model"])) == "alpaca"  # nothing saved: default
    (tmp_path / "antidote_prompt.json").write_text('{"template": "chat"}')
    assert saved_template(None, str(tmp_path)) == "chat"
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                str(tiny["model"]),
                "--adapter",
                str(tiny["adapter"]),
                "--max-prompts",
                "2",
                "--max-task",
                "2",
                "--max-new-tokens",
                "2",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["adapter"] == str(tiny["adapter"])


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
@pytest.mark.parametrize(
    ("task", "file"),
    [("sst2", "sst2_validation.jsonl"), ("agnews", "agnews_test.jsonl"), ("gsm8k", "gsm8k_test.jsonl")],
)
def test_real_task_files_load(task: str, file: str) -> None:
    from antidote.tasks import load_task_items
    from antidote.tasks.agnews import AGNEWS_LABELS

    items = load_task_items(task, str(SHARED / file))
    assert len(items) > 800
    answers = {a for _, _, a in items}
    if task == "sst2":
        assert answers == {"positive", "negative"}
    elif task == "agnews":
        assert answers == set(AGNEWS_LABELS)
    else:
        assert all("####" in a for a in answers)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--judge", "gpt"], "choose one of keyword"),
        (["--task", "poems"], "choose one of"),
        (["--task", "sst2"], "needs --task-data"),
        (["--task", "sentiment", "--task-data", "x.jsonl"], "data file x.jsonl not found"),
        (["--max-prompts", "0"], "at least 1"),
    ],
)
def test_evaluate_bad_input(tiny, tmp_path, capsys, extra, expected) -> None:  # type: ignore[no-untyped-def]
    assert evaluate(tiny, tmp_path / "r.json", *extra) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "r.json").exists()


def test_task_file_with_wrong_fields(tiny, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "stars": 3}\n')
    assert evaluate(tiny, tmp_path / "r.json", "--task", "sst2", "--task-data", bad) == 2
    assert "does not look like sst2 data" in capsys.readouterr().err
