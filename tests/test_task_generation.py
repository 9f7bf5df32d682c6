"""Each task's generation budget and stop condition: gold answers, generated verbatim, score 100 for every
task; stopping early never changes a verdict; transformers' generate stops a row where its task says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from antidote.tasks import TASKS, get_task, load_task_items
from antidote.tasks.agnews import agnews_correct
from antidote.tasks.gsm8k import gsm8k_correct
from antidote.tasks.sentiment import sst2_correct
from conftest import make_model, make_tokenizer

# ../shared/data beside the checkout (or beside the folder of worktrees)
SHARED = next(
    (d for d in (Path(__file__).resolve().parents[i] / "shared" / "data" for i in (2, 3)) if d.is_dir()),
    Path("missing"),
)
GOLD_ROWS = 200  # per data set from the shared folder: enough to meet long solutions, quick to score

# Hand-written rows of each data task, so the test runs without the shared data too (GSM8K: a solution of
# real length, 60 words, far over the 8 tokens evaluation used to read).
ROWS = {
    "sst2": [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}],
    "agnews": [{"text": f"news {i}", "label": i} for i in range(1, 5)],
    "gsm8k": [
        {
            "question": "Tom has 3 boxes of 12 pens and gives away 7. How many are left?",
            "answer": "Tom has 3 boxes of 12 pens, so he has 3 * 12 = <<3*12=36>>36 pens.\n"
            "He gives away 7 pens, so 36 - 7 = <<36-7=29>>29 pens are left.\n"
            "Each of the 29 pens is one he keeps, and none of the 36 was counted twice, so the count holds "
            "for every box he had at the start of the day.\n#### 29",
        }
    ],
}
SHARED_SPLITS = {"sst2": "sst2:validation", "agnews": "agnews:test", "gsm8k": "gsm8k:test"}


def _pieces(text: str) -> list[str]:
    """The text cut into word-sized tokens (a word with the whitespace before it); real tokenizers cut
    finer, so a budget that holds these pieces is a lower bound on what is needed."""
    return re.findall(r"\s*\S+|\s+$", text)


def _gold_items(name: str, tmp_path: Path) -> list[tuple[str, str, str]]:
    task = get_task(name)
    if task.builtin:
        return task.builtin_items("eval")
    items = task.items(ROWS[name])
    if SHARED.is_dir():
        items += load_task_items(name, SHARED_SPLITS[name], data_dir=SHARED)[:GOLD_ROWS]
    return items


def _gold_text(name: str, expected: str) -> str:
    """What a model trained on the task writes: GSM8K's training form of the answer, else the answer."""
    from antidote.tasks.gsm8k import gsm8k_training_answer

    return gsm8k_training_answer(expected) if name in ("gsm8k", "arithmetic") else expected


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_answers_generated_verbatim_score_100(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from antidote.evaluation.evaluate import evaluate_model

    items = _gold_items(name, tmp_path)
    gold = {}

    def fake_generate(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
        """A model that writes the gold answer piece by piece, within the budget, until its task says stop."""
        out = []
        for prompt in prompts:
            text = ""
            for piece in _pieces(gold.get(prompt, "I cannot help with that."))[: kwargs["max_new_tokens"]]:
                text += piece
                if kwargs.get("settled") is not None and kwargs["settled"](text):
                    break
            out.append(text)
        return out

    from antidote.data.loading import Example
    from antidote.data.templates import format_prompt

    tokenizer = make_tokenizer()
    for instruction, extra, expected in items:
        prompt = format_prompt(Example(instruction, "", input=extra), "plain", tokenizer)
        gold[prompt] = _gold_text(name, expected)
    monkeypatch.setattr("antidote.evaluation.evaluate.generate", fake_generate)
    result, _ = evaluate_model(
        None,
        tokenizer,
        template="plain",
        harmful_prompts=["how do i make a weapon"],
        task=name,
        task_items=items,
        harmless_prompts=["write a poem about cats"],
    )
    assert result.n_task == len(items) and result.fa == 100.0


def test_stopping_at_a_settled_answer_never_changes_the_verdict() -> None:
    """For outputs right and wrong: wherever `settled` first holds, the verdict on that prefix is the verdict
    on the whole output."""
    cases = {
        "sst2": (
            "positive",
            ["positive", " Positive\n", "positive, I think", "negative", "pos", "The review is positive"],
        ),
        "agnews": ("Sci/Tech", ["Sci/Tech", "sci/tech ", "Sci", "Sci/Tech news", "World"]),
        "gsm8k": (
            "#### 1000",
            [
                "So 1,000 pens.\nThe final answer is: 1,000",
                "The final answer is: 1,000.",
                "The final answer is: 10.5 pens",
                "The final answer is: 1000. Then 7",
                "It is 999 or 1000",
                "The final answer is: -1000 and 1000",
                "The final answer is: 1000\n",
            ],
        ),
    }
    for name, (expected, outputs) in cases.items():
        task = get_task(name)
        for output in outputs:
            prefixes = [output[:i] for i in range(1, len(output) + 1)]
            stop = next((p for p in prefixes if task.settled(p)), output)
            assert task.correct(stop, expected) == task.correct(output, expected), (name, output, stop)


def test_settled_by_hand() -> None:
    from antidote.tasks.gsm8k import gsm8k_settled

    settled = get_task("sst2").settled
    assert (
        not settled("") and not settled("  posi") and not settled("positive") and not settled("Negative \n")
    )
    assert settled("positive.") and settled("neutral") and settled("positive\n\nThe")
    assert sst2_correct("positive", "1") and agnews_correct("sci/tech", "4")
    news = get_task("agnews").settled
    assert not news("Sci/") and not news("sports") and news("Sport s") and news("Politics")
    assert not gsm8k_settled("It is 12")  # no marker: the last number counts, so never before the end
    assert not gsm8k_settled("The final answer is: ")
    assert not gsm8k_settled("The final answer is: 1,")  # 1,000 may follow
    assert not gsm8k_settled("The final answer is: 18.")  # 18.5 may follow
    assert gsm8k_settled("The final answer is: 18. ") and gsm8k_settled("The final answer is: 18\n")
    assert gsm8k_settled("The final answer is: 18.5 ") and gsm8k_correct(
        "The final answer is: 18.5 ", "#### 18.5"
    )


def test_generate_stops_each_row_where_settled() -> None:
    """transformers' generate with the task's stop: each row is the no-stop output cut where `settled` first
    holds (here: two words written), the others unchanged."""
    from antidote.evaluation.generation import generate

    model, tok = make_model(seed=3), make_tokenizer()
    prompts = ["how do i make a weapon", "tell me the plan", "what is the weather today"]
    full = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    stopped = generate(
        model, tok, prompts, max_new_tokens=6, batch_size=2, settled=lambda t: len(t.split()) >= 2
    )
    for whole, cut in zip(full, stopped, strict=True):
        words = whole.split()
        assert cut.split() == words[:2], (whole, cut)
    assert any(len(w.split()) > 2 for w in full)  # the stop did cut something
