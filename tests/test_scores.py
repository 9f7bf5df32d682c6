"""The pure tensor functions against hand computations and brute-force selection (ties included)."""

from __future__ import annotations

import math

import pytest
import torch

from antidote.realignment.scores import (
    contrast_score,
    num_selected,
    sample_sq_sums,
    select_global,
    select_rows,
    select_tensor,
    wanda_score,
)


def brute_top(values: list[float], k: int) -> set[int]:
    """Indices of the k largest values; among equal values the lower index wins."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return set(order[:k])


def tied_scores(shape: tuple[int, ...], seed: int, low: int = 0, high: int = 5) -> torch.Tensor:
    """Small integers, so most values are tied."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=gen).float()


def test_num_selected_follows_reference_floor_rule() -> None:
    assert num_selected(576, 0.1) == 576 - int(576 * 0.9) == 58
    assert num_selected(8, 0.1) == 1  # 8 - int(7.2)
    assert num_selected(8, 0.2) == 2  # 8 - int(6.4)
    assert num_selected(10, 0.5) == 5
    assert num_selected(3, 0.01) == 1  # 3 - int(2.97)


def test_sample_sq_sums_match_hand_computation_per_sample() -> None:
    x = torch.randn(3, 5, 4)
    lengths = [3, 5, 1]  # right padding: the rest of each row is padding and must not count
    x[0, 3:] = 1e6
    x[2, 1:] = float("nan")
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        for t in range(lengths[b]):
            for j in range(4):
                expected[b, j] += float(x[b, t, j]) ** 2
    got = sample_sq_sums(x, lengths)
    assert got.dtype == torch.float64 and got.shape == (3, 4)
    torch.testing.assert_close(got, expected)
    assert sample_sq_sums(x.half(), lengths).dtype == torch.float64


def test_sample_sq_sums_do_not_depend_on_batch_neighbours_or_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    alone = torch.randn(1, 37, 64, generator=gen)
    batch = torch.randn(4, 50, 64, generator=gen)
    batch[2, :37] = alone[0]
    assert torch.equal(sample_sq_sums(batch, [50, 41, 37, 12])[2], sample_sq_sums(alone, [37])[0])


def test_wanda_score_is_abs_weight_times_root_of_statistic() -> None:
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 0.0]])
    s = torch.tensor([4.0, 9.0, 0.25])
    expected = torch.tensor([[1 * 2, 2 * 3, 3 * 0.5], [4 * 2, 0.5 * 3, 0.0]])
    torch.testing.assert_close(wanda_score(w, s), expected)


def test_contrast_score_is_difference_of_mean_normalised_scores() -> None:
    w = torch.randn(4, 6)
    h, b = torch.rand(6) + 0.1, torch.rand(6) + 0.1
    wh = [[abs(w[i, j].item()) * math.sqrt(h[j].item()) for j in range(6)] for i in range(4)]
    wb = [[abs(w[i, j].item()) * math.sqrt(b[j].item()) for j in range(6)] for i in range(4)]
    mh = sum(map(sum, wh)) / 24
    mb = sum(map(sum, wb)) / 24
    expected = torch.tensor([[wh[i][j] / mh - wb[i][j] / mb for j in range(6)] for i in range(4)])
    torch.testing.assert_close(contrast_score(w, h, b), expected)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 0.9])
def test_select_rows_matches_brute_force_with_ties(seed: int, ratio: float) -> None:
    scores = tied_scores((6, 17), seed)
    mask = select_rows(scores, ratio)
    k = num_selected(17, ratio)
    for r in range(6):
        chosen = {j for j in range(17) if mask[r, j]}
        assert chosen == brute_top(scores[r].tolist(), k)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.33, 0.9])
def test_select_tensor_matches_brute_force_with_ties(seed: int, ratio: float) -> None:
    scores = tied_scores((5, 7), seed)
    mask = select_tensor(scores, ratio)
    k = num_selected(35, ratio)
    chosen = {i for i, v in enumerate(mask.reshape(-1).tolist()) if v}
    assert chosen == brute_top(scores.reshape(-1).tolist(), k)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.5, 0.97])
def test_select_global_matches_brute_force_over_all_tensors(seed: int, ratio: float) -> None:
    # Negative values (contrast scores), many ties across tensors, and tiny/huge magnitudes.
    tensors = [
        tied_scores((3, 4), seed, -3, 3),
        tied_scores((5,), seed + 100, -3, 3),
        torch.randn(2, 6, generator=torch.Generator().manual_seed(seed)) * 1e-30,
        tied_scores((4, 4), seed + 200, -3, 3) * 1e20,
    ]
    sizes = [t.numel() for t in tensors]
    take = select_global(lambda: iter(tensors), sizes, ratio)
    masks = [take(i, t) for i, t in enumerate(tensors)]
    flat_mask = torch.cat([m.reshape(-1) for m in masks]).tolist()
    flat_scores = torch.cat([t.reshape(-1) for t in tensors]).tolist()
    k = num_selected(sum(sizes), ratio)
    assert {i for i, v in enumerate(flat_mask) if v} == brute_top(flat_scores, k)


def test_select_global_handles_negative_zero_and_all_equal() -> None:
    tensors = [torch.tensor([0.0, -0.0, 0.0, -0.0]), torch.zeros(4)]
    take = select_global(lambda: iter(tensors), [4, 4], 0.5)
    masks = [take(i, t) for i, t in enumerate(tensors)]
    assert masks[0].tolist() == [True] * 4 and masks[1].tolist() == [False] * 4


def test_selection_sizes_are_exact_on_continuous_scores() -> None:
    scores = torch.randn(64, 576)
    assert int(select_rows(scores, 0.1).sum()) == 64 * 58
    assert int(select_tensor(scores, 0.1).sum()) == num_selected(64 * 576, 0.1)
