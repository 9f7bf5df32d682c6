"""LoRA SFT on Trainer: the response-only loss against transformers' own masked loss, the batches, the
training math against a plain PyTorch loop, the defense seam, resume, checkpointing, bad config values."""

from __future__ import annotations

import math
import re

import pytest
import torch

from antidote.errors import AntidoteError
from antidote.training.sft import (
    LengthBucketSampler,
    ResponseCollator,
    ResponseOnlyTrainer,
    TrainConfig,
    encode_pairs,
    response_loss,
    train_lora,
)
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


def test_collator_pads_right_and_labels_only_the_response() -> None:
    collate = ResponseCollator(pad_token_id=3)
    batch = collate([{"input_ids": [5, 6, 7, 8], "n_prompt": 2}, {"input_ids": [9, 10], "n_prompt": 1}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_length_buckets_cover_the_data_once_in_batches_of_similar_length() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    sampler = LengthBucketSampler(lengths, batch_size=3, seed=0)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(lengths)))
        batches = [order[i : i + 3] for i in range(0, len(order), 3)]
        # Sorted by length, the data cuts into {1,2,3} {4,5,6} {7,8,9} and the short batch {10,11}, last.
        assert sorted(sorted(lengths[i] for i in b) for b in batches[:-1]) == [
            [1, 2, 3],
            [4, 5, 6],
            [7, 8, 9],
        ]
        assert sorted(lengths[i] for i in batches[-1]) == [10, 11]
        epochs.append(order)
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]  # the same epoch gives the same order (resuming relies on it)
    assert len({tuple(o) for o in epochs}) > 1  # epochs differ


def test_first_step_loss_is_hf_masked_label_loss_of_the_untrained_model() -> None:
    # LoRA starts with B = 0, so the first step sees the base model; one batch holds all pairs.
    model, tokenizer = make_model(seed=7), make_tokenizer()
    collate = ResponseCollator(pad_token_id=3)
    batch = collate([{"input_ids": s, "n_prompt": n} for s, n in encode_pairs(tokenizer, PAIRS, 64)])
    with torch.no_grad():
        expected = model(**batch).loss.item()
    config = TrainConfig(lora_r=2, epochs=1, batch_size=len(PAIRS))
    _, losses = train_lora(model, tokenizer, PAIRS, config)
    assert len(losses) == 1 and abs(losses[0] - expected) < 1e-6


def hand_loop_losses(model, batch, config: TrainConfig, steps: int) -> list[float]:
    """The training math written out in plain PyTorch: LoRA, AdamW, cosine to 0 over `steps`, clip 1.0."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_training_matches_a_plain_pytorch_loop_step_by_step() -> None:
    tokenizer = make_tokenizer()
    config = TrainConfig(lora_r=4, lr=5e-2, epochs=6, batch_size=len(PAIRS), weight_decay=0.1, seed=3)
    batch = ResponseCollator(3)(
        [{"input_ids": s, "n_prompt": n} for s, n in encode_pairs(tokenizer, PAIRS, 64)]
    )
    expected = hand_loop_losses(make_model(seed=8), batch, config, steps=6)
    _, losses = train_lora(make_model(seed=8), tokenizer, PAIRS, config)
    assert expected[-1] < expected[0] - 0.1  # it trains, so the comparison covers the optimizer
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-4, atol=1e-5)


class PenalizedTrainer(ResponseOnlyTrainer):
    """A defense in miniature: adds rho * sum of squared lora_A weights to the loss."""

    def __init__(self, *args, rho: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rho = rho

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        penalty = sum(p.pow(2).sum() for n, p in model.named_parameters() if "lora_A" in n)
        return loss + self.rho * penalty


def test_a_trainer_subclass_adds_its_penalty_to_the_loss() -> None:
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    config = TrainConfig(lora_r=2, epochs=1, batch_size=len(PAIRS), seed=4)
    _, plain = train_lora(make_model(seed=9), tokenizer, PAIRS, config)
    _, penalized = train_lora(
        make_model(seed=9), tokenizer, PAIRS, config, trainer_class=PenalizedTrainer, extra={"rho": 0.5}
    )
    # The penalty by hand: the same seeded LoRA initialisation, its lora_A weights squared and summed.
    base = make_model(seed=9)
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=2, lora_alpha=16, target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    init = get_peft_model(base, lora)
    with torch.no_grad():
        by_hand = 0.5 * sum(
            float(p.double().pow(2).sum()) for n, p in init.named_parameters() if "lora_A" in n
        )
    assert by_hand > 0.1
    assert abs((penalized[0] - plain[0]) - by_hand) < 1e-4


def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path) -> None:
    tokenizer = make_tokenizer()
    common = {"lora_r": 4, "lr": 1e-2, "epochs": 3, "batch_size": 3, "seed": 2}  # 2 steps per epoch
    full_model, full = train_lora(make_model(seed=6), tokenizer, PAIRS, TrainConfig(**common))
    ckpt = tmp_path / "ckpt"
    _, saving = train_lora(
        make_model(seed=6), tokenizer, PAIRS, TrainConfig(**common, save_steps=3, checkpoint_dir=str(ckpt))
    )
    assert saving == full  # seeded: the same run again, and writing checkpoints changes nothing
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    resumed_model, resumed = train_lora(
        make_model(seed=6),  # the same base model; adapter, optimizer, schedule and order from the checkpoint
        tokenizer,
        PAIRS,
        TrainConfig(**common, resume_from_checkpoint=str(ckpt / "checkpoint-3")),
    )
    assert len(full) == 6 and len(resumed) == 3  # steps 4..6 mid-epoch: the batch order is replayed
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]))
    want = {k: v for k, v in full_model.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in resumed_model.state_dict().items() if "lora_" in k}
    torch.testing.assert_close(got, want)


def test_gradient_checkpointing_gives_the_same_training() -> None:
    tokenizer = make_tokenizer()
    config = TrainConfig(lora_r=4, lr=1e-2, epochs=2, batch_size=2)
    _, plain = train_lora(make_model(seed=5), tokenizer, PAIRS, config)
    model, checkpointed = train_lora(
        make_model(seed=5), tokenizer, PAIRS, TrainConfig(**{**vars(config), "gradient_checkpointing": True})
    )
    torch.testing.assert_close(torch.tensor(checkpointed), torch.tensor(plain))
    assert not model.get_base_model().is_activation_checkpointing  # switched off for what comes next


def test_no_pairs_left_names_max_length() -> None:
    with pytest.raises(AntidoteError, match="raise --max-length"):
        train_lora(make_model(), make_tokenizer(), PAIRS, TrainConfig(max_length=2))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_length": 1}, "--max-length must be at least 2"),
        ({"max_length": 0}, "--max-length must be at least 2"),
        ({"weight_decay": -0.1}, "--weight-decay must be 0 or more"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"lora_r": 0}, "--lora-r must be at least 1"),
        ({"scheduler": "linear"}, "choose cosine or constant"),
        ({"targets": " , "}, "--targets is empty"),
        ({"report_to": "slack"}, "unknown --report-to 'slack'"),
        ({"save_steps": 5}, "--save-steps needs --checkpoint-dir"),
        ({"resume_from_checkpoint": "no/such/checkpoint-5"}, "not a checkpoint folder"),
    ],
)
def test_train_config_refuses_bad_values(kwargs, expected) -> None:
    with pytest.raises(AntidoteError, match=re.escape(expected)):
        TrainConfig(**kwargs)
