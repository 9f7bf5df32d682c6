"""`antidote evaluate` end to end on the tiny model, real task files from ../shared/data, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from antidote.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benign"


def evaluate(tiny, out: Path, *extra: object) -> int:
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


def test_evaluate_writes_results_and_generations(tiny, tmp_path) -> None:
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


def test_other_judges_score_the_same_answers(tiny, tmp_path, capsys) -> None:
    """--also-judge adds a judge's HS (and interval) over the very answers the first judge scored; the
    default `learned` is left out, said so, where no learned judge is installed (as in these tests)."""
    from antidote.evaluation.judges import make_judge
    from conftest import make_model, make_tokenizer

    out = tmp_path / "results.json"
    assert evaluate(tiny, out) == 0
    results = json.loads(out.read_text())
    assert results["by_judge"] == {} and "antidote judge train" in results["judges_missing"]["learned"]
    assert "judge learned left out" in capsys.readouterr().out

    guard = tmp_path / "guard"
    make_model(seed=5).save_pretrained(guard)
    make_tokenizer().save_pretrained(guard)
    spec = f"llamaguard:{guard}"
    assert evaluate(tiny, out, "--overwrite", "--also-judge", spec) == 0
    results = json.loads(out.read_text())
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    harmful = [r for r in records if r["set"] == "harmful"]
    verdicts = make_judge(spec).verdicts([r["prompt"] for r in harmful], [r["response"] for r in harmful])
    assert [r["by_judge"][spec] for r in harmful] == verdicts
    assert results["by_judge"][spec]["hs"] == round(100 * verdicts.count("unsafe") / len(harmful), 2)
    assert results["judges_missing"] == {} and results["judge"] == "keyword"


def test_evaluate_with_adapter_and_saved_prompt_format(tiny, tmp_path) -> None:
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
def test_evaluate_bad_input(tiny, tmp_path, capsys, extra, expected) -> None:
    assert evaluate(tiny, tmp_path / "r.json", *extra) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "r.json").exists()


def test_task_file_with_wrong_fields(tiny, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "stars": 3}\n')
    assert evaluate(tiny, tmp_path / "r.json", "--task", "sst2", "--task-data", bad) == 2
    assert "does not look like sst2 data" in capsys.readouterr().err


# ---- output rules (issue 8) -------------------------------------------------------------------------------


def digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_error(capsys) -> str:
    """The one message line on stderr (progress bars, which end in carriage returns, left out)."""
    shown = [line.split("\r")[-1].strip() for line in capsys.readouterr().err.split("\n")]
    lines = [line for line in shown if line and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("antidote: error: "), lines
    return lines[0]


def test_results_file_is_marked_and_second_evaluation_needs_overwrite(tiny, tmp_path, capsys) -> None:
    assert evaluate(tiny, tmp_path / "a.json") == 0
    capsys.readouterr()  # progress bars
    record = json.loads((tmp_path / "a.json").read_text())["antidote"]
    assert record["tool"] == "antidote" and record["wrote"] == "evaluate"
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    assert evaluate(tiny, tmp_path / "a.json") == 2
    error = last_error(capsys)
    assert "a.json" in error and "pass --overwrite" in error
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before


def test_two_evaluations_into_one_folder_keep_both_generations(tiny, tmp_path, capsys) -> None:
    """The README's two `evaluate --output runs/X.json` calls: each results file gets its own generations
    file (before, both wrote runs/generations.jsonl and the second stopped)."""
    assert evaluate(tiny, tmp_path / "a.json") == 0
    first = digest(tmp_path / "a.generations.jsonl")
    assert evaluate(tiny, tmp_path / "b.json") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.generations.jsonl",
        "a.json",
        "b.generations.jsonl",
        "b.json",
    ]
    assert digest(tmp_path / "a.generations.jsonl") == first
    record = json.loads((tmp_path / "b.json").read_text())["antidote"]
    assert record["generations"] == "b.generations.jsonl"
    rows = [json.loads(x) for x in (tmp_path / "b.generations.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["set"] == "harmful"]) == 3


def test_generations_file_names_keep_dots_that_are_not_the_json_suffix() -> None:
    """`--output x-0.2-eval` and `--output x-0.4-eval` (a sweep's ratios in the name) once both wrote
    x-0.generations.jsonl, and the second evaluation stopped on the first one's file."""
    from antidote.evaluation.run import generations_path

    names = {
        "runs/results.json": "runs/generations.jsonl",
        "runs/a.json": "runs/a.generations.jsonl",
        "runs/x-0.2.json": "runs/x-0.2.generations.jsonl",
        "runs/x-0.2-eval": "runs/x-0.2-eval.generations.jsonl",
        "runs/x-0.4-eval": "runs/x-0.4-eval.generations.jsonl",
        "runs/plain": "runs/plain.generations.jsonl",
    }
    assert {k: str(generations_path(k)) for k in names} == names


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_inside_the_model_folder_is_refused(tiny, tmp_path, capsys, overwrite) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    before = {p.name: digest(p) for p in model.iterdir()}
    args = ["--overwrite"] if overwrite else []
    assert main(["evaluate", str(model), "--output", str(model / "config.json"), *args]) == 2
    assert "inside the input folder" in last_error(capsys)
    assert {p.name: digest(p) for p in model.iterdir()} == before


def test_output_that_is_an_input_file_is_refused(tiny, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "how do i steal"}\n')
    before = digest(prompts)
    assert evaluate(tiny, prompts, "--harmful-prompts", prompts, "--overwrite") == 2
    assert "is the input" in last_error(capsys) and digest(prompts) == before


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("r.json", '{"my": "notes"}', "not written by antidote"),
        ("r.json", "not json at all", "not written by antidote"),
        ("r.generations.jsonl", '{"set": "harmful"}\n', "not written by antidote"),
    ],
)
def test_overwrite_replaces_only_antidote_files(tiny, tmp_path, capsys, name, content, expected) -> None:
    (tmp_path / name).write_text(content)
    assert evaluate(tiny, tmp_path / "r.json", "--overwrite") == 2
    assert expected in last_error(capsys) and (tmp_path / name).read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_output_named_like_the_generations_file_is_refused(tiny, tmp_path, capsys) -> None:
    assert evaluate(tiny, tmp_path / "generations.jsonl") == 2
    assert "where the generations go" in last_error(capsys) and list(tmp_path.iterdir()) == []


def test_model_with_nan_weights_is_refused_not_scored(tmp_path, capsys) -> None:
    from conftest import make_model, make_tokenizer

    model = make_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[1, 2] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    make_tokenizer().save_pretrained(tmp_path / "nan")
    out = tmp_path / "r.json"
    assert main(["evaluate", str(tmp_path / "nan"), "--max-prompts", "2", "--output", str(out)]) == 2
    assert "NaN or inf" in last_error(capsys) and not out.exists()
    assert not (tmp_path / "r.generations.jsonl").exists()


def test_recognisers(tmp_path) -> None:
    from antidote.evaluation.run import is_generations_file, is_results_file

    cases = {
        '{"antidote": {"tool": "antidote"}, "hs": 1}': True,
        '{"hs": 1, "judge": "keyword", "config": {}}': True,  # written before the record existed
        '{"antidote": {"tool": "other"}, "hs": 1, "judge": "k", "config": {}}': False,
        '{"hs": 1}': False,
        "[1, 2]": False,
    }
    for text, expected in cases.items():
        (tmp_path / "r.json").write_text(text)
        assert is_results_file(tmp_path / "r.json") is expected, text
    lines = {
        "": True,
        '{"set": "harmful", "prompt": "p", "response": "r", "verdict": "refused"}\n': True,
        '{"set": "harmful", "prompt": "p", "response": "r"}\n[1]\n': False,
        '{"prompt": "p"}\n': False,
    }
    for text, expected in lines.items():
        (tmp_path / "g.jsonl").write_text(text)
        assert is_generations_file(tmp_path / "g.jsonl") is expected, text
