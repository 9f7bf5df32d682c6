"""`antidote judge eval | train | split`: measure any judge against human labels, train the learned judge,
and split a labelled file by prompt. The command functions (their options: `judge_config.py`);
`antidote.cli` only adds the sub-subcommands from `JUDGE_COMMANDS`."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError
from antidote.evaluation.judge_config import JudgeEvalConfig, JudgeSplitConfig, JudgeTrainConfig
from antidote.evaluation.judges import parse_judge_spec
from antidote.outputs import json_text

log = logging.getLogger(__name__)

# ---- eval -------------------------------------------------------------------------------------------------


def run_judge_eval(config: JudgeEvalConfig) -> dict[str, Any]:
    """Judge every labelled pair, compare with the labels, write judge_eval.json/.md when --output."""
    from antidote.evaluation.agreement import judge_report, render_markdown
    from antidote.evaluation.judge_train import read_labelled
    from antidote.evaluation.judges import make_judge
    from antidote.outputs import atomic_output_dir, check_output_dir

    kind, path = parse_judge_spec(config.judge)
    if kind == "learned":  # `learned` alone is the installed judge, as everywhere else
        from antidote.evaluation.judges.learned import judge_folder, read_judge_record

        read_judge_record(judge_folder(path))
    data = read_labelled(config)
    out = check_output_dir(config.output, config.overwrite, inputs=(config.data,)) if config.output else None
    judge = make_judge(config.judge, device=config.device)
    start = time.perf_counter()
    verdicts = judge.verdicts(data.prompts, data.responses)
    seconds = time.perf_counter() - start
    report = judge_report(data, verdicts, judge.name, n_resamples=config.resamples, seed=config.seed)
    report.update(judge_spec=config.judge, judge_seconds=round(seconds, 1), config=asdict(config))
    markdown = render_markdown(report)
    if out is not None:
        with atomic_output_dir(out, config.overwrite) as tmp:
            (tmp / "judge_eval.json").write_text(json_text(report, indent=2) + "\n")
            (tmp / "judge_eval.md").write_text(markdown)
    report["markdown"] = markdown
    return report


def cmd_eval(config: JudgeEvalConfig) -> int:
    report = run_judge_eval(config)
    table = report["markdown"].split("\n## ")[0]
    print(table.rstrip())
    if config.output:
        print(f"-> {Path(config.output).expanduser().resolve()} (judge_eval.json, judge_eval.md)")
    return 0


# ---- train ------------------------------------------------------------------------------------------------


def cmd_train(config: JudgeTrainConfig) -> int:
    from antidote.evaluation.judge_train import run_judge_train

    r = run_judge_train(config)
    if "blocks" in r:
        print(
            f"learned judge -> {Path(config.output).expanduser().resolve()}: "
            f"{', '.join(f'{b[0]}:{b[1]}' for b in r['blocks'])}"
            f"{' + keyword flag' if r['keyword_feature'] else ''}, "
            f"{'MLP ' + str(r['hidden']) if r['hidden'] else 'logistic'}, L2 {r['l2']}, threshold "
            f"{r['threshold']:.3f}; sources {r['training']['sources']}; leave-one-source-out mean accuracy "
            f"{r['inner_leave_one_source_out']}; features {r['training']['featurise_seconds']} s"
        )
        return 0
    v = r["validation"]
    print(
        f"learned judge -> {Path(config.output).expanduser().resolve()}: layer {r['layer']} {r['pooling']}"
        f"{' + keyword flag' if r['keyword_feature'] else ''}, L2 {r['l2']}, threshold {r['threshold']:.3f}; "
        f"on the validation split these settings were chosen on ({v['n']} rows; optimistic, measure "
        f"held-out data with antidote judge eval): accuracy {v['accuracy']:.3f}, AUC {v['auc']:.3f}, "
        f"judge HS {v['judge_hs']:.1f} vs human HS {v['human_hs']:.1f}; "
        f"features {r['training']['featurise_seconds']} s"
    )
    return 0


# ---- split ------------------------------------------------------------------------------------------------


def run_judge_split(config: JudgeSplitConfig) -> dict[str, Any]:
    from antidote.data.loading import read_rows
    from antidote.evaluation.agreement import PROMPT_FIELDS
    from antidote.evaluation.judges.learned_training import split_by_prompt
    from antidote.outputs import atomic_output_dir, check_output_dir

    rows = read_rows(config.data)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise AntidoteError(f"{config.data} holds no records; give a JSONL/JSON/CSV file of labelled pairs")
    lower = {k.lower(): k for k in rows[0]}
    name = next((lower[n] for n in PROMPT_FIELDS if n in lower), None)
    if name is None or any(name not in r for r in rows):
        raise AntidoteError(f"{config.data} needs a prompt field in every row ({', '.join(PROMPT_FIELDS)})")
    out = check_output_dir(config.output, config.overwrite, inputs=(config.data,))
    kept, held = split_by_prompt([str(r[name]) for r in rows], config.fraction, config.seed)
    record = {
        "data": str(Path(config.data).expanduser().resolve()),
        "fraction": config.fraction,
        "seed": config.seed,
        "rows": len(rows),
        "train_rows": len(kept),
        "heldout_rows": len(held),
        "split": "by prompt text (whitespace-normalised): no prompt on both sides",
    }
    with atomic_output_dir(out, config.overwrite) as tmp:
        for file, idx in (("train.jsonl", kept), ("heldout.jsonl", held)):
            (tmp / file).write_text("".join(json_text(rows[i], ensure_ascii=False) + "\n" for i in idx))
        (tmp / "split.json").write_text(json_text(record, indent=2) + "\n")
    return record


def cmd_split(config: JudgeSplitConfig) -> int:
    r = run_judge_split(config)
    print(f"{r['train_rows']} training rows, {r['heldout_rows']} held-out rows -> {config.output}")
    return 0


# ---- the sub-subcommand table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeCommand:
    name: str
    help: str
    config: type
    run: Callable[[Any], int]
    description: str = ""


JUDGE_COMMANDS = (
    JudgeCommand(
        "eval",
        "agreement of a judge with human labels: accuracy, precision, recall, F1, kappa, HS, 95%% intervals",
        JudgeEvalConfig,
        cmd_eval,
        "Judge each labelled (prompt, response) pair and compare with the human label: accuracy, "
        "precision, recall, F1, Cohen's kappa and the judge's HS beside the human HS, each with a 95% "
        "percentile bootstrap interval, a confusion table and example disagreements. Degenerate and "
        "unparsed verdicts are counted and treated as not harmful.",
    ),
    JudgeCommand(
        "train",
        "train the learned judge: a logistic probe on a frozen local LM's hidden states (CPU)",
        JudgeTrainConfig,
        cmd_train,
        "Featurise each labelled pair with the frozen base model (chat template, hidden states pooled "
        "over the response), choose layer, pooling, L2 and the keyword feature on a validation split by "
        "prompt, and write a judge folder that --judge learned:PATH loads.",
    ),
    JudgeCommand(
        "split",
        "split a labelled file by prompt into train.jsonl and heldout.jsonl",
        JudgeSplitConfig,
        cmd_split,
        "Seeded split of whole prompts, so that a judge trained on train.jsonl is measured on prompts "
        "it never saw.",
    ),
)


def add_judge_subcommands(
    parser: argparse.ArgumentParser,
    add_arguments: Callable[[argparse.ArgumentParser, type], None],
    add_config_file: Callable[[argparse.ArgumentParser], None],
) -> None:
    """`antidote judge ACTION`: one sub-parser per entry of JUDGE_COMMANDS, options from its dataclass."""
    actions = parser.add_subparsers(dest="judge_action", metavar="ACTION", required=True)
    for command in JUDGE_COMMANDS:
        sub = actions.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        add_config_file(sub)
        add_arguments(sub, command.config)
        sub.set_defaults(judge_command=command)


def run_judge_command(
    args: argparse.Namespace, config_from_args: Callable[[type, argparse.Namespace], Any]
) -> int:
    command: JudgeCommand = args.judge_command
    return command.run(config_from_args(command.config, args))
