"""Tasks by name: instruction, items from data rows or built-in items, and the accuracy check (FA).

Adding a task = one module defining a `Task` + one line in TASKS below. Help texts and validation that
list task names are built from TASKS (`task_help`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from antidote.data.catalog import read_rows
from antidote.data.loading import Example, load_examples
from antidote.errors import AntidoteError
from antidote.tasks.agnews import AGNEWS
from antidote.tasks.base import Task, TaskExample
from antidote.tasks.gsm8k import ARITHMETIC, GSM8K
from antidote.tasks.sentiment import SENTIMENT, SST2

TASKS: dict[str, Task] = {
    "sentiment": SENTIMENT,
    "arithmetic": ARITHMETIC,
    "sst2": SST2,
    "agnews": AGNEWS,
    "gsm8k": GSM8K,
}


def get_task(name: str) -> Task:
    """The registered task `name`; AntidoteError listing the known names otherwise."""
    if name not in TASKS:
        raise AntidoteError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_names(*, needs_data: bool | None = None) -> list[str]:
    """Registered names in registry order; with needs_data, only the data tasks (True) or built-in ones."""
    return [n for n, t in TASKS.items() if needs_data is None or t.needs_data == needs_data]


def task_help() -> str:
    """The registered names for help texts: 'sentiment, arithmetic (built-in); sst2, ... (need --task-data)'.

    The only list of task names that help texts show: a new task in TASKS appears there by itself.
    """
    builtin, data = task_names(needs_data=False), task_names(needs_data=True)
    return f"{', '.join(builtin)} (built-in); {', '.join(data)} (need --task-data)"


def load_task_items(
    task: str,
    source: str | None,
    *,
    split: str = "eval",
    training: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[TaskExample]:
    """Items of `task`: its built-in items of `split` when `source` is None, else one per row of `source`
    (a file, hf:NAME[:SPLIT] or a named data set read from `data_dir`, default $ANTIDOTE_DATA_DIR).

    training: expected outputs in their training form (GSM8K: '####' -> 'The final answer is: ').
    """
    found = get_task(task)
    if source is None:
        return found.builtin_items(split)
    return found.items(read_rows(source, data_dir), training=training, source=source)


def load_pairs(
    source: str | Sequence[Mapping[str, Any]],
    *,
    filters: Sequence[str] = (),
    max_samples: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[Example]:
    """`load_examples`, where a data set of a data task (`sst2:train-fit`: a sentence and a 0/1 label per
    row) gives that task's items as pairs: its instruction, the row as input and the expected output in its
    training form, as the fine-tuning read them (filters then match those fields)."""
    task = TASKS.get(source.partition(":")[0]) if isinstance(source, str) else None
    if isinstance(source, str) and task is not None and task.needs_data:
        items = load_task_items(task.name, source, training=True, data_dir=data_dir)
        source = [{"prompt": p, "input": x, "response": r} for p, x, r in items]
    return load_examples(source, filters=filters, max_samples=max_samples, seed=seed, data_dir=data_dir)


__all__ = [
    "TASKS",
    "Task",
    "TaskExample",
    "get_task",
    "load_pairs",
    "load_task_items",
    "task_help",
    "task_names",
]
