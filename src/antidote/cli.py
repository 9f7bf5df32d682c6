"""Command line: `antidote realign ...`. Options are generated from the config dataclasses, so the CLI,
YAML files (`--config x.yaml`) and the Python API share one source of truth.

Heavy imports (torch, transformers) happen inside the commands, so `antidote --help` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from antidote.configfile import check_finite_fields, read_yaml_mapping, values_from_mapping
from antidote.errors import AntidoteError
from antidote.outputs import json_text


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
                help=help_text if default is None else f"{help_text} (default: {default})",
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
    config = cls(**values)
    check_finite_fields(config)
    return config


def read_yaml(path: str, cls: type) -> dict[str, Any]:
    """Field values of `cls` from a YAML file; keys may be field names or flag names (`mask-ratio`)."""
    return values_from_mapping(cls, read_yaml_mapping(path), f"config file {path}")


# ---- commands -------------------------------------------------------------------------------------------


def cmd_realign(args: argparse.Namespace) -> int:
    from antidote.realignment.config import RealignConfig

    config = config_from_args(RealignConfig, args)
    if not config.output:
        raise AntidoteError("missing --output DIR; the realigned model is written there")
    from antidote.realignment.engine import run_realign

    result = run_realign(config)
    if not result.reports:  # a rank other than 0 under torchrun: rank 0 writes and reports
        return 0
    if args.json:  # one entry per mask ratio: the folder written and its report (realign_report.json)
        outputs = [{"output": str(f), **r} for r, f in zip(result.reports, result.folders, strict=True)]
        hub = {"pushed_to": f"https://huggingface.co/{config.push_to_hub}"} if config.push_to_hub else {}
        print(json_text({"outputs": outputs, **hub}, indent=2, default=str))
        return 0
    for report, folder in zip(result.reports, result.folders, strict=True):
        t = report["pruned_total"]
        print(
            f"alpha {report['mask_ratio']:g}: pruned {t['pruned']:,} of {t['total']:,} weights "
            f"({100 * t['fraction']:.2f}%) in {len(report['tensors'])} tensors -> {folder}"
        )
    seconds = result.reports[-1]["seconds"]
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if config.push_to_hub:
        print(f"uploaded to https://huggingface.co/{config.push_to_hub}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from antidote.training.stages import AlignConfig, run_align

    output = run_align(config_from_args(AlignConfig, args))
    print(json_text({"output": str(output)}) if args.json else f"aligned model -> {output}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from antidote.training.stages import FinetuneConfig, run_finetune

    output = run_finetune(config_from_args(FinetuneConfig, args))
    print(json_text({"output": str(output)}) if args.json else f"fine-tuning adapter -> {output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from antidote.evaluation.run import EvaluateConfig, run_evaluate

    r = run_evaluate(config_from_args(EvaluateConfig, args))
    if args.json:
        print(json_text(r, indent=2, default=str))
        return 0
    print(
        f"HS {r['hs']} ({r['judge']} judge, {r['n_prompts']} prompts from {r['harmful_set']}; "
        f"degenerate {r['degenerate']}), FA {r['fa']} ({r['task']}, {r['n_task']} items), "
        f"over-refusal {r['over_refusal']} ({r['n_harmless']} harmless) -> {r['config']['output']}"
    )
    for row in r["by_judge"].values():
        print(f"HS {row['hs']} [{row['hs_ci'][0]}, {row['hs_ci'][1]}] ({row['judge']} judge)")
    for spec, why in r["judges_missing"].items():
        print(f"judge {spec} left out: {why}")
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    from antidote.defenses import get

    defense = get(args.defense)
    config = config_from_args(defense.config, args)
    if not getattr(config, "output", None):
        raise AntidoteError(f"missing --output DIR; {defense.name} writes its model there")
    for label, folder in defense.run(config).items():
        print(f"{defense.name}{'@' + label if label else ''} -> {folder}")
    return 0


def _run_config(path: str, args: argparse.Namespace, run_dir: str | None) -> Any:
    from antidote.experiments.runconfig import load_run_config

    return load_run_config(path, run_dir=run_dir, data_dir=getattr(args, "data_dir", None))


def _run(config: Any) -> dict[str, Any]:
    """A run config's run: one pipeline, or with `seeds:` one per seed on one cache (a compare)."""
    from antidote.api import run_config

    return run_config(config)


def _finish_run(summary: dict[str, Any], as_json: bool = False) -> int:
    run_dir = Path(summary["run_dir"])
    if as_json:
        print(json_text(summary, indent=2, default=str))
        return 0
    if "out" in summary:  # a run over several seeds is a compare over the attack's seed
        print((run_dir / "report.md").read_text())
        print(f"everything is in {run_dir}: report.md, results.csv, results.json, table.tex, plots/, cells/")
        return 0
    print((run_dir / "results.md").read_text())
    print(
        f"everything is in {run_dir}: results.json, summary.json, results.md, generations.jsonl, "
        "tradeoff.png and stages/" + (" and models/" if (run_dir / "models").is_dir() else "")
    )
    return 0


def _clear_for_overwrite(config: Any) -> None:
    from antidote.api import clear_for_overwrite

    clear_for_overwrite(config)


def plan_run(config: Any, path: str = "the config") -> str:
    from antidote.api import plan_run as plan

    return plan(config, path)


def cmd_run(args: argparse.Namespace) -> int:
    from antidote.api import load_run

    config = load_run(args.config_file, args.output, getattr(args, "data_dir", None))
    return _run_or_plan(config, args, args.config_file)


def _run_or_plan(config: Any, args: argparse.Namespace, path: str) -> int:
    args.resume_dir = config.run_dir  # Ctrl-C names it (see main)
    if args.plan:
        print(plan_run(config, path))
        return 0
    if args.overwrite:
        _clear_for_overwrite(config)
    return _finish_run(_run(config), as_json=args.json)


QUICK_BANNER = (
    "demo --quick: every stage at tiny sizes, a smoke test of the install; its numbers (HS, FA) mean "
    "nothing. `antidote demo` gives the real demo."
)


def cmd_demo(args: argparse.Namespace) -> int:
    from antidote.experiments.runconfig import packaged_config

    name = "demo-quick" if args.quick else "demo"
    output = args.output
    if output is None:  # runs/demo (runs/demo-quick): the same command again resumes where it stopped
        output = f"runs/{name}"
        Path("runs").mkdir(exist_ok=True)
    path = str(packaged_config(name))
    config = _run_config(path, args, output)
    code = _run_or_plan(config, args, path)
    if args.quick and not args.json and not args.plan:
        print(QUICK_BANNER)
    return code


def cmd_compare(args: argparse.Namespace) -> int:
    from antidote.experiments.compare import clear_compare_dir, load_compare_config, run_compare
    from antidote.experiments.plan import plan

    config = load_compare_config(args.config_file, run_dir=args.output, data_dir=args.data_dir)
    if args.cells:
        from antidote.experiments.matrix import select_cells

        if args.overwrite:
            raise AntidoteError(
                "--overwrite with --cells would remove every part's stages, not only these cells'; run "
                "--overwrite without --cells, or leave it out to resume"
            )
        config = select_cells(config, args.cells)
    if args.reverse:
        from antidote.experiments.matrix import reverse_defenses

        if args.overwrite:
            raise AntidoteError("--overwrite with --reverse would remove the other part's stages; drop one")
        config = reverse_defenses(config)
    args.resume_dir = str(config.out)
    if args.plan:
        print(plan(config))
        return 0
    if args.overwrite:
        clear_compare_dir(config.out)
    result = run_compare(config)
    out = result.out
    if args.json:
        from antidote.api import compare_dict

        print(json_text(compare_dict(result), indent=2))
        return 0
    print((out / "report.md").read_text())
    print(
        f"everything is in {out}: results.csv, results.json, report.md, table.tex, plots/, cells/ and "
        f"stages/ ({len(result.built)} stages built, {len(result.reused)} reused)"
    )
    return 0


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout (for scripts) instead of text"
    )


def _realign_options(parser: argparse.ArgumentParser) -> None:
    _json_option(parser)
    parser.add_argument(
        "--method",
        default="antidote",
        help="antidote (the paper's, these options), or another realignment method run with its own "
        "options, as `antidote defend NAME` (e.g. harm-revert: take out the parts of a LoRA update credited "
        "with the harmful answers; `antidote defend harm-revert --help`)",
    )


def realign_method(argv: list[str]) -> list[str]:
    """`antidote realign --method NAME ...` is `antidote defend NAME ...` for a method other than the
    paper's (a post-fine-tuning defense: it takes the fine-tuned model); `--method antidote` is dropped."""
    if not argv or argv[0] != "realign":
        return argv
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            name, rest = argv[i + 1], argv[1:i] + argv[i + 2 :]
        elif arg.startswith("--method="):
            name, rest = arg.split("=", 1)[1], argv[1:i] + argv[i + 1 :]
        else:
            continue
        if name == "antidote":
            return ["realign", *rest]
        from antidote.defenses import get

        if get(name).stage != "post":
            raise AntidoteError(
                f"--method {name} is a {get(name).stage}-stage defense, not a realignment of a fine-tuned "
                f"model; run it with antidote defend {name}, or choose a post defense (antidote defend "
                "--help lists them)"
            )
        return ["defend", name, *rest]
    return argv


def _compare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config_file",
        metavar="CONFIG.yaml",
        help="a run config plus a matrix: section (see configs/compare-*)",
    )
    _add_output(parser, "output folder (overrides run_dir in the config)", "--out")
    parser.add_argument(
        "--cells",
        metavar="SETTING",
        action="append",
        default=None,
        help="run only this setting (what sets it apart from the default, e.g. lr=0.0001, or default; add "
        ",seed=N for one cell); repeatable. A matrix too long for one sitting runs in parts that share the "
        "output folder's stage cache; a last run without --cells reuses them all and reports every cell",
    )
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="build each cell's defenses in reverse order: a second process on the same cells starts from "
        "the other end (the same stages; parts share the folder), so two cores finish one cell sooner",
    )
    _add_plan_overwrite_json(parser)


def _add_output(parser: argparse.ArgumentParser, help_text: str, *old_names: str) -> None:
    """`--output` as every command names its output; the names earlier versions used still work, unlisted."""
    parser.add_argument("--output", metavar="DIR", default=None, help=help_text)
    for old in old_names:
        parser.add_argument(old, dest="output", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_plan_overwrite_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the stages, cached or to build, with a time estimate: from the stages already "
        "recorded in the folder, per unit of work, else from reference rates measured on 2 CPU cores; no "
        "work",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo everything: remove what an earlier run wrote there"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on stdout (for scripts) instead of tables",
    )


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="data folder (layout: docs/data-folder.md), for data given by name (advbench, sst2:train, "
        "beavertails:unsafe, ...); default: a run config's data_dir, $ANTIDOTE_DATA_DIR, else the hub",
    )


def _add_config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="read options from a YAML file (command-line values win)"
    )


def _demo_options(parser: argparse.ArgumentParser) -> None:
    _add_output(
        parser,
        "run folder (default: runs/demo, runs/demo-quick with --quick); the same command again resumes where "
        "it stopped",
    )
    _add_plan_overwrite_json(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: a smoke test of every stage (about 2 minutes on 2 CPU cores); its numbers mean "
        "nothing",
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config_file",
        metavar="CONFIG.yaml",
        help="the run config (see configs/), or the name of one shipped in the package: demo, demo-quick",
    )
    _add_output(parser, "run folder (overrides run_dir in the config)", "--run-dir")
    _add_plan_overwrite_json(parser)


def _defend_options(parser: argparse.ArgumentParser) -> None:
    from antidote.defenses import REGISTRY

    methods = parser.add_subparsers(dest="defense", metavar="DEFENSE", required=True)
    for name, defense in sorted(REGISTRY.items()):
        sub = methods.add_parser(
            name,
            help=f"[{defense.stage}] {defense.summary}",
            description=f"{defense.summary} (stage: {defense.stage})",
        )
        _add_config_file(sub)
        add_dataclass_arguments(sub, defense.config)


def _judge_options(parser: argparse.ArgumentParser) -> None:
    from antidote.evaluation.judge_cli import add_judge_subcommands

    add_judge_subcommands(parser, add_dataclass_arguments, _add_config_file)


def cmd_judge(args: argparse.Namespace) -> int:
    from antidote.evaluation.judge_cli import run_judge_command

    return run_judge_command(args, config_from_args)


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its options come from `config` (a dataclass) and/or `options` (a function)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    config: Callable[[], type] | None = None  # imported when the parser is built
    options: Callable[[argparse.ArgumentParser], None] | None = None
    description: str = ""


def _realign_config() -> type:
    from antidote.realignment.config import RealignConfig

    return RealignConfig


def _align_config() -> type:
    from antidote.training.stages import AlignConfig

    return AlignConfig


def _finetune_config() -> type:
    from antidote.training.stages import FinetuneConfig

    return FinetuneConfig


def _evaluate_config() -> type:
    from antidote.evaluation.run import EvaluateConfig

    return EvaluateConfig


COMMANDS = (
    Command(
        "realign",
        "prune the weights most important on harmful data and save the realigned model",
        cmd_realign,
        _realign_config,
        _realign_options,
        description="Score every targeted weight by its importance on harmful prompt+answer pairs "
        "(Wanda: |W| * ||X||) and zero the top fraction in one shot.",
    ),
    Command(
        "align",
        "LoRA SFT on refusals mixed with helpful answers; writes the merged model",
        cmd_align,
        _align_config,
        _json_option,
    ),
    Command(
        "finetune",
        "the attack: a new LoRA on task data with a harmful fraction",
        cmd_finetune,
        _finetune_config,
        _json_option,
    ),
    Command(
        "evaluate",
        "harmful score, task accuracy and over-refusal of a model (greedy, batched)",
        cmd_evaluate,
        _evaluate_config,
        _json_option,
        description="Generate on harmful prompts, task items and harmless instructions; score HS with a "
        "judge (keyword: offline, degenerate output reported apart; the others: --judge lists them) and "
        "FA with the task's exact-match metric.",
    ),
    Command(
        "judge",
        "measure a judge against human labels (eval), train the learned judge (train), split by prompt",
        cmd_judge,
        options=_judge_options,
        description="`antidote judge eval --data LABELLED.jsonl --judge JUDGE`: agreement with human labels "
        "with 95% intervals; `antidote judge train --data FILE --output DIR`: a logistic probe on a frozen "
        "local LM's hidden states, used as --judge learned:DIR; `antidote judge split`: a held-out file by "
        "prompt. `antidote judge ACTION --help` lists each one's options.",
    ),
    Command(
        "defend",
        "run one registered defense (antidote, random-prune, magnitude-prune, ...) on HF folders",
        cmd_defend,
        options=_defend_options,
        description="Every method of the comparison harness, by name; `antidote defend NAME --help` lists "
        "its options (the same keys as its section under `defenses:` in a run config).",
    ),
    Command(
        "run",
        "the whole pipeline from a YAML config, with a stage cache (reruns resume)",
        cmd_run,
        options=_run_options,
        description="align -> finetune (attack) -> defenses -> evaluate, as configured in CONFIG.yaml (see "
        "configs/). Finished stages are cached under RUN_DIR/stages by a hash of their inputs, so a rerun "
        "after an interruption redoes only unfinished stages.",
    ),
    Command(
        "compare",
        "every defense over a matrix of attack settings and seeds: CSV/JSON, report, LaTeX table, plots",
        cmd_compare,
        options=_compare_options,
        description="The run config of CONFIG.yaml plus a matrix: section (lr, epochs, harmful_ratio, "
        "num_samples, seeds, tasks, all_seeds_for, sweep: one-at-a-time or product). Every cell is an "
        "`antidote run` in OUT/cells/ sharing one stage cache OUT/stages, so a setting or defense added "
        "later reuses the rest. See docs/compare.md.",
    ),
    Command(
        "demo",
        "align -> attack -> realign -> evaluate the embedded SmolLM2 on built-in data (CPU, ~15 min)",
        cmd_demo,
        options=_demo_options,
        description="`antidote run demo`: shows, on held-out prompts, an aligned model broken by a "
        "poisoned fine-tune and repaired by Antidote, with the cost in task accuracy.",
    ),
)


def _add_verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v/-q, before or after the subcommand (a subcommand's copy leaves the value alone unless given)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress details")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="only errors: no progress logs or bars"
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, exit code 2 (the usage is in --help)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"antidote: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from antidote import __version__

    parser = _Parser(
        prog="antidote",
        description="Make fine-tuned LLMs safe again after harmful fine-tuning (Antidote, arXiv 2408.09600).",
    )
    parser.add_argument("--version", action="version", version=f"antidote {__version__}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description or command.help)
        _add_verbosity(p, argparse.SUPPRESS)
        if command.config is not None:
            _add_config_file(p)
            add_dataclass_arguments(p, command.config())
        if command.options is not None:
            command.options(p)
        if command.name in ("run", "demo", "compare"):
            _add_data_dir(p)
        p.set_defaults(func=command.run)
    return parser


def _disk_full(err: BaseException | None) -> str | None:
    """The message of a "no space left" / "quota exceeded" error in `err` or its causes, else None (the
    safetensors and torch writers raise their own exception types, with the system's message inside)."""
    import errno

    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{err.strerror}: {err.filename}" if err.filename else str(err.strerror)
        text = str(err)
        for words in ("No space left on device", "Disk quota exceeded"):
            if words in text:
                return words
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = realign_method(argv)
    except AntidoteError as err:
        print(f"antidote: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    if args.quiet:
        import os

        os.environ["TQDM_DISABLE"] = "1"  # tqdm's and transformers' progress bars
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except AntidoteError as err:
        print(f"antidote: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        full = _disk_full(err)
        if full is None:
            raise
        print(
            f"antidote: error: the disk is full ({full}); nothing partial was kept: free space (or choose "
            "an --output / $ANTIDOTE_CACHE on another disk) and run again: finished stages are reused",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(interrupted_message(args), file=sys.stderr)
        return 130


def interrupted_message(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: a staged command (run, demo, compare) keeps every finished stage and resumes from
    them; any other command writes its output only when complete, so nothing of it was written."""
    resume_dir = getattr(args, "resume_dir", None)
    if resume_dir is None:
        return "antidote: interrupted; no output was written (outputs move into place only when complete)"
    again = " ".join(["antidote", *(a for a in args.argv if a != "--overwrite")])
    return (
        f"antidote: interrupted; the finished stages are kept in {resume_dir}/stages. Run the same command "
        f"again ({again}) to resume where it stopped"
    )
