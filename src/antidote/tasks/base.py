"""What a task is: its instruction, how a data row becomes an item, how long an answer may be, when it is
settled, and how it is checked."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from antidote.data.builtin import task_split
from antidote.errors import AntidoteError

TaskExample = tuple[str, str, str]
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
    max_new_tokens: how many tokens evaluation generates at most: the authors' budget for the task (200 for
        SST-2 and AG News, 512 for GSM8K in the Antidote repository's */pred_eval.py).
    settled: (output so far) -> True once more tokens cannot change what `correct` says (the answer is
        complete, or can no longer be right); generation stops there to keep evaluation cheap. It must never
        say True where a longer output could be scored differently.
    builtin: True when the task has built-in items (`antidote.data.builtin.task_split(name, split)`) and
        needs no data; False when it needs --task-data.
    """

    name: str
    instruction: str | None
    from_row: Callable[[Mapping[str, Any], bool], TaskExample]
    correct: Callable[[str, str], bool]
    max_new_tokens: int
    settled: Callable[[str], bool]
    builtin: bool = False

    @property
    def needs_data(self) -> bool:
        return not self.builtin

    def builtin_items(self, split: str) -> list[TaskExample]:
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
    ) -> list[TaskExample]:
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


def builtin_row(row: Mapping[str, Any], training: bool) -> TaskExample:
    """A row of a built-in task data set (e.g. builtin-sentiment:validate): instruction, input, output."""
    return (str(row["instruction"]), str(row.get("input") or ""), str(row["output"]))


def exact_answer_settled(answers: Sequence[str]) -> Callable[[str], bool]:
    """The `settled` of a task scored by exact match of the stripped output with one of `answers`: settled
    once the output (leading whitespace dropped) is neither the start of an answer nor an answer followed by
    whitespace only, i.e. it is wrong whatever follows. A right answer is never settled early: only the end
    of generation (EOS, or the budget) tells "positive" from "positive, I think"."""

    def settled(output: str) -> bool:
        text = output.lstrip()
        if not text:
            return False
        return not any(
            a.startswith(text) or (text.startswith(a) and not text[len(a) :].strip()) for a in answers
        )

    return settled
