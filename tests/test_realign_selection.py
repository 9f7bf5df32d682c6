"""Which weights `antidote.realign` masks, against masks computed here from scratch.

The reference below does not use the engine's statistic, score or selection code: it hooks every target
Linear, runs each calibration sample alone (no padding), sums x^2 over that sample's tokens in float64,
averages over samples, scores |W| * sqrt(.) and takes the top k by a full sort (ties to the lower index,
k = n - floor(n * (1 - ratio))). The model is given one dominant input feature with small weights, so that
Wanda, magnitude and random selections disagree, and each test checks that they do before comparing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import antidote
from antidote.data import load_examples, tokenize_examples
from antidote.realignment.targets import find_targets
from conftest import BENIGN, HARMFUL

RATIO = 0.2
OTHER_DATA = [{"prompt": b["instruction"], "response": b["output"]} for b in BENIGN]


def k_of(n: int, ratio: float) -> int:
    return n - int(n * (1.0 - ratio))


def dominant_feature(loaded: antidote.LoadedModel) -> None:
    """Feature 5 of the first block's attention input: 400x larger activations, 20x smaller q/k/v weights."""
    inner = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    layer = inner.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight[5] *= 400.0
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            base = proj.base_layer if hasattr(proj, "base_layer") else proj
            base.weight[:, 5] /= 20.0


def reference_sq_sums(loaded: antidote.LoadedModel, records: list[dict], targets: dict[str, nn.Linear]):
    """name -> (in,) float64: mean over samples of sum over tokens of x^2, one sample per forward pass."""
    sequences = tokenize_examples(load_examples(records), loaded.tokenizer, "plain", 512)
    totals = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in targets.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            current[name] = current.get(name, 0) + (x * x).sum(0)

        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in targets.items()]
    try:
        with torch.no_grad():
            for seq in sequences:
                current.clear()
                loaded.model(input_ids=torch.tensor([seq]))
                for name in targets:
                    totals[name] += current[name]
    finally:
        for h in handles:
            h.remove()
    return {name: t / len(sequences) for name, t in totals.items()}


def top_k_by_sort(scores: list[float], k: int) -> set[int]:
    """Indices of the k largest scores; ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[:k])


def brute_force_masks(
    scores: dict[str, torch.Tensor], granularity: str, ratio: float
) -> dict[str, torch.Tensor]:
    masks = {name: torch.zeros(s.shape, dtype=torch.bool) for name, s in scores.items()}
    if granularity == "row":
        for name, s in scores.items():
            for r in range(s.shape[0]):
                for j in top_k_by_sort(s[r].tolist(), k_of(s.shape[1], ratio)):
                    masks[name][r, j] = True
    elif granularity == "layer":
        for name, s in scores.items():
            flat = masks[name].view(-1)
            for j in top_k_by_sort(s.reshape(-1).tolist(), k_of(s.numel(), ratio)):
                flat[j] = True
    else:  # global: one list over all targets in order
        owners = [(name, j) for name, s in scores.items() for j in range(s.numel())]
        values = [v for s in scores.values() for v in s.reshape(-1).tolist()]
        for i in top_k_by_sort(values, k_of(len(values), ratio)):
            name, j = owners[i]
            masks[name].view(-1)[j] = True
    return masks


def expected_masks(loaded, records, granularity, ratio, score="wanda"):
    targets = find_targets(loaded.model, adapter_name=loaded.adapter_name)
    if score == "wanda":
        stats = reference_sq_sums(loaded, records, targets)
        scores = {n: m.weight.detach().double().abs() * stats[n].sqrt() for n, m in targets.items()}
    else:
        scores = {n: m.weight.detach().double().abs() for n, m in targets.items()}
    masks = brute_force_masks(scores, granularity, ratio)
    # keyed as realign() keys them: the saved weight name
    from antidote.realignment.targets import saved_name

    return {saved_name(n, loaded.adapter_name): m for n, m in masks.items()}


def realigned_masks(loaded, records, granularity, ratio, score="wanda"):
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = antidote.realign(
        loaded,
        records,
        mask_ratio=ratio,
        granularity=granularity,
        score=score,
        template="plain",
        compute_dtype="float32",
        batch_size=4,
    )
    loaded.model.load_state_dict(state)  # undo the pruning for the next call
    return {k: v.cpu() for k, v in result.masks.items()}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(int((a[k] != b[k]).sum()) for k in a)


def load(tiny, adapter: bool):
    loaded = antidote.load_model(
        str(tiny["model"]), adapter=str(tiny["adapter"]) if adapter else None, dtype="float32", device="cpu"
    )
    dominant_feature(loaded)
    return loaded


@pytest.mark.parametrize("granularity", ["row", "layer", "global"])
@pytest.mark.parametrize("adapter", [False, True], ids=["full-model", "lora-A-B"])
def test_realign_masks_the_top_wanda_scores_computed_from_scratch(tiny, granularity, adapter) -> None:
    loaded = load(tiny, adapter)
    want = expected_masks(loaded, HARMFUL, granularity, RATIO)
    got = realigned_masks(loaded, HARMFUL, granularity, RATIO)
    assert set(got) == set(want)
    if adapter:
        assert any("lora_A" in k for k in got) and any("lora_B" in k for k in got)
    # The case discriminates: magnitude and random pick other weights (so a score swap cannot pass).
    magnitude = expected_masks(loaded, HARMFUL, granularity, RATIO, score="magnitude")
    random = realigned_masks(loaded, HARMFUL, granularity, RATIO, score="random")
    total = sum(m.numel() for m in want.values())
    assert differing(want, magnitude) > total // 100
    assert differing(want, random) > total // 100
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: {int((got[name] != want[name]).sum())} differ"


def test_the_dominant_feature_is_what_wanda_prunes_and_magnitude_spares(tiny) -> None:
    loaded = load(tiny, adapter=False)
    got = realigned_masks(loaded, HARMFUL, "row", RATIO)
    q = got["model.layers.0.self_attn.q_proj.weight"]
    assert int(q[:, 5].sum()) >= 0.75 * q.shape[0]  # in most rows the dominant feature is pruned
    magnitude = realigned_masks(loaded, HARMFUL, "row", RATIO, score="magnitude")
    assert not bool(magnitude["model.layers.0.self_attn.q_proj.weight"][:, 5].any())


@pytest.mark.parametrize("granularity", ["row", "global"])
def test_masks_follow_the_calibration_data(tiny, granularity) -> None:
    loaded = load(tiny, adapter=False)
    first = realigned_masks(loaded, HARMFUL, granularity, RATIO)
    second = realigned_masks(loaded, OTHER_DATA, granularity, RATIO)
    assert differing(first, second) > 0
    want = expected_masks(loaded, OTHER_DATA, granularity, RATIO)
    for name in want:
        assert torch.equal(second[name], want[name]), name
