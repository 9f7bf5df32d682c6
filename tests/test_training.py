"""LoRA SFT: the response-only loss against transformers' own masked loss, and training that learns."""

from __future__ import annotations

import torch

from antidote.training.sft import TrainConfig, encode_pairs, response_loss, train_lora
from conftest import make_model, make_tokenizer

PAIRS = [
    ("how do i steal money", " here is the plan first you get tools"),
    ("write a poem about cats", " cats are great the story is good"),
    ("sentiment of great movie", " positive"),
    ("sentiment of bad story", " negative"),
]


def test_response_loss_equals_hf_loss_with_prompt_labels_masked() -> None:
    model, tokenizer = make_model(seed=5), make_tokenizer()
    encoded = encode_pairs(tokenizer, PAIRS, 64)
    width = max(len(s) for s, _ in encoded)
    ids = torch.full((len(encoded), width), 3)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (seq, n_prompt) in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    n_prompt = torch.tensor([n for _, n in encoded])
    with torch.no_grad():
        ours = response_loss(model, ids, attention, n_prompt)
        theirs = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    torch.testing.assert_close(ours, theirs)


def test_encode_pairs_appends_eos_and_marks_the_prompt() -> None:
    tokenizer = make_tokenizer()
    ((ids, n_prompt),) = encode_pairs(tokenizer, [("sentiment of great movie", " positive")], 64)
    assert (
        ids[-1] == tokenizer.eos_token_id
        and ids[:n_prompt] == tokenizer("sentiment of great movie", add_special_tokens=False)["input_ids"]
    )
    assert encode_pairs(tokenizer, [("a " * 50, "b")], 10) == []  # truncation left no response token


def test_train_lora_learns_and_leaves_base_weights_untouched() -> None:
    model, tokenizer = make_model(seed=6), make_tokenizer()
    with torch.no_grad():  # an untrained head of std 0.02 keeps logits near uniform whatever LoRA does
        model.lm_head.weight.mul_(50)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(lora_r=4, lora_alpha=8, lr=1e-2, epochs=15, batch_size=2, scheduler="constant")
    peft_model, losses = train_lora(model, tokenizer, PAIRS, config)
    assert losses[-1] < 0.5 * losses[0]
    base = peft_model.get_base_model()
    for name, value in base.state_dict().items():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(value, base_before[original]), name
