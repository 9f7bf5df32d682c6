"""What a task is: its instruction, how a data row becomes an item, and how an answer is checked."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from antidote.data.builtin import task_split
from antidote.errors import AntidoteError

TaskItem = tuple[str, str, str]
"""(instruction, input, expected output). The model is asked the instruction with the input; the expected
output is the gold answer `correct` checks (evaluation) or the answer the model learns (training)."""


@dataclass(frozen=True)
class Task:
    """One task, registered by name in `antidote.tasks.TASKS`.

    name: the `--task` value.
    instruction: what the model is told, the same for every item (as the paper); None when each item brings
        its own (GSM8K: the question is the instruction).
    from_row: (data row, training) -> item; raise KeyError/ValueError/TypeError on a row that does not fit.
    correct: (model output, expected output of the item) -> whether the output is right.
    builtin: True when the task has built-in items (`antidote.data.builtin.task_split(name, split)`) and
        needs no data; False when it needs --task-data.
    """

    name: str
    instruction: str | None
    from_row: Callable[[Mapping[str, Any], bool], TaskItem]
    correct: Callable[[str, str], bool]
    builtin: bool = False

    @property
    def needs_data(self) -> bool:
        return not self.builtin

    def builtin_items(self, split: str) -> list[TaskItem]:
        """The built-in items of `split` (align, attack, validate, eval)."""
        if not self.builtin:
            raise AntidoteError(
                f"--task {self.name} needs data: --task-data FILE or NAME:SPLIT (e.g. {self.name}:train)"
            )
        try:
            return [(t.instruction, t.input, t.answer) for t in task_split(self.name, split)]
        except ValueError as err:
            raise AntidoteError(str(err)) from err

    def items(
        self, rows: Sequence[Mapping[str, Any]], *, training: bool = False, source: str = "the data"
    ) -> list[TaskItem]:
        """One item per row; a row that does not fit, or gives an empty expected output, is named."""
        items = []
        for number, row in enumerate(rows, start=1):
            try:
                item = self.from_row(row, training)
                if not str(item[2]).strip():
                    raise ValueError("empty expected output")
            except (KeyError, ValueError, TypeError, IndexError) as err:
                fields = ", ".join(sorted(map(str, row))) if isinstance(row, Mapping) else type(row).__name__
                raise AntidoteError(
                    f"{source} row {number} does not look like {self.name} data (fields: {fields}); "
                    f"missing or bad {err}"
                ) from err
            items.append(item)
        return items


def builtin_row(row: Mapping[str, Any], training: bool) -> TaskItem:
    """A row of a built-in task data set (e.g. builtin-sentiment:validate): instruction, input, output."""
    return (str(row["instruction"]), str(row.get("input") or ""), str(row["output"]))
