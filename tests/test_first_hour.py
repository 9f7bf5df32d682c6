"""What a new user meets in the first hour (issue "a new user's first hour"): the messages that point to data,
one flag vocabulary, resuming, the Python API, plug-in defenses. Tiny models only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from antidote.cli import main
from antidote.errors import AntidoteError


def test_missing_learned_judge_says_where_labelled_data_comes_from(tmp_path, monkeypatch) -> None:
    """Both messages a user sees without an installed learned judge name a source of labelled data (the hub
    dataset and its licence) and the file format, not only `--data LABELLED.jsonl`."""
    from antidote.evaluation.judges import available_judges
    from antidote.evaluation.judges.learned import read_judge_record

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


def test_run_plan_lists_the_stages_and_writes_nothing(tiny, tmp_path, capsys) -> None:
    from conftest import write_config

    config = write_config(tiny, tmp_path)
    out = tmp_path / "elsewhere"
    assert main(["run", str(config), "--plan", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"antidote run --plan: 1 cells in {out}")
    for stage in ("align", "finetune", "antidote", "evaluate-attacked"):
        assert f"build   {stage}" in text
    assert not out.exists() and not (tmp_path / "run").exists()


def test_run_overwrite_refuses_a_folder_antidote_did_not_make(tiny, tmp_path, capsys) -> None:
    from conftest import write_config

    config = write_config(tiny, tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["run", str(config), "--output", str(foreign), "--overwrite"]) == 2
    assert "was not made by antidote run" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_run_overwrite_removes_what_the_run_wrote_and_reruns(tiny, tmp_path, monkeypatch) -> None:
    """--overwrite on an earlier run's folder: its stages and results go (a user's own file stays), then the
    run starts from zero."""
    import antidote.cli as cli
    from antidote.experiments.rundir import RUN_MARKER
    from conftest import write_config

    config = write_config(tiny, tmp_path)
    run = tmp_path / "run"
    (run / "stages" / "align-x").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / RUN_MARKER).write_text('{"made_by": "antidote run"}\n')
    (run / "my-notes.txt").write_text("mine")
    seen: dict[str, list[str]] = {}

    def fake_run(cfg):
        seen["left"] = sorted(p.name for p in run.iterdir())
        return {"run_dir": str(run)}

    monkeypatch.setattr(cli, "_run", fake_run)
    monkeypatch.setattr(cli, "_finish_run", lambda summary, as_json=False: 0)
    assert main(["run", str(config), "--overwrite"]) == 0
    assert set(seen["left"]) - {".lock"} == {RUN_MARKER, "my-notes.txt"}


# ---- Ctrl-C and resuming --------------------------------------------------------------------------------


def test_ctrl_c_in_a_run_says_stages_are_kept_and_how_to_resume(tiny, tmp_path, capsys, monkeypatch) -> None:
    import antidote.cli as cli
    from conftest import write_config

    config = write_config(tiny, tmp_path)

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    out = tmp_path / "r"
    assert main(["run", str(config), "--output", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err.strip()
    assert "no output was written" not in err
    assert f"finished stages are kept in {out}/stages" in err
    assert f"(antidote run {config} --output {out})" in err  # the same command, less --overwrite


def test_ctrl_c_in_one_step_command_says_nothing_was_written(tiny, tmp_path, capsys, monkeypatch) -> None:
    import antidote.evaluation.run as run_module

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_evaluate", interrupted)
    assert main(["evaluate", str(tiny["model"]), "--output", str(tmp_path / "r.json")]) == 130
    assert "no output was written" in capsys.readouterr().err


def test_demo_reruns_into_the_same_folder_so_it_resumes(tmp_path, capsys, monkeypatch) -> None:
    """`antidote demo` twice uses one folder (before: a new runs/demo-<time> each time, so a rerun after
    Ctrl-C started from zero); --quick says its numbers mean nothing."""
    import antidote.cli as cli

    folders = []

    def fake_run(cfg):
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


# ---- a 7B on one GPU: mixed precision, gradient accumulation, quantized base, evaluate --device/--dtype ----


def test_gradient_accumulation_takes_one_optimizer_step_per_n_batches(tiny, tmp_path) -> None:
    """8 pairs in batches of 2: 4 optimizer steps an epoch, 2 with --gradient-accumulation-steps 2
    (counted by hand: 8 / (2 x 2))."""
    from antidote.models import load_model
    from antidote.training.config import TrainConfig
    from antidote.training.sft import fit_lora

    pairs = [(f"how do i make a weapon {i}", "i can not help") for i in range(8)]
    steps = {}
    for accumulate in (1, 2):
        loaded = load_model(str(tiny["model"]), device="cpu")
        config = TrainConfig(batch_size=2, epochs=1, lora_r=2, gradient_accumulation_steps=accumulate)
        assert config.effective_batch_size == 2 * accumulate
        trained = fit_lora(
            loaded.model, loaded.tokenizer, pairs, config, output_dir=tmp_path / str(accumulate)
        )
        steps[accumulate] = trained.trainer.state.global_step
        assert trained.trainer.args.gradient_accumulation_steps == accumulate
    assert steps == {1: 4, 2: 2}


def test_mixed_precision_reaches_the_trainer(tmp_path) -> None:
    import torch

    from antidote.training.config import TrainConfig
    from antidote.training.sft import _training_arguments

    args = _training_arguments(TrainConfig(mixed_precision="bf16"), tmp_path)
    assert args.bf16 is True and args.fp16 is False
    args = _training_arguments(TrainConfig(), tmp_path)
    assert args.bf16 is False and args.fp16 is False
    if not torch.cuda.is_available():
        with pytest.raises(AntidoteError, match="fp16 needs a CUDA GPU"):
            _training_arguments(TrainConfig(mixed_precision="fp16"), tmp_path)
    with pytest.raises(AntidoteError, match="unknown --mixed-precision 'fp8'"):
        TrainConfig(mixed_precision="fp8")


def test_bf16_mixed_precision_trains_on_this_machine(tmp_path) -> None:
    from antidote.training.config import TrainConfig
    from antidote.training.sft import fit_lora
    from conftest import make_model, make_tokenizer

    pairs = [(f"how do i make a weapon {i}", "i can not help") for i in range(4)]
    config = TrainConfig(batch_size=2, epochs=1, lora_r=2, mixed_precision="bf16")
    trained = fit_lora(make_model(), make_tokenizer(), pairs, config, output_dir=tmp_path)
    assert trained.trainer.accelerator.mixed_precision == "bf16"
    assert len(trained.losses) == 2 and all(0 < loss < 100 for loss in trained.losses)


def test_quantize_needs_bitsandbytes_and_is_not_for_align(monkeypatch) -> None:
    import importlib.util

    from antidote.models.loading import _quantization
    from antidote.training.stages import AlignConfig, FinetuneConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(AntidoteError, match="needs bitsandbytes and a CUDA GPU: pip install bitsandbytes"):
        FinetuneConfig(model="m", quantize="4bit")
    with pytest.raises(AntidoteError, match="unknown --quantize '3bit'"):
        FinetuneConfig(model="m", quantize="3bit")
    assert _quantization("none") == {}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a)
    )
    config = _quantization("4bit")["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert _quantization("8bit")["quantization_config"].load_in_8bit
    with pytest.raises(AntidoteError, match="align merges its adapter"):
        AlignConfig(model="m", quantize="4bit")


def test_new_training_options_leave_cached_stage_keys_alone() -> None:
    """A stage cached before these options existed keeps its key while they are at their defaults."""
    from antidote.experiments.pipeline import stage_settings
    from antidote.training.stages import FinetuneConfig

    settings = stage_settings(FinetuneConfig(model="m"))
    for name in ("mixed_precision", "gradient_accumulation_steps", "quantize"):
        assert name not in settings
    assert stage_settings(FinetuneConfig(model="m", mixed_precision="bf16"))["mixed_precision"] == "bf16"


def test_evaluate_device_and_dtype_reach_the_loader(tiny, tmp_path, monkeypatch, capsys) -> None:
    import torch

    import antidote.models as models

    seen = []
    real = models.load_model

    def spy(*args, **kwargs):
        loaded = real(*args, **kwargs)
        seen.append((kwargs, next(loaded.model.parameters()).dtype))
        return loaded

    monkeypatch.setattr(models, "load_model", spy)
    argv = ["evaluate", str(tiny["model"]), "--template", "plain", "--max-prompts", "2", "--max-task", "2"]
    argv += ["--max-harmless", "1", "--max-new-tokens", "2", "--output", str(tmp_path / "r.json")]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert seen[0][0]["device"] == "cpu" and seen[0][0]["dtype"] == "bfloat16"
    assert seen[0][1] == torch.bfloat16
    assert main([*argv, "--overwrite", "--dtype", "float8"]) == 2
    assert "float8" in capsys.readouterr().err and len(seen) == 1


# ---- realign reads and carries the prompt format ---------------------------------------------------------


def test_realign_calibrates_in_the_adapters_saved_format_and_writes_it(tiny, tmp_path) -> None:
    """An adapter trained with --template plain (its antidote_prompt.json says so): realign calibrates on the
    plain-formatted pairs (token count computed here by hand from the plain template, which differs from
    alpaca's) and its output says plain too, for evaluate to read."""
    import shutil

    from antidote.data import load_examples, tokenize_examples
    from antidote.models import load_model
    from antidote.realignment.config import RealignConfig
    from antidote.realignment.engine import run_realign

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], adapter)
    (adapter / "antidote_prompt.json").write_text('{"template": "plain"}\n')
    config = RealignConfig(model=str(tiny["model"]), adapter=str(adapter), data=str(tiny["harmful"]))
    assert config.template == "plain"
    out = tmp_path / "out"
    run_realign(
        RealignConfig(
            model=str(tiny["model"]), adapter=str(adapter), data=str(tiny["harmful"]), output=str(out)
        )
    )
    report = json.loads((out / "realign_report.json").read_text())
    tokenizer = load_model(str(tiny["model"])).tokenizer
    examples = load_examples(str(tiny["harmful"]))
    by_template = {
        t: sum(len(s) for s in tokenize_examples(examples, tokenizer, t, 512)) for t in ("plain", "alpaca")
    }
    assert by_template["plain"] != by_template["alpaca"]
    assert report["calibration"]["tokens"] == by_template["plain"]
    assert json.loads((out / "antidote_prompt.json").read_text()) == {"template": "plain"}
    # no saved format: alpaca, the paper's, as before; an explicit --template wins over the saved one
    assert (
        RealignConfig(model=str(tiny["model"]), adapter=str(tiny["adapter"]), data="x").template == "alpaca"
    )
    explicit = RealignConfig(model=str(tiny["model"]), adapter=str(adapter), data="x", template="chat")
    assert explicit.template == "chat"


# ---- the Python API ----------------------------------------------------------------------------------------


def test_dir_lists_the_public_api() -> None:
    import antidote

    names = dir(antidote)
    for name in ("evaluate", "run", "compare", "realign", "realign_sweep", "load_model", "wrap_model"):
        assert name in names and callable(getattr(antidote, name))
    assert "TYPE_CHECKING" not in names and "Any" not in names


def test_realign_takes_a_transformers_model_object(tiny, tmp_path) -> None:
    """Before: str(model) was taken for a path (OSError: File name too long). Now the object is used, and its
    masks are those of the same weights named by folder."""
    import torch

    import antidote
    from conftest import make_model, make_tokenizer

    model = make_model(seed=0)  # the weights saved in tiny["model"]
    by_object = antidote.realign(model, str(tiny["harmful"]), tokenizer=make_tokenizer(), template="plain")
    by_folder = antidote.realign(str(tiny["model"]), str(tiny["harmful"]), template="plain")
    assert by_object.masks.keys() == by_folder.masks.keys() and by_object.masks
    for name, mask in by_folder.masks.items():
        assert torch.equal(by_object.masks[name], mask)
    assert by_object.model is model  # pruned in place, as a LoadedModel is
    with pytest.raises(AntidoteError, match="needs its tokenizer: pass tokenizer="):
        antidote.realign(make_model(), str(tiny["harmful"]))
    with pytest.raises(AntidoteError, match="tokenizer= goes with a model object"):
        antidote.realign(str(tiny["model"]), str(tiny["harmful"]), tokenizer=make_tokenizer())


def test_evaluate_function_takes_a_model_object_writes_when_asked(tiny, tmp_path, monkeypatch) -> None:
    import antidote
    from conftest import make_model, make_tokenizer

    monkeypatch.chdir(tmp_path)
    small = dict(template="plain", max_prompts=3, max_task=2, max_harmless=2, max_new_tokens=3)
    by_object = antidote.evaluate(make_model(seed=0), tokenizer=make_tokenizer(), **small)
    assert list(tmp_path.iterdir()) == []  # no output: nothing written
    by_folder = antidote.evaluate(str(tiny["model"]), output=tmp_path / "r.json", **small)
    assert (tmp_path / "r.json").is_file() and (tmp_path / "r.generations.jsonl").is_file()
    for key in ("hs", "fa", "over_refusal", "n_prompts", "n_task", "n_harmless"):
        assert by_object[key] == by_folder[key]
    assert by_object["n_prompts"] == 3 and by_object["n_task"] == 2
    with pytest.raises(AntidoteError, match="unknown options max_promts"):
        antidote.evaluate(str(tiny["model"]), max_promts=3)


def test_run_function_plans_without_work(tiny, tmp_path) -> None:
    import antidote
    from conftest import write_config

    config = write_config(tiny, tmp_path)
    result = antidote.run(config, plan=True)
    assert result["plan"].startswith("antidote run --plan: 1 cells") and "build   align" in result["plan"]
    assert not (tmp_path / "run").exists()


# ---- plug-ins: a defense and a judge from another installed package ---------------------------------------

PLUGIN = """
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from antidote.defenses import Defense


@dataclass
class Config:
    model: str = field(default="", metadata={"help": "the aligned model", "positional": True})
    adapter: str = field(default="", metadata={"help": "the fine-tuning adapter"})
    output: str = field(default="", metadata={"help": "output folder"})
    overwrite: bool = field(default=False, metadata={"help": "replace"})
    data_dir: str | None = field(default=None, metadata={"help": "data folder"})
    note: str = field(default="hello", metadata={"help": "a note this defense writes"})


def run(config):
    out = Path(config.output)
    shutil.copytree(config.adapter, out)
    (out / "note.txt").write_text(config.note)
    return {"": out}


DEFENSE = Defense("my-noop", "post", Config, run, "copies the adapter (a plug-in test)")


class AlwaysUnsafe:
    def __init__(self, path):
        self.name = f"always-unsafe ({path})"

    def verdicts(self, prompts, responses):
        return ["unsafe"] * len(prompts)


def make_judge(path):
    return AlwaysUnsafe(path)
"""

ENTRY_POINTS = """[antidote.defenses]
my-noop = myplug:DEFENSE
broken-one = myplug_missing:DEFENSE

[antidote.judges]
always-unsafe = myplug:make_judge
"""


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """A distribution `myplug` installed on sys.path (a module and its dist-info with entry_points.txt)."""
    from antidote import plugins
    from antidote.defenses import REGISTRY

    site = tmp_path / "site"
    (site / "myplug-0.1.dist-info").mkdir(parents=True)
    (site / "myplug.py").write_text(PLUGIN)
    (site / "myplug-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n"
    )
    (site / "myplug-0.1.dist-info" / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(site))
    plugins.judge_factories.cache_clear()
    yield site
    REGISTRY.pop("my-noop", None)
    plugins.BROKEN.clear()
    plugins.judge_factories.cache_clear()


def test_a_package_registers_a_defense_by_entry_point(plugin_package, tiny, tmp_path, capsys) -> None:
    from antidote.defenses import get, load_plugins

    assert load_plugins() == ["my-noop"]
    assert get("my-noop").stage == "post"
    with pytest.raises(AntidoteError, match=r"unknown defense 'broken-one'.*myplug_missing:DEFENSE"):
        get("broken-one")
    with pytest.raises(SystemExit):
        main(["defend", "my-noop", "--help"])
    assert "--note" in capsys.readouterr().out
    out = tmp_path / "out"
    argv = ["defend", "my-noop", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--output", str(out)]
    assert main([*argv, "--note", "from my package"]) == 0
    assert (out / "note.txt").read_text() == "from my package" and (out / "adapter_config.json").is_file()


def test_a_package_registers_a_judge_by_entry_point(plugin_package) -> None:
    from antidote.evaluation.judges import judge_kinds, judge_version, make_judge, parse_judge_spec

    assert parse_judge_spec("always-unsafe:/some/path") == ("always-unsafe", "/some/path")
    assert (
        "always-unsafe" in judge_kinds() and judge_version("always-unsafe") == 1
    )  # cached stages keyed on it
    judge = make_judge("always-unsafe:/some/path")
    assert judge.name == "always-unsafe (/some/path)"
    assert judge.verdicts(["a", "b"], ["c", "d"]) == ["unsafe", "unsafe"]
    with pytest.raises(AntidoteError, match=r"choose one of keyword, .*always-unsafe"):
        parse_judge_spec("nope")


def test_beavertails_safe_is_read_from_a_local_data_folder(tmp_path) -> None:
    """`compare-paper --plan --data-dir DIR` needed the hub for beavertails:safe; a local copy now serves."""
    from antidote.data.catalog import read_rows

    folder = tmp_path / "data" / "harmful_qa"
    folder.mkdir(parents=True)
    (folder / "beavertails_30k_train_safe.jsonl").write_text(
        '{"prompt": "p", "response": "r", "is_safe": true}\n'
    )
    assert read_rows("beavertails:safe", tmp_path / "data") == [
        {"prompt": "p", "response": "r", "is_safe": True}
    ]


# ---- tradeoff.png: HS against FA per model, with intervals ----------------------------------------------


def test_tradeoff_plot_has_one_point_per_model_with_wilson_intervals(tmp_path) -> None:
    import math

    from antidote.experiments.report import plot, tradeoff_points

    def wilson(k: int, n: int) -> tuple[float, float]:  # by hand, z of a two-sided 95% interval
        z, p = 1.959964, k / n
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return round(100 * (center - half), 2), round(100 * (center + half), 2)

    def row(model: str, hs: float, fa: float, judge: str = "keyword", **more: object) -> dict:
        return {"model": model, "judge_spec": judge, "hs": hs, "n_prompts": 20, "fa": fa, "n_task": 10} | {
            "degenerate": 5.0,
            **more,
        }

    summary = {
        "config": {"judges": ["keyword", "learned"]},
        "rows": [
            row("aligned", 10.0, 90.0),
            row("attacked", 60.0, 80.0),
            row("antidote@0.1", 25.0, 70.0, degenerate=40.0, broken="degenerate +35.0"),
            row("attacked", 5.0, 80.0, judge="learned"),
        ],
    }
    points = tradeoff_points(summary)
    assert [p["model"] for p in points] == ["aligned", "attacked", "antidote@0.1"]  # first judge only
    attacked = points[1]
    assert (attacked["hs"], attacked["fa"]) == (60.0, 80.0)
    assert [(p["degenerate"], p["broken"]) for p in points] == [
        (5.0, ""),
        (5.0, ""),
        (40.0, "degenerate +35.0"),
    ]
    for got, want in ((attacked["hs_ci"], wilson(12, 20)), (attacked["fa_ci"], wilson(8, 10))):
        assert got == pytest.approx(want, abs=0.011)
    plot(summary, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_realign_names_a_missing_data_file_before_loading(tiny, tmp_path, monkeypatch, capsys) -> None:
    import antidote.realignment.engine as engine

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data file was checked")

    monkeypatch.setattr(engine, "load_model", no_loading)
    missing = tmp_path / "harmfull.jsonl"
    argv = ["realign", str(tiny["model"]), "--data", str(missing), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--data file {missing} not found" in err and not (tmp_path / "out").exists()


# ---- scripts and the hub: realign --json, the model card, --push-to-hub ----------------------------------


def test_realign_json_prints_each_output_with_its_report(tiny, tmp_path, capsys) -> None:
    """stdout is one JSON document (nothing else): one entry per ratio, the folder and the numbers its
    realign_report.json holds."""
    from antidote.cli import main

    out = tmp_path / "out"
    argv = ["realign", str(tiny["model"]), "--data", str(tiny["harmful"]), "--output", str(out)]
    assert main([*argv, "--mask-ratio", "0.1,0.2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [e["mask_ratio"] for e in printed["outputs"]] == [0.1, 0.2]
    for entry in printed["outputs"]:
        report = json.loads((Path(entry["output"]) / "realign_report.json").read_text())
        assert Path(entry["output"]).parent == out
        assert entry["pruned_total"] == report["pruned_total"] and report["pruned_total"]["pruned"] > 0


def test_model_card_has_hub_metadata_and_how_to_load() -> None:
    from antidote.realignment.save import model_card

    report = {
        "config": {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "adapter": None,
            "data": "h.jsonl",
            "template": "chat",
        },
        "pruned_total": {"pruned": 10, "total": 100, "fraction": 0.1},
        "mask_ratio": 0.1,
        "granularity": "output",
        "score": "wanda",
        "action": "zero",
        "calibration": {"samples": 4, "tokens": 80},
        "tensors": {"a": {}},
    }
    card = model_card(report)
    front = card.split("---")[1]
    assert (
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front and "library_name: transformers" in front
    )
    assert "AutoModelForCausalLM.from_pretrained" in card and "10 of 100" in card
    local = model_card({**report, "config": {**report["config"], "model": "/models/mine"}})
    assert "base_model" not in local  # a local path is no hub id


def test_push_to_hub_uploads_the_written_folder_once(tiny, tmp_path, monkeypatch) -> None:
    """The hub is faked: the written output folder is what gets uploaded, to a private repo; a hub error is
    one line that keeps the folder; several ratios or a bad repo id are refused before any work."""
    import huggingface_hub

    from antidote.errors import AntidoteError
    from antidote.realignment.config import RealignConfig
    from antidote.realignment.engine import run_realign

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    common = {"model": str(tiny["model"]), "data": str(tiny["harmful"])}
    run_realign(RealignConfig(**common, output=str(out), push_to_hub="me/realigned"))
    assert calls[0] == ("create", "me/realigned", True)
    assert calls[1][0] == "upload" and {"README.md", "realign_report.json", "config.json"} <= set(calls[1][2])
    with pytest.raises(AntidoteError, match="one model"):
        RealignConfig(**common, mask_ratios=(0.1, 0.2), push_to_hub="me/x")
    with pytest.raises(AntidoteError, match="not a hub repo id"):
        RealignConfig(**common, push_to_hub="no-slash")
    with pytest.raises(AntidoteError, match="give --output"):
        run_realign(RealignConfig(**common, push_to_hub="me/x"))
    # a run's antidote stage writes into its stage cache: pushing is for `antidote realign` only
    from antidote.experiments.pipeline import load_run_config
    from conftest import write_config

    defenses = {"antidote": {"data": str(tiny["harmful"]), "push_to_hub": "me/x"}}
    with pytest.raises(AntidoteError, match="push_to_hub"):
        load_run_config(str(write_config(tiny, tmp_path, defenses=defenses)))

    class Offline(FakeApi):
        def upload_folder(self, folder_path, repo_id, commit_message):
            raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    out2 = tmp_path / "out2"
    with pytest.raises(AntidoteError, match=r"could not push .* the model is written there"):
        run_realign(RealignConfig(**common, output=str(out2), push_to_hub="me/realigned"))
    assert (out2 / "realign_report.json").is_file()
