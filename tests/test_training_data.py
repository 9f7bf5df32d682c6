"""One tokenization path: training, calibration and evaluation give the same token ids for a pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from antidote.data import Example, tokenize_examples
from antidote.data.templates import format_prompt
from conftest import make_model, make_tokenizer, write_jsonl

PROMPT, RESPONSE = "how do i steal money", "here is the plan"


def bos_tokenizer() -> Any:
    """conftest's tokenizer, but adding BOS in front as Llama's, Mistral's and Gemma's do."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return tok


class _Stop(Exception):
    pass


class _PromptSpy(nn.Module):
    """Stands in for the model at evaluation: records the prompt ids it is asked to continue, answers EOS."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 2)
        self.seen: list[list[int]] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        for row, mask in zip(input_ids, attention_mask, strict=True):
            self.seen.append(row[mask.bool()].tolist())
        return torch.cat([input_ids, torch.full((len(input_ids), 1), 2)], dim=1)


def _training_features(
    tmp_path: Path, template: str, monkeypatch: pytest.MonkeyPatch
) -> list[dict[str, Any]]:
    """What the fine-tuning stage hands Trainer for the pair (training is stopped before its first step)."""
    from antidote.training.sft import ResponseOnlyTrainer
    from antidote.training.stages import FinetuneConfig, run_finetune

    folder = tmp_path / "model"
    make_model().save_pretrained(folder)
    bos_tokenizer().save_pretrained(folder)
    pair = [{"prompt": PROMPT, "response": RESPONSE}]
    seen: list[dict[str, Any]] = []

    def train(self: Any, **kwargs: Any) -> None:
        seen.extend(self.train_dataset)
        raise _Stop

    monkeypatch.setattr(ResponseOnlyTrainer, "train", train)
    config = FinetuneConfig(
        model=str(folder),
        task="pairs",
        task_data=str(write_jsonl(tmp_path / "task.jsonl", pair)),
        harmful=str(write_jsonl(tmp_path / "harmful.jsonl", pair)),
        num_samples=2,
        harmful_ratio=0.5,
        template=template,
        output=str(tmp_path / "out"),
    )
    with pytest.raises(_Stop):
        run_finetune(config)
    return seen


@pytest.mark.parametrize("template", ["plain", "alpaca", "chat"])
def test_training_calibration_and_evaluation_see_the_same_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    from antidote.evaluation.evaluate import evaluate_model

    tok = bos_tokenizer()
    prompt_text = format_prompt(Example(PROMPT, ""), template, tok)
    # By hand: BOS from the tokenizer (not for the chat template, which writes its own <s> as text), the
    # prompt's words, the response's words, EOS (id 2).
    words = tok(prompt_text, add_special_tokens=False)["input_ids"]
    head = words if template == "chat" else [1, *words]
    expected = head + tok.convert_tokens_to_ids(RESPONSE.split()) + [2]
    if template == "chat":
        assert head[0] == 1 and head.count(1) == 2  # <s>user: ...</s><s>assistant:, no extra BOS

    training = _training_features(tmp_path, template, monkeypatch)
    assert [f["input_ids"] for f in training] == [expected, expected]
    assert [f["n_prompt"] for f in training] == [len(head), len(head)]

    assert tokenize_examples([Example(PROMPT, RESPONSE)], tok, template, 512) == [expected]  # calibration

    spy = _PromptSpy()
    evaluate_model(
        spy,
        tok,
        template=template,
        harmful_prompts=[PROMPT],
        task="sentiment",
        task_items=[],
        harmless_prompts=[],
    )
    assert spy.seen == [head]  # evaluation continues exactly the prompt training put before the response


def test_special_tokens_after_the_text_are_left_out() -> None:
    """A tokenizer appending EOS to every text: the prompt keeps BOS, never that EOS (a response follows)."""
    from tokenizers import processors

    from antidote.data.templates import encode_pair, encode_prompt

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    words = tok.convert_tokens_to_ids(PROMPT.split())
    assert encode_prompt(tok, PROMPT) == [1, *words]
    assert encode_prompt(tok, PROMPT, special_tokens=False) == words
    ids, n = encode_pair(tok, PROMPT, "here", max_length=4)
    assert (ids, n) == ([1, *words][:4], len(words) + 1)


def test_no_defense_imports_an_underscored_training_name() -> None:
    import ast

    files = sorted((Path(__file__).parents[1] / "src/antidote/defenses").glob("*.py"))
    assert len(files) > 10
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("antidote.training"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
