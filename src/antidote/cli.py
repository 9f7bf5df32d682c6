"""Command line: `antidote realign ...`. Options are generated from the config dataclasses, so the CLI,
YAML files (`--config x.yaml`) and the Python API share one source of truth.

Heavy imports (torch, transformers) happen inside the commands, so `antidote --help` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antidote.configfile import read_yaml_mapping, values_from_mapping
from antidote.errors import AntidoteError


def _flag(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))


def _base_type(annotation: Any) -> Any:
    """int | None -> int; list[str] -> list; tuple[float, ...] -> tuple."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(annotation) or annotation


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field; values not given on the command line are left out of the namespace."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        kind = _base_type(hints[f.name])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_text)
        elif kind is bool:
            parser.add_argument(
                _flag(f), dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
        elif kind is list:
            parser.add_argument(
                _flag(f),
                dest=f.name,
                action="append",
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=help_text,
            )
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            if isinstance(default, tuple):
                default = ",".join(str(v) for v in default)
            parser.add_argument(
                _flag(f),
                dest=f.name,
                type=str if kind is tuple else kind,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=f"{help_text} (default: {default})",
            )


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Dataclass defaults < values from `--config FILE.yaml` < values given on the command line.

    The YAML file is read and type-checked by `antidote.configfile`; an output that is or holds the
    config file is refused here, before any work.
    """
    from antidote.outputs import check_not_input

    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    if config_file:
        values.update(read_yaml(config_file, cls))
    values.update({k: v for k, v in vars(args).items() if k in names})
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        raise AntidoteError(
            f"missing {', '.join(missing).upper()}; give it on the command line or in --config"
        )
    if config_file and values.get("output"):
        output = Path(str(values["output"])).expanduser().resolve()
        check_not_input(output, [config_file], "--output")
    return cls(**values)


def read_yaml(path: str, cls: type) -> dict[str, Any]:
    """Field values of `cls` from a YAML file; keys may be field names or flag names (`mask-ratio`)."""
    return values_from_mapping(cls, read_yaml_mapping(path), f"config file {path}")


# ---- commands -------------------------------------------------------------------------------------------


def cmd_realign(args: argparse.Namespace) -> int:
    from antidote.config import RealignConfig

    config = config_from_args(RealignConfig, args)
    if not config.output:
        raise AntidoteError("missing --output DIR; the realigned model is written there")
    from antidote.engine import run_realign

    results = run_realign(config, keep_masks=False)
    for r in results:
        t = r.report["pruned_total"]
        print(
            f"alpha {r.report['mask_ratio']:g}: pruned {t['pruned']:,} of {t['total']:,} weights "
            f"({100 * t['fraction']:.2f}%) in {len(r.report['tensors'])} tensors -> {r.output}"
        )
    seconds = results[-1].report["seconds"]
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from antidote.training.stages import AlignConfig, run_align

    print(f"aligned model -> {run_align(config_from_args(AlignConfig, args))}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from antidote.training.stages import FinetuneConfig, run_finetune

    print(f"attack adapter -> {run_finetune(config_from_args(FinetuneConfig, args))}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from antidote.evaluation.run import EvaluateConfig, run_evaluate

    r = run_evaluate(config_from_args(EvaluateConfig, args))
    print(
        f"HS {r['hs']} ({r['judge']} judge, {r['n_prompts']} prompts from {r['harmful_set']}; "
        f"degenerate {r['degenerate']}), FA {r['fa']} ({r['task']}, {r['n_task']} items), "
        f"over-refusal {r['over_refusal']} ({r['n_harmless']} harmless) -> {r['config']['output']}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time as _time

    from antidote.experiments.demo import DemoConfig, run_demo
    from antidote.outputs import atomic_output_dir, check_output_dir

    output = args.output or f"runs/demo-{_time.strftime('%Y%m%d-%H%M%S')}"
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    out = check_output_dir(output, args.overwrite)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    with atomic_output_dir(out, args.overwrite) as tmp:
        run_demo(tmp, config, models_dir=tmp / "models")
    print((out / "results.md").read_text())
    print(f"everything is in {out}: results, summary, table, plot, generations and models/")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from antidote.experiments.pipeline import load_run_config, run_pipeline

    config = load_run_config(args.config_file, run_dir=args.run_dir, data_dir=args.data_dir)
    summary = run_pipeline(config)
    print((Path(summary["run_dir"]) / "results.md").read_text())
    print(
        f"everything is in {summary['run_dir']}: results.json, summary.json, results.md, tradeoff.png "
        "and stages/"
    )
    return 0


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder laid out like ../shared/data, for data given by name (advbench, sst2:train, "
        "beavertails:unsafe, ...); default: a run config's data_dir, $ANTIDOTE_DATA_DIR, else the hub",
    )


def build_parser() -> argparse.ArgumentParser:
    from antidote import __version__
    from antidote.config import RealignConfig
    from antidote.evaluation.run import EvaluateConfig

    parser = argparse.ArgumentParser(
        prog="antidote",
        description="Make fine-tuned LLMs safe again after harmful fine-tuning (Antidote, arXiv 2408.09600).",
    )
    parser.add_argument("--version", action="version", version=f"antidote {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    realign = sub.add_parser(
        "realign",
        help="prune the weights most important on harmful data and save the realigned model",
        description="Score every targeted weight by its importance on harmful prompt+answer pairs "
        "(Wanda: |W| * ||X||) and zero the top fraction in one shot.",
    )
    realign.add_argument(
        "--config", metavar="FILE.yaml", help="read options from a YAML file (command-line values win)"
    )
    add_dataclass_arguments(realign, RealignConfig)
    _add_data_dir(realign)
    realign.set_defaults(func=cmd_realign)
    from antidote.training.stages import AlignConfig, FinetuneConfig

    for name, cls, func, text in (
        (
            "align",
            AlignConfig,
            cmd_align,
            "LoRA SFT on refusals mixed with helpful answers; writes the merged model",
        ),
        (
            "finetune",
            FinetuneConfig,
            cmd_finetune,
            "the attack: a new LoRA on task data with a harmful fraction",
        ),
    ):
        stage = sub.add_parser(name, help=text, description=text)
        stage.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file")
        add_dataclass_arguments(stage, cls)
        _add_data_dir(stage)
        stage.set_defaults(func=func)
    evaluate = sub.add_parser(
        "evaluate",
        help="harmful score, task accuracy and over-refusal of a model (greedy, batched)",
        description="Generate on harmful prompts, task items and harmless instructions; score HS with a "
        "judge (keyword: offline, degenerate output reported apart; beavertails or llamaguard: a judge "
        "model) and FA with the task's exact-match metric.",
    )
    evaluate.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file")
    add_dataclass_arguments(evaluate, EvaluateConfig)
    _add_data_dir(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    demo = sub.add_parser(
        "demo",
        help="align -> attack -> realign -> evaluate the embedded SmolLM2 on built-in data (CPU, ~15 min)",
        description="Shows, on held-out prompts, an aligned model broken by a poisoned fine-tune and "
        "repaired by Antidote, with the cost in task accuracy.",
    )
    demo.add_argument("--output", help="run folder (default: a new runs/demo-<time>)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing non-empty run folder")
    demo.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every stage (~2 min)")
    demo.set_defaults(func=cmd_demo)
    run = sub.add_parser(
        "run",
        help="the whole pipeline from a YAML config, with a stage cache (reruns resume)",
        description="align -> finetune (attack) -> realign -> evaluate, as configured in CONFIG.yaml (see "
        "configs/). Finished stages are cached under RUN_DIR/stages by a hash of their inputs, so a rerun "
        "after an interruption redoes only unfinished stages.",
    )
    run.add_argument("config_file", metavar="CONFIG.yaml", help="the run config")
    run.add_argument("--run-dir", help="run folder (overrides run_dir in the config)")
    _add_data_dir(run)
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from antidote.data.sources import DATA_DIR_ENV, set_data_dir

    previous = os.environ.get(DATA_DIR_ENV)
    try:
        set_data_dir(getattr(args, "data_dir", None))
        return int(args.func(args))
    except AntidoteError as err:
        print(f"antidote: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("antidote: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:  # --data-dir is for this command only (main() is also called in-process by tests)
        if previous is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = previous
