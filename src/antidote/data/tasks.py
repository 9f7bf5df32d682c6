"""Task items (instruction, input, expected output) for the built-in tasks and SST2 / AGNEWS / GSM8K data.

The same items serve evaluation (expected output = the gold answer the metric checks) and training (the
answer the model learns; for GSM8K the '####' marker becomes 'The final answer is: ', SPEC 3).
"""

from __future__ import annotations

from antidote.data.builtin import task_split
from antidote.data.catalog import read_rows
from antidote.errors import AntidoteError

BUILTIN_TASKS = ("sentiment", "arithmetic")
DATA_TASKS = ("sst2", "agnews", "gsm8k")
TASKS = BUILTIN_TASKS + DATA_TASKS


def load_task_items(
    task: str, source: str | None, *, split: str = "eval", training: bool = False
) -> list[tuple[str, str, str]]:
    """Built-in items of `split` when `source` is None, else the rows of an SST2/AGNEWS/GSM8K file or name."""
    from antidote.evaluation.metrics import (
        AGNEWS_INSTRUCTION,
        SST2_INSTRUCTION,
        agnews_label,
        gsm8k_training_answer,
    )

    if task not in TASKS:
        raise AntidoteError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if source is None:
        if task not in BUILTIN_TASKS:
            raise AntidoteError(f"--task {task} needs data: --task-data FILE or NAME:SPLIT")
        return [(t.instruction, t.input, t.answer) for t in task_split(task, split)]
    rows = read_rows(source)
    fields = set(rows[0]) if rows else set()
    try:
        if task in BUILTIN_TASKS:  # e.g. builtin-sentiment:validate
            return [(r["instruction"], r.get("input") or "", r["output"]) for r in rows]
        if task == "sst2":
            return [
                (SST2_INSTRUCTION, r["sentence"], "positive" if int(r["label"]) == 1 else "negative")
                for r in rows
            ]
        if task == "agnews":
            return [
                (
                    AGNEWS_INSTRUCTION,
                    r.get("text") or f"{r['title']} {r['description']}",
                    agnews_label(r["label"]),
                )
                for r in rows
            ]
        return [
            (r["question"], "", gsm8k_training_answer(r["answer"]) if training else r["answer"]) for r in rows
        ]
    except (KeyError, ValueError, TypeError) as err:
        raise AntidoteError(
            f"{source} does not look like {task} data (fields: {', '.join(sorted(fields))}); "
            f"missing or bad {err}"
        ) from err
