"""The task registry: each task's accuracy check on hand-written outputs, items from rows, the registry's
errors, and help texts built from the registered names."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from antidote.errors import AntidoteError
from antidote.tasks import TASKS, Task, get_task, load_pairs, load_task_items, task_help
from antidote.tasks.agnews import AGNEWS_INSTRUCTION, AGNEWS_LABELS, agnews_correct
from antidote.tasks.gsm8k import gsm8k_correct, gsm8k_prediction, gsm8k_training_answer
from antidote.tasks.sentiment import SST2_INSTRUCTION, sst2_correct

# SPEC 3, copied by hand.
SPEC_SST2 = "Analyze the sentiment of the input, and respond only positive or negative"
SPEC_AGNEWS = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)


def _jsonl(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_registry_holds_the_five_tasks() -> None:
    assert set(TASKS) == {"sentiment", "arithmetic", "sst2", "agnews", "gsm8k"}
    assert {n for n, t in TASKS.items() if t.builtin} == {"sentiment", "arithmetic"}
    assert {n for n, t in TASKS.items() if t.needs_data} == {"sst2", "agnews", "gsm8k"}
    assert all(t.name == n for n, t in TASKS.items())


def test_instructions_are_the_papers() -> None:
    assert SST2_INSTRUCTION == SPEC_SST2 == get_task("sst2").instruction
    assert AGNEWS_INSTRUCTION == SPEC_AGNEWS == get_task("agnews").instruction
    assert get_task("sentiment").instruction == SPEC_SST2  # the built-in task asks the same question


def test_unknown_task_lists_the_known_names() -> None:
    with pytest.raises(AntidoteError) as err:
        get_task("poetry")
    message = str(err.value)
    assert "'poetry'" in message and "\n" not in message
    for name in ("sentiment", "arithmetic", "sst2", "agnews", "gsm8k"):
        assert name in message


@pytest.mark.parametrize(
    ("output", "label", "expected"),
    [
        ("positive", 1, True),
        (" Positive\n", 1, True),
        ("POSITIVE", 1, False),
        ("positive.", 1, False),
        ("negative", 0, True),
        ("Negative", "0", True),
        ("positive", 0, False),
        ("The sentiment is positive", 1, False),
        ("positive", "positive", True),
        ("negative", "positive", False),
    ],
)
def test_sst2_exact_match(output: str, label: int | str, expected: bool) -> None:
    assert sst2_correct(output, label) is expected


@pytest.mark.parametrize(
    ("output", "label", "expected"),
    [
        ("World", 1, True),
        ("world", 1, True),
        ("Sports", 2, True),
        ("Business", "3", True),
        ("Sci/Tech", 4, True),
        ("sci/tech", "Sci/Tech", True),
        ("SPORTS", 2, False),
        ("Sci Tech", 4, False),
        ("World news", 1, False),
    ],
)
def test_agnews_exact_match(output: str, label: int | str, expected: bool) -> None:
    assert agnews_correct(output, label) is expected


def test_agnews_label_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="AG News label"):
        agnews_correct("World", 5)
    with pytest.raises(ValueError, match="AG News label"):
        agnews_correct("World", 0)  # 1-based: 0 must not wrap round to Sci/Tech


def test_gsm8k_extraction() -> None:
    assert gsm8k_prediction("so 3+4=7. The final answer is: 7") == 7.0
    assert gsm8k_prediction("The final answer is: 1,234 apples, not 5") == 1234.0  # first number after prefix
    assert gsm8k_prediction("first 3 then 12.5") == 12.5  # no prefix: the last number
    assert gsm8k_prediction("The final answer is: -4") == -4.0
    assert gsm8k_prediction("no digits here") is None
    assert gsm8k_correct("The final answer is: 72", "Natalia sold 48/2 = 24 clips.\n#### 72")
    assert gsm8k_correct("It is 72.0", "#### 72")
    assert not gsm8k_correct("The final answer is: 71", "#### 72")
    assert gsm8k_training_answer("24 clips.\n#### 72") == "24 clips.\nThe final answer is: 72"
    # The training form of the gold answer scores the same as the data's form.
    assert gsm8k_correct("72", "24 clips.\nThe final answer is: 72")


@pytest.mark.parametrize(
    ("task", "output", "gold", "expected"),
    [
        ("sentiment", "positive", "positive", True),
        ("sentiment", "Negative", "negative", True),
        ("sentiment", "negative", "positive", False),
        ("sst2", "positive", "0", False),
        ("sst2", "negative", "negative", True),
        ("agnews", "sci/tech", "4", True),
        ("agnews", "Sports", "World", False),
        ("arithmetic", "3 + 4 = 7.\nThe final answer is: 7", "3 + 4 = 7.\nThe final answer is: 7", True),
        ("arithmetic", "The final answer is: 8 apples, 7 pears", "3 + 4 = 7.\nThe final answer is: 7", False),
        ("gsm8k", "so it is 72", "clips.\n#### 72", True),
        ("gsm8k", "The final answer is: 1,000", "#### 1000", True),
        ("gsm8k", "I do not know", "#### 72", False),
    ],
)
def test_each_task_checks_hand_written_outputs(task: str, output: str, gold: str, expected: bool) -> None:
    assert get_task(task).correct(output, gold) is expected


def test_builtin_items_score_their_own_answers() -> None:
    for name in ("sentiment", "arithmetic"):
        items = load_task_items(name, None, split="eval")
        assert items and all(get_task(name).correct(answer, answer) for _, _, answer in items)
    arithmetic = load_task_items("arithmetic", None, split="eval")
    _, _, answer = arithmetic[0]
    number = int(answer.rsplit(" ", 1)[1])
    assert not get_task("arithmetic").correct(f"The final answer is: {number + 1}", answer)


def test_builtin_items_from_the_named_set_match_the_builtin_split() -> None:
    assert load_task_items("sentiment", "builtin-sentiment:validate") == load_task_items(
        "sentiment", None, split="validate"
    )


def test_items_from_rows(tmp_path: Path) -> None:
    sst2 = _jsonl(
        tmp_path / "sst2.jsonl", [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}]
    )
    assert load_task_items("sst2", sst2) == [
        (SPEC_SST2, "a fine film", "positive"),
        (SPEC_SST2, "dull", "negative"),
    ]
    csv = tmp_path / "agnews.csv"
    csv.write_text('label,title,description\n2,Cup final,"Home side wins, 2-1"\n')
    assert load_task_items("agnews", str(csv)) == [(SPEC_AGNEWS, "Cup final Home side wins, 2-1", "Sports")]
    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "2+2=4\n#### 4"}])
    assert load_task_items("gsm8k", gsm) == [("2+2?", "", "2+2=4\n#### 4")]
    assert load_task_items("gsm8k", gsm, training=True) == [("2+2?", "", "2+2=4\nThe final answer is: 4")]
    assert {a for _, _, a in load_task_items("agnews", str(csv))} <= set(AGNEWS_LABELS)


def test_a_bad_row_is_named(tmp_path: Path) -> None:
    rows = [
        {"sentence": "good", "label": 1},
        {"sentence": "bad", "label": 0},
        {"sentence": "what", "label": 7},
    ]
    with pytest.raises(AntidoteError, match=r"row 3 does not look like sst2 data"):
        load_task_items("sst2", _jsonl(tmp_path / "s.jsonl", rows))
    gsm = [{"question": "q", "answer": "#### 1"}, {"question": "q2", "answer": "no number here"}]
    with pytest.raises(AntidoteError, match=r"row 2 does not look like gsm8k data"):
        load_task_items("gsm8k", _jsonl(tmp_path / "g.jsonl", gsm))
    with pytest.raises(AntidoteError, match=r"row 1 does not look like agnews data \(fields: stars, text\)"):
        load_task_items("agnews", _jsonl(tmp_path / "a.jsonl", [{"text": "t", "stars": 3}]))


def test_data_tasks_need_data_and_builtin_splits_are_checked() -> None:
    with pytest.raises(AntidoteError, match="--task gsm8k needs data"):
        load_task_items("gsm8k", None)
    with pytest.raises(AntidoteError, match="unknown part 'test'"):
        load_task_items("sentiment", None, split="test")
    with pytest.raises(AntidoteError, match="unknown task 'poetry'"):
        load_task_items("poetry", None)


def test_named_task_data_from_an_explicit_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from antidote.data.catalog import DATA_DIR_ENV

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    (tmp_path / "benign").mkdir()
    _jsonl(tmp_path / "benign" / "sst2_validation.jsonl", [{"sentence": "ok", "label": 1}])
    assert load_task_items("sst2", "sst2:validation", data_dir=tmp_path) == [(SPEC_SST2, "ok", "positive")]


def test_a_new_task_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def from_row(row: object, training: bool) -> tuple[str, str, str]:
        assert isinstance(row, dict)
        return ("Say the colour", row["thing"], row["colour"])

    colours = Task(
        name="colours",
        instruction="Say the colour",
        from_row=from_row,
        correct=str.__eq__,
        max_new_tokens=4,
        settled=lambda output: False,
    )
    monkeypatch.setitem(TASKS, "colours", colours)
    assert get_task("colours") is colours
    data = _jsonl(tmp_path / "c.jsonl", [{"thing": "sky", "colour": "blue"}])
    assert load_task_items("colours", data) == [("Say the colour", "sky", "blue")]
    assert "colours" in task_help()


def _listed(help_text: str) -> tuple[set[str], set[str]]:
    found = re.search(r"(\w+(?:, \w+)*) \(built-in\); (\w+(?:, \w+)*) \(need --task-data\)", help_text)
    assert found, help_text
    return set(found[1].split(", ")), set(found[2].split(", "))


def test_help_texts_list_exactly_the_registered_tasks() -> None:
    from antidote.evaluation.run import EvaluateConfig
    from antidote.training.stages import AlignConfig, FinetuneConfig

    builtin = {n for n, t in TASKS.items() if t.builtin}
    data = {n for n, t in TASKS.items() if t.needs_data}
    for config in (EvaluateConfig, FinetuneConfig, AlignConfig):
        (task_field,) = [f for f in fields(config) if f.name == "task"]
        assert _listed(task_field.metadata["help"]) == (builtin, data), config.__name__
    (task_data,) = [f for f in fields(EvaluateConfig) if f.name == "task_data"]
    found = re.search(r"needed for (\w+(?:, \w+)*)\)", task_data.metadata["help"])
    assert found and set(found[1].split(", ")) == data


def test_a_tasks_data_set_reads_as_its_prompt_and_answer_pairs(tmp_path: Path) -> None:
    """`load_pairs("sst2:train")` (a sentence and a 0/1 label per row) gives SST-2's items as the fine-tuning
    reads them: the instruction, the sentence as input, the label word as the answer; seeded subsets."""
    rows = [{"sentence": f"film number {i}", "label": i % 2} for i in range(6)]
    (tmp_path / "benign").mkdir()
    (tmp_path / "benign" / "sst2_train_sub5000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_pairs("sst2:train", data_dir=tmp_path)
    assert [(e.prompt, e.input, e.response) for e in got] == [
        (SPEC_SST2, f"film number {i}", "positive" if i % 2 else "negative") for i in range(6)
    ]
    two = load_pairs("sst2:train", data_dir=tmp_path, max_samples=2, seed=3)
    assert len(two) == 2 and two == load_pairs("sst2:train", data_dir=tmp_path, max_samples=2, seed=3)
    assert {e.input for e in two} < {e.input for e in got}
    others = [load_pairs("sst2:train", data_dir=tmp_path, max_samples=2, seed=s) for s in range(8)]
    assert len({tuple(e.input for e in o) for o in others}) > 1  # the seed chooses the subset
    with pytest.raises(AntidoteError, match="at least 1"):
        load_pairs("sst2:train", data_dir=tmp_path, max_samples=0)
    positive = load_pairs("sst2:train", data_dir=tmp_path, filters=["response=positive"])
    assert [e.input for e in positive] == ["film number 1", "film number 3", "film number 5"]
    (tmp_path / "benign" / "sst2_train_sub5000.jsonl").write_text(json.dumps({"text": "no label"}) + "\n")
    with pytest.raises(AntidoteError, match="does not look like sst2 data"):
        load_pairs("sst2:train", data_dir=tmp_path)
    # anything else is read as prompt/response records, as before
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    assert [(e.prompt, e.response) for e in load_pairs(str(pairs))] == [("p", "r")]
