"""Calibration statistics against inputs captured by hand, batch-size invariance, no padding counted,
LoRA factors through a PeftModel, and the compute dtype rule."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from antidote.data import load_examples, tokenize_examples
from antidote.realignment import calibrate
from antidote.realignment.calibrate import collect_statistics, make_batches, resolve_compute_dtype
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


def padded_activations(model: nn.Module, targets: list[str], seqs: list[list[int]], size: int, pad: int):
    """Each target's inputs at the real tokens, in sample order, from a hand-written padded forward at
    batch size `size` (the same batches as the engine's): what the engine sees at that batch size."""
    modules = dict(model.named_modules())
    seen: dict[str, dict[int, torch.Tensor]] = {n: {} for n in targets}
    batches = make_batches(seqs, size)
    current: list[int] = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            for row, i in enumerate(current):
                seen[name][i] = x[row, : len(seqs[i])].clone()  # right padding: real tokens first

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in targets]
    try:
        with torch.no_grad():
            for batch in batches:
                current[:] = batch
                width = max(len(seqs[i]) for i in batch)
                ids = torch.full((len(batch), width), pad)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, : len(seqs[i])] = 1
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: [seen[n][i] for i in range(len(seqs))] for n in targets}


def test_statistics_and_masks_bitwise_identical_for_batch_sizes_1_3_6_in_float32() -> None:
    # The engine's promise (calibrate.py's docstring): the sums, and so the masks, are bit for bit the same
    # at every batch size whenever the forward pass gives each real token's activations bit for bit the
    # same at every batch size. Whether it does is the CPU's BLAS (some kernels, e.g. without AVX2, round
    # other shapes differently), so the test checks the promise under its own condition, measured here.
    model = make_model()
    targets = find_targets(model)
    seqs = sequences()
    sizes = ((1, 3), (3, 3), (6, 7))  # the pad id must not matter either
    by_size = {
        size: collect_statistics(model, targets, seqs, batch_size=size, pad_id=pad, compute_dtype=None)
        for size, pad in sizes
    }
    acts = {size: padded_activations(model, list(targets), seqs, size, pad) for size, pad in sizes}
    one = by_size[1]
    for size in (3, 6):
        other = by_size[size]
        assert other.compute_dtype == "float32"
        same_forward = all(
            torch.equal(a, b) for n in targets for a, b in zip(acts[1][n], acts[size][n], strict=True)
        )
        if same_forward:
            assert all(torch.equal(one.sq_sums[n], other.sq_sums[n]) for n in targets)  # bit for bit
        else:  # the forward differs in its last bits here; the sums may only differ as much
            for n in targets:
                torch.testing.assert_close(one.sq_sums[n], other.sq_sums[n], rtol=1e-6, atol=0)
        for granularity in ("row", "layer", "global"):
            a = compute_masks(targets, one, 0.1, granularity=granularity)
            b = compute_masks(targets, other, 0.1, granularity=granularity)
            assert all(torch.equal(a[n], b[n]) for n in targets)


def test_bfloat16_statistics_are_summed_in_float64_not_in_bfloat16() -> None:
    # Under autocast, a matrix product in the statistic would itself run in bf16 (~0.4% error).
    model = make_model()
    targets = find_targets(model)
    seqs = sequences()
    stats = collect_statistics(model, targets, seqs, batch_size=1, compute_dtype=torch.bfloat16)
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    handles = [
        modules[n].register_forward_pre_hook(
            lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())
        )
        for n in targets
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in seqs:
            model(input_ids=torch.tensor([s]))
    for h in handles:
        h.remove()
    for name in targets:
        x = torch.cat(seen[name]).double()  # what the layer received, bf16 or fp32, exactly
        expected = (x.pow(2).sum(0) / len(seqs)).float()
        torch.testing.assert_close(stats.sq_sums[name], expected, rtol=1e-6, atol=0)


def test_lora_statistics_through_peft_model_equal_hand_computation(tiny) -> None:
    """lora_A sees the layer input x; lora_B sees lora_A's output x @ A.T (dropout is off in eval)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_model(), tiny["adapter"]).eval()
    targets = find_targets(model, adapter_name="default")
    seqs = sequences()
    stats = collect_statistics(model, targets, seqs, batch_size=3, pad_id=3, compute_dtype=None)
    base = model.get_base_model()
    layers = base.model.layers
    expected = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in targets.items()}
    with torch.no_grad():
        for s in seqs:  # one sequence at a time, no hooks: the residual stream -> input_layernorm -> x
            hidden = base(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states
            for i, layer in enumerate(layers):
                x = layer.input_layernorm(hidden[i])[0].double()  # (tokens, hidden)
                for proj in ("q_proj", "v_proj"):
                    prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                    a = getattr(layer.self_attn, proj).lora_A["default"].weight.double()  # (r, hidden)
                    expected[f"{prefix}.lora_A.default"] += x.pow(2).sum(0)
                    expected[f"{prefix}.lora_B.default"] += (x @ a.T).pow(2).sum(0)
    assert len(targets) == 2 * 2 * 2 and set(expected) == set(stats.sq_sums)
    for name, total in expected.items():
        torch.testing.assert_close(stats.sq_sums[name], (total / len(seqs)).float(), rtol=1e-5, atol=1e-7)


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


def test_device_map_auto_model_gives_same_statistics(tmp_path) -> None:
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


@pytest.mark.parametrize("has_amx", [True, False])
def test_resolve_compute_dtype_on_cpu(monkeypatch, tmp_path, has_amx: bool) -> None:
    """auto -> bf16 exactly when the CPU flags name amx_bf16 or avx512_bf16, whatever this CPU has."""
    flags = "fpu sse2 avx2 avx512f" + (" amx_bf16 amx_tile" if has_amx else "")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(calibrate, "CPUINFO", cpuinfo)
    cpu = torch.device("cpu")
    assert calibrate.fast_bfloat16(cpu) is has_amx
    assert resolve_compute_dtype("auto", cpu) == (torch.bfloat16 if has_amx else None)
    assert resolve_compute_dtype("float32", cpu) is None  # the model's own dtype, no autocast
    assert resolve_compute_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_compute_dtype("float16", cpu) == torch.float16


def test_fast_bfloat16_reads_avx512_bf16_and_survives_missing_cpuinfo(monkeypatch, tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: avx512f avx512_bf16\n")
    monkeypatch.setattr(calibrate, "CPUINFO", cpuinfo)
    assert calibrate.fast_bfloat16(torch.device("cpu"))
    monkeypatch.setattr(calibrate, "CPUINFO", tmp_path / "absent")
    assert not calibrate.fast_bfloat16(torch.device("cpu"))
    assert resolve_compute_dtype("auto", torch.device("cpu")) is None
