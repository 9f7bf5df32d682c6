"""Calibration statistics against inputs captured by hand, batch-size invariance, no padding counted."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from antidote.data import load_examples, tokenize_examples
from antidote.realignment.calibrate import collect_statistics, make_batches
from antidote.realignment.engine import compute_masks
from antidote.realignment.targets import find_targets
from conftest import HARMFUL, make_model, make_tokenizer


def sequences() -> list[list[int]]:
    return tokenize_examples(load_examples(HARMFUL), make_tokenizer(), "alpaca", 64)


def captured_inputs(
    model: nn.Module, names: list[str], seqs: list[list[int]]
) -> dict[str, list[torch.Tensor]]:
    """Run each sequence alone (no padding at all) and keep every target's input, (tokens, in)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_pre_hook(
            lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())
        )
        for n in names
    ]
    with torch.no_grad():
        for s in seqs:
            model(input_ids=torch.tensor([s]))
    for h in handles:
        h.remove()
    return seen


def test_statistics_equal_hand_computed_sum_of_squares() -> None:
    model = make_model()
    seqs = sequences()
    targets = find_targets(model)
    stats = collect_statistics(model, targets, seqs, batch_size=3, pad_id=3)
    inputs = captured_inputs(model, list(targets), seqs)
    assert stats.samples == len(seqs) and stats.tokens == sum(len(s) for s in seqs)
    for name in targets:
        x = torch.cat(inputs[name])  # every real token, no padding
        torch.testing.assert_close(stats.sq_sums[name], x.pow(2).sum(0) / len(seqs), rtol=1e-5, atol=1e-6)


def test_targets_exclude_lm_head_and_lm_head_is_never_run() -> None:
    model = make_model()
    targets = find_targets(model)
    assert "lm_head" not in targets and len(targets) == 2 * 7
    calls = []
    model.lm_head.register_forward_pre_hook(lambda m, a: calls.append(1))
    collect_statistics(model, targets, sequences(), batch_size=4)
    assert calls == []  # calibration runs the decoder body only


def test_masks_identical_for_batch_size_1_and_8() -> None:
    model = make_model()
    targets = find_targets(model)
    seqs = sequences()
    one = collect_statistics(model, targets, seqs, batch_size=1)
    eight = collect_statistics(model, targets, seqs, batch_size=8, pad_id=7)  # pad id must not matter
    for granularity in ("row", "layer", "global"):
        a = compute_masks(targets, one, 0.1, granularity=granularity)
        b = compute_masks(targets, eight, 0.1, granularity=granularity)
        assert all(torch.equal(a[n], b[n]) for n in targets)
    for name in targets:
        torch.testing.assert_close(one.sq_sums[name], eight.sq_sums[name], rtol=1e-5, atol=1e-6)


def test_batches_are_length_sorted_and_cover_every_sequence() -> None:
    seqs = [[1] * n for n in (3, 9, 1, 7, 5)]
    batches = make_batches(seqs, 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_hooks_are_removed_even_when_forward_fails() -> None:
    model = make_model()
    targets = find_targets(model)
    with contextlib.suppress(IndexError, RuntimeError):
        collect_statistics(model, targets, [[1, 2, 500]])  # token id beyond the vocabulary
    assert all(not m._forward_pre_hooks for m in targets.values())


def test_device_map_auto_model_gives_same_statistics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    make_model().save_pretrained(tmp_path)
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", dtype=torch.float32)
    plain = make_model()
    seqs = sequences()
    a = collect_statistics(dispatched, find_targets(dispatched), seqs, batch_size=4)
    b = collect_statistics(plain, find_targets(plain), seqs, batch_size=4)
    for name in a.sq_sums:
        torch.testing.assert_close(a.sq_sums[name], b.sq_sums[name])


def test_bfloat16_compute_stays_close_to_float32_and_is_reported() -> None:
    model = make_model()
    targets = find_targets(model)
    seqs = sequences()
    exact = collect_statistics(model, targets, seqs, batch_size=4)
    fast = collect_statistics(model, targets, seqs, batch_size=4, compute_dtype=torch.bfloat16)
    assert exact.compute_dtype == "float32" and fast.compute_dtype == "bfloat16"
    assert all(fast.sq_sums[n].dtype == torch.float32 for n in targets)  # accumulated in fp32 regardless
    for name in targets:
        torch.testing.assert_close(fast.sq_sums[name], exact.sq_sums[name], rtol=0.1, atol=1e-3)
