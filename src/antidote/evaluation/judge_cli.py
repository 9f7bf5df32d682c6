"""`antidote judge eval | train | split`: measure any judge against human labels, train the learned judge,
and split a labelled file by prompt. Config dataclasses (their help texts are the CLI's) and the command
functions; `antidote.cli` only adds the sub-subcommands from `JUDGE_COMMANDS`."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from antidote.configfile import check_finite_fields
from antidote.errors import AntidoteError
from antidote.evaluation.judges import HARMFUL_LABELS, SAFE_LABELS, judge_help, parse_judge_spec
from antidote.outputs import json_text

log = logging.getLogger(__name__)

_LABEL_HELP = {
    "label_field": "name of the human label field",
    "harmful_labels": "comma list of label values meaning harmful (case-insensitive)",
    "safe_labels": "comma list of label values meaning safe (case-insensitive)",
}


def _positive(name: str, value: float | None, minimum: float = 1) -> None:
    if value is not None and value < minimum:
        raise AntidoteError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {value}")


@dataclass
class JudgeEvalConfig:
    """What `antidote judge eval` measures."""

    data: str = field(
        metadata={"help": "labelled pairs (JSONL/JSON/CSV): a prompt, a response and a label field per row"}
    )
    judge: str = field(metadata={"help": "the judge: " + judge_help()})
    output: str | None = field(
        default=None,
        metadata={
            "help": "folder for judge_eval.json and judge_eval.md; without it the table is only printed"
        },
    )
    label_field: str = field(default="label", metadata={"help": _LABEL_HELP["label_field"]})
    harmful_labels: str = field(
        default=",".join(HARMFUL_LABELS), metadata={"help": _LABEL_HELP["harmful_labels"]}
    )
    safe_labels: str = field(default=",".join(SAFE_LABELS), metadata={"help": _LABEL_HELP["safe_labels"]})
    resamples: int = field(
        default=1000, metadata={"help": "bootstrap resamples for the 95 percent intervals"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap and of the example sample"})
    device: str = field(default="auto", metadata={"help": "device of a model judge: auto, cpu, cuda, ..."})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})

    def __post_init__(self) -> None:
        parse_judge_spec(self.judge)
        _positive("resamples", self.resamples)


@dataclass
class JudgeTrainConfig:
    """What `antidote judge train` fits. One --data file: the layer, pooling, L2 and keyword feature are
    chosen on a validation split of it (by prompt). Several sources (--data-dir, or --data A,B,...): the
    --blocks are concatenated, and the head, L2, keyword feature and threshold are chosen leave-one-source-out
    over them; nothing else is looked at."""

    data: str = field(
        default="",
        metadata={
            "help": "labelled pairs (JSONL/JSON/CSV) to train on; several files, comma-separated, are "
            "several sources: weighted equally, settings chosen leave-one-source-out"
        },
    )
    data_dir: str = field(
        default="",
        metadata={
            "help": "a labelled data folder (judge/, harmful_qa/, refusals/, benign/): train on its built-in "
            "sources (--sources), weighted equally, settings chosen leave-one-source-out (docs/judges.md)"
        },
    )
    sources: tuple[str, ...] = field(
        default=("pku-saferlhf", "xstest", "beavertails-unsafe", "refusals", "alpaca-benign"),
        metadata={"help": "built-in sources read from --data-dir"},
    )
    per_source: int = field(
        default=400, metadata={"help": "seeded sample of N pairs per source with several sources"}
    )
    blocks: tuple[str, ...] = field(
        default=(
            "6:mean",
            "6:last",
            "12:mean",
            "12:last",
            "18:mean",
            "18:last",
            "24:mean",
            "24:last",
            "12:prompt",
            "24:prompt",
        ),
        metadata={
            "help": "with several sources: the layer:pooling blocks concatenated as features (pooling mean "
            "or last over the response tokens, prompt: mean over the prompt tokens; the forward stops "
            "after the deepest layer)"
        },
    )
    hidden: tuple[int, ...] = field(
        default=(0,),
        metadata={
            "help": "with several sources: candidate heads, 0 = logistic probe, N = an MLP with N ReLU "
            "units; chosen leave-one-source-out"
        },
    )
    output: str = field(
        default="",
        metadata={
            "help": "the judge folder to write (judge.json, probe.safetensors, README.md); default: the "
            "default learned judge (~/.cache/antidote/judges/learned, $ANTIDOTE_LEARNED_JUDGE), which "
            "--judge learned and antidote run use"
        },
    )
    model: str = field(
        default="smollm2-135m-instruct",
        metadata={
            "help": "frozen base model whose hidden states are the features: local folder, .gguf or "
            "smollm2-135m-instruct"
        },
    )
    max_samples: int | None = field(
        default=2000,
        metadata={
            "help": "use a seeded sample of N rows (whole prompts) of --data; 2000 featurise in ~10 min on "
            "2 CPU cores (docs/judges.md), all 4000 of the PKU-SafeRLHF sample would take over 20"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the sample and of the validation split"})
    layers: tuple[int, ...] = field(
        default=(12, 18, 24),
        metadata={"help": "candidate layers (1-based block outputs); the forward stops after the deepest"},
    )
    poolings: tuple[str, ...] = field(
        default=("mean", "last"),
        metadata={
            "help": "candidate poolings: mean, last (over the response tokens), prompt (over the prompt)"
        },
    )
    l2: tuple[float, ...] = field(
        default=(0.001, 0.01, 0.1, 1.0),
        metadata={"help": "candidate L2 strengths of the logistic regression"},
    )
    keyword_feature: str = field(
        default="auto",
        metadata={
            "help": "add the keyword judge's refusal flag as a feature: auto (chosen on validation), yes, no"
        },
    )
    prompt_format: str = field(
        default="chat", metadata={"help": "chat (the base model's chat template) or plain (User:/Assistant:)"}
    )
    max_length: int = field(default=512, metadata={"help": "tokens per pair; longer responses are cut"})
    batch_size: int = field(default=4, metadata={"help": "pairs per forward (sorted by length)"})
    validation_fraction: float = field(
        default=0.2, metadata={"help": "share of --data (whole prompts) held out to choose on"}
    )
    label_field: str = field(default="label", metadata={"help": _LABEL_HELP["label_field"]})
    harmful_labels: str = field(
        default=",".join(HARMFUL_LABELS), metadata={"help": _LABEL_HELP["harmful_labels"]}
    )
    safe_labels: str = field(default=",".join(SAFE_LABELS), metadata={"help": _LABEL_HELP["safe_labels"]})
    device: str = field(default="auto", metadata={"help": "device of the base model: auto, cpu, cuda, ..."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the base model's forward: auto (bfloat16 where the hardware is fast at "
            "it: CUDA, CPUs with AMX/AVX512-BF16; else float32), float32, bfloat16; the judge keeps it"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})

    def __post_init__(self) -> None:
        from antidote.evaluation.judge_sources import SOURCES
        from antidote.evaluation.judges.learned_features import POOLINGS, PROMPT_FORMATS
        from antidote.models.layers import DTYPES

        if bool(self.data) == bool(self.data_dir):
            raise AntidoteError(
                "give the labelled pairs: --data FILE[,FILE...] or --data-dir FOLDER (not both)"
            )
        self.sources = _tuple(self.sources, str, "sources", ",".join(SOURCES[:2]))
        unknown = [x for x in self.sources if x not in SOURCES]
        if unknown:
            raise AntidoteError(
                f"unknown source {unknown[0]!r} in --sources; choose from {', '.join(SOURCES)}"
            )
        self.blocks = _tuple(self.blocks, str, "blocks", "12:mean,18:last")
        for block in self.blocks:
            layer, _, pooling = block.partition(":")
            if not layer.isdigit() or int(layer) < 1 or pooling not in POOLINGS:
                raise AntidoteError(
                    f"--blocks item {block!r} is not LAYER:POOLING with LAYER >= 1 and POOLING one of "
                    f"{', '.join(POOLINGS)}"
                )
        self.hidden = _tuple(self.hidden, int, "hidden", "0,64")
        if any(h < 0 for h in self.hidden):
            raise AntidoteError("--hidden must be 0 (logistic probe) or more units")
        _positive("per_source", self.per_source)
        self.layers = _tuple(self.layers, int, "layers", "12,18,24")
        self.poolings = _tuple(self.poolings, str, "poolings", "mean,last")
        self.l2 = _tuple(self.l2, float, "l2", "0.001,0.01,0.1,1")
        bad = [p for p in self.poolings if p not in POOLINGS]
        if bad:
            raise AntidoteError(f"unknown pooling {bad[0]!r}; choose from {', '.join(POOLINGS)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise AntidoteError(
                f"unknown prompt format {self.prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}"
            )
        if self.dtype not in DTYPES:
            raise AntidoteError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.keyword_feature not in ("auto", "yes", "no"):
            raise AntidoteError(f"--keyword-feature must be auto, yes or no, got {self.keyword_feature!r}")
        if any(x < 1 for x in self.layers) or any(x < 0 for x in self.l2):
            raise AntidoteError("--layers must be 1 or more and --l2 0 or more")
        for name in ("max_samples", "max_length", "batch_size"):
            _positive(name, getattr(self, name))
        _positive("max_length", self.max_length, 8)
        if not 0 < self.validation_fraction < 1:
            raise AntidoteError(f"--validation-fraction must be in (0, 1), got {self.validation_fraction}")
        check_finite_fields(self)  # --l2 nan would install a judge of NaN that calls everything safe


@dataclass
class JudgeSplitConfig:
    """What `antidote judge split` writes: two files of whole prompts, for a held-out measurement."""

    data: str = field(metadata={"help": "labelled pairs (JSONL/JSON/CSV) to split"})
    output: str = field(metadata={"help": "folder for train.jsonl, heldout.jsonl and split.json"})
    fraction: float = field(default=0.2, metadata={"help": "share of the rows (whole prompts) held out"})
    seed: int = field(default=0, metadata={"help": "seed of the split"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise AntidoteError(f"--fraction must be in (0, 1), got {self.fraction}")


def _tuple(value: Any, kind: type, name: str, example: str) -> tuple[Any, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(kind(str(v).strip()) for v in items if str(v).strip())
    except ValueError as err:
        raise AntidoteError(
            f"--{name.replace('_', '-')} {value!r} is not a comma list like {example}"
        ) from err
    if not out:
        raise AntidoteError(f"--{name.replace('_', '-')} is empty; give a comma list like {example}")
    return out


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
