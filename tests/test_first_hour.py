"""What a new user meets in the first hour (issue "a new user's first hour"): the messages that point to data,
one flag vocabulary, resuming, the Python API, plug-in defenses. Tiny models only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from antidote.cli import main
from antidote.errors import AntidoteError


def test_missing_learned_judge_says_where_labelled_data_comes_from(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Both messages a user sees without an installed learned judge name a source of labelled data (the hub
    dataset and its licence) and the file format, not only `--data LABELLED.jsonl`."""
    from antidote.evaluation.learned import read_judge_record
    from antidote.evaluation.model_judges import available_judges

    monkeypatch.setenv("ANTIDOTE_LEARNED_JUDGE", str(tmp_path / "learned"))
    kept, missing = available_judges(["keyword", "learned"])
    assert kept == ["keyword"]
    with pytest.raises(AntidoteError) as err:
        read_judge_record(tmp_path / "learned")
    for message in (missing["learned"], str(err.value)):
        assert "PKU-Alignment/PKU-SafeRLHF" in message and "CC-BY-NC-4.0" in message
        assert "prompt, response and label harmful|safe" in message
        assert "\n" not in message
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "### Where the learned judge's labelled data comes from" in readme


# ---- one flag vocabulary --------------------------------------------------------------------------------


def test_output_is_the_flag_everywhere_old_names_hidden_aliases() -> None:
    from antidote.cli import build_parser

    parser = build_parser()
    for argv in (["run", "demo", "--output", "x"], ["run", "demo", "--run-dir", "x"]):
        assert parser.parse_args(argv).output == "x"
    for argv in (["compare", "c.yaml", "--output", "x"], ["compare", "c.yaml", "--out", "x"]):
        assert parser.parse_args(argv).output == "x"
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, old in (("run", "--run-dir"), ("compare", "--out")):
        text = subparsers.choices[name].format_help()
        assert "--output" in text and not re.search(re.escape(old) + r"(?!put)\b", text)
        assert "--overwrite" in text and "--plan" in text


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_and_quiet_work_after_the_subcommand(where: str) -> None:
    from antidote.cli import build_parser

    parser = build_parser()
    for flag, attr in (("-v", "verbose"), ("-q", "quiet")):
        argv = [flag, "run", "demo"] if where == "before" else ["run", "demo", flag]
        args = parser.parse_args(argv)
        assert getattr(args, attr) is True
        assert getattr(args, "quiet" if attr == "verbose" else "verbose") is False
    assert parser.parse_args(["run", "demo"]).verbose is False


def test_run_plan_lists_the_stages_and_writes_nothing(tiny, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from conftest import write_config

    config = write_config(tiny, tmp_path)
    out = tmp_path / "elsewhere"
    assert main(["run", str(config), "--plan", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"antidote run --plan: 1 cells in {out}")
    for stage in ("align", "finetune", "antidote", "evaluate-attacked"):
        assert f"build   {stage}" in text
    assert not out.exists() and not (tmp_path / "run").exists()


def test_run_overwrite_refuses_a_folder_antidote_did_not_make(tiny, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from conftest import write_config

    config = write_config(tiny, tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["run", str(config), "--output", str(foreign), "--overwrite"]) == 2
    assert "was not made by antidote run" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_run_overwrite_removes_what_the_run_wrote_and_reruns(tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """--overwrite on an earlier run's folder: its stages and results go (a user's own file stays), then the
    run starts from zero."""
    import antidote.cli as cli
    from antidote.experiments.pipeline import RUN_MARKER
    from conftest import write_config

    config = write_config(tiny, tmp_path)
    run = tmp_path / "run"
    (run / "stages" / "align-x").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / RUN_MARKER).write_text('{"made_by": "antidote run"}\n')
    (run / "my-notes.txt").write_text("mine")
    seen: dict[str, list[str]] = {}

    def fake_run(cfg):  # type: ignore[no-untyped-def]
        seen["left"] = sorted(p.name for p in run.iterdir())
        return {"run_dir": str(run)}

    monkeypatch.setattr(cli, "_run", fake_run)
    monkeypatch.setattr(cli, "_finish_run", lambda summary, as_json=False: 0)
    assert main(["run", str(config), "--overwrite"]) == 0
    assert set(seen["left"]) - {".lock"} == {RUN_MARKER, "my-notes.txt"}


# ---- Ctrl-C and resuming --------------------------------------------------------------------------------


def test_ctrl_c_in_a_run_says_stages_are_kept_and_how_to_resume(tiny, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import antidote.cli as cli
    from conftest import write_config

    config = write_config(tiny, tmp_path)

    def interrupted(cfg):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    out = tmp_path / "r"
    assert main(["run", str(config), "--output", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err.strip()
    assert "no output was written" not in err
    assert f"finished stages are kept in {out}/stages" in err
    assert f"(antidote run {config} --output {out})" in err  # the same command, less --overwrite


def test_ctrl_c_in_one_step_command_says_nothing_was_written(tiny, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import antidote.evaluation.run as run_module

    def interrupted(config):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_evaluate", interrupted)
    assert main(["evaluate", str(tiny["model"]), "--output", str(tmp_path / "r.json")]) == 130
    assert "no output was written" in capsys.readouterr().err


def test_demo_reruns_into_the_same_folder_so_it_resumes(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`antidote demo` twice uses one folder (before: a new runs/demo-<time> each time, so a rerun after
    Ctrl-C started from zero); --quick says its numbers mean nothing."""
    import antidote.cli as cli

    folders = []

    def fake_run(cfg):  # type: ignore[no-untyped-def]
        folders.append(cfg.run_dir)
        return {"run_dir": cfg.run_dir}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_run", fake_run)
    monkeypatch.setattr(cli, "_finish_run", lambda summary, as_json=False: 0)
    for _ in range(2):
        assert main(["demo", "--quick"]) == 0
        assert "numbers (HS, FA) mean nothing" in capsys.readouterr().out
    assert main(["demo"]) == 0
    assert [Path(f).resolve() for f in folders] == [tmp_path / "runs" / "demo-quick"] * 2 + [
        tmp_path / "runs" / "demo"
    ]
