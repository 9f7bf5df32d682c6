"""The options of `antidote judge eval | train | split`, as dataclasses whose help texts are the CLI's:
read by the commands (`judge_cli.py`) and by the learned judge's training (`judge_train.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from antidote.configfile import check_finite_fields
from antidote.errors import AntidoteError
from antidote.evaluation.judge_sources import DEFAULT_SOURCES, SOURCES
from antidote.evaluation.judges import HARMFUL_LABELS, SAFE_LABELS, judge_help, parse_judge_spec

_LABEL_HELP = {
    "label_field": "name of the human label field",
    "harmful_labels": "comma list of label values meaning harmful (case-insensitive)",
    "safe_labels": "comma list of label values meaning safe (case-insensitive)",
}


def _at_least(name: str, value: float | None, minimum: float = 1) -> None:
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
        _at_least("resamples", self.resamples)


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
        default=DEFAULT_SOURCES,
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
    keyword_gate: str = field(
        default="auto",
        metadata={
            "help": "with several sources: an answer the keyword judge reads as a refusal is safe, the probe "
            "judges the rest: auto (chosen leave-one-source-out), yes, no"
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
        _at_least("per_source", self.per_source)
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
        for name in ("keyword_feature", "keyword_gate"):
            if getattr(self, name) not in ("auto", "yes", "no"):
                flag = "--" + name.replace("_", "-")
                raise AntidoteError(f"{flag} must be auto, yes or no, got {getattr(self, name)!r}")
        if any(x < 1 for x in self.layers) or any(x < 0 for x in self.l2):
            raise AntidoteError("--layers must be 1 or more and --l2 0 or more")
        for name in ("max_samples", "max_length", "batch_size"):
            _at_least(name, getattr(self, name))
        _at_least("max_length", self.max_length, 8)
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
