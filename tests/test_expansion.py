"""Tests for fedspallm_strategy.expansion: exact sparsity, vote order, brute-force ties."""

from __future__ import annotations

import math

import pytest
import torch

from fedspallm_strategy.merge.expansion import expand_mask, expand_mask_nm, num_to_prune


def _reference_keep(weight: torch.Tensor, votes: torch.Tensor, n: int, s: float) -> torch.Tensor:
    """Brute force: full lexicographic sort by (-C, |W|, index) over the not-all-N entries."""
    flat_w, flat_v = weight.reshape(-1).tolist(), votes.reshape(-1).tolist()
    prune = {j for j, c in enumerate(flat_v) if c == n}
    order = sorted(
        (j for j, c in enumerate(flat_v) if c < n), key=lambda j: (-flat_v[j], abs(flat_w[j]), j)
    )
    extra = math.ceil(round(s * len(flat_w), 9)) - len(prune)
    prune |= set(order[: max(0, extra)])
    keep = torch.ones(len(flat_w), dtype=torch.bool)
    keep[sorted(prune)] = False
    return keep.reshape(weight.shape)


def _reference_keep_nm(weight: torch.Tensor, votes: torch.Tensor, n: int, m: int) -> torch.Tensor:
    flat_w, flat_v = weight.reshape(-1).tolist(), votes.reshape(-1).tolist()
    keep = torch.zeros(len(flat_w), dtype=torch.bool)
    for start in range(0, len(flat_w), m):
        group = range(start, start + m)
        best = sorted(group, key=lambda j: (flat_v[j], -abs(flat_w[j]), j))[:n]
        keep[best] = True
    return keep.reshape(weight.shape)


def _tied_inputs(seed: int, shape: tuple[int, int], num_clients: int):
    generator = torch.Generator().manual_seed(seed)
    # Integer weights in [-3, 3] and few vote levels force ties on both keys.
    weight = torch.randint(-3, 4, shape, generator=generator).float()
    votes = torch.randint(0, num_clients + 1, shape, generator=generator)
    # Entries every client pruned are zero after l0 aggregation.
    weight[votes == num_clients] = 0.0
    return weight, votes


def test_num_to_prune_hand_computed() -> None:
    assert num_to_prune(8, 0.5) == 4
    assert num_to_prune(10, 0.1 + 0.2) == 3  # 0.30000000000000004 * 10 must not give 4
    assert num_to_prune(10, 0.7) == 7
    assert num_to_prune(3, 0.7) == 3  # ceil(2.1)
    assert num_to_prune(7, 0.5) == 4  # ceil(3.5)
    assert num_to_prune(5, 0.0) == 0
    assert num_to_prune(1, 0.01) == 1
    assert num_to_prune(4096 * 11008, 0.7) == math.ceil(7 * 4096 * 11008 / 10)
    # 0.55 * 1e8 == 55000000.00000001: an absolute slack of 1e-9 is too small at this size.
    assert num_to_prune(100_000_000, 0.55) == 55_000_000
    assert num_to_prune(100_000_001, 0.55) == 55_000_001  # ceil(55000000.55)


def test_num_to_prune_ignores_float_noise_at_all_sizes() -> None:
    # s*d is an integer in exact arithmetic here, but float products land above it, e.g.
    # 0.07 * 100 == 7.000000000000001 and 0.27 * 900 == 243.00000000000003: plain ceil is off.
    assert math.ceil(0.07 * 100) == 8 and math.ceil(0.27 * 900) == 244
    for percent in (7, 14, 17, 27, 28, 34, 50, 70):
        for numel in [100, 300, 900, 1700] + list(range(100, 50_000_000, 997_300)):
            assert num_to_prune(numel, percent / 100) == percent * numel // 100


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity_is_named(sparsity: float) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        num_to_prune(10, sparsity)
    with pytest.raises(ValueError, match="sparsity"):
        expand_mask(torch.ones(2, 5), torch.zeros(2, 5, dtype=torch.int64), 1, sparsity)


@pytest.mark.parametrize("shape", [(7, 13), (8, 8), (1, 1), (3, 5), (16, 33)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.9])
def test_exact_number_of_zeros(shape: tuple[int, int], sparsity: float) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    votes = torch.randint(0, 3, shape, generator=generator)  # 4 clients: no all-N entries
    keep = expand_mask(weight, votes, 4, sparsity)
    assert keep.dtype == torch.bool and keep.shape == weight.shape
    assert int((~keep).sum()) == math.ceil(round(sparsity * weight.numel(), 9))


def test_hand_computed_expansion() -> None:
    weight = torch.tensor([[0.0, 5.0, 1.0, -2.0], [3.0, -1.0, 4.0, 0.5]])
    votes = torch.tensor([[3, 1, 2, 2], [0, 2, 1, 0]])
    # N = 3, s = 0.5: 4 zeros. (0,0) has C = N. Then C = 2: |1| (0,2), |-1| (1,1), |-2| (0,3).
    keep = expand_mask(weight, votes, 3, 0.5)
    expected = torch.tensor([[False, True, False, False], [True, False, True, True]])
    assert torch.equal(keep, expected)


def test_all_pruned_entries_beyond_target_stay_pruned() -> None:
    weight = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    votes = torch.tensor([2, 2, 2, 2, 2, 2, 0, 1])
    keep = expand_mask(weight, votes, 2, 0.5)  # target 4 < 6 all-pruned entries
    assert torch.equal(keep, torch.tensor([False] * 6 + [True, True]))


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_with_many_ties(seed: int) -> None:
    num_clients = 1 + seed % 4
    shape = (1 + seed % 5, 3 + (seed * 7) % 11)
    sparsity = (0.0, 0.3, 0.5, 0.7, 0.95)[seed % 5]
    weight, votes = _tied_inputs(seed, shape, num_clients)
    keep = expand_mask(weight, votes, num_clients, sparsity)
    assert torch.equal(keep, _reference_keep(weight, votes, num_clients, sparsity))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_brute_force_in_other_dtypes(dtype: torch.dtype) -> None:
    weight, votes = _tied_inputs(7, (12, 20), 3)
    weight = (weight * 0.37).to(dtype)
    keep = expand_mask(weight, votes, 3, 0.6)
    assert torch.equal(keep, _reference_keep(weight, votes, 3, 0.6))


def test_vote_order_property() -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 64, generator=generator)
    votes = torch.randint(0, 6, (32, 64), generator=generator)
    keep = expand_mask(weight, votes, 5, 0.6)
    # No kept entry may have more votes than a pruned entry, except the all-N entries.
    pruned_not_all = ~keep & (votes < 5)
    assert int(votes[keep].max()) <= int(votes[pruned_not_all].min())
    assert not keep[votes == 5].any()


def test_input_errors() -> None:
    weight = torch.ones(2, 4)
    with pytest.raises(ValueError, match="shape"):
        expand_mask(weight, torch.zeros(2, 3, dtype=torch.int64), 2, 0.5)
    with pytest.raises(ValueError, match="num_clients"):
        expand_mask(weight, torch.zeros(2, 4, dtype=torch.int64), 0, 0.5)
    with pytest.raises(ValueError, match="exceed"):
        expand_mask(weight, torch.full((2, 4), 3), 2, 0.5)
    with pytest.raises(ValueError, match="integer"):
        expand_mask(weight, torch.zeros(2, 4), 2, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        expand_mask(torch.tensor([float("nan"), 1.0]), torch.zeros(2, dtype=torch.int64), 1, 0.5)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 3)])
@pytest.mark.parametrize("seed", range(6))
def test_nm_matches_brute_force_and_is_valid(n: int, m: int, seed: int) -> None:
    weight, votes = _tied_inputs(100 + seed, (5, 4 * m), 3)
    keep = expand_mask_nm(weight, votes, n, m)
    assert torch.equal(keep, _reference_keep_nm(weight, votes, n, m))
    assert torch.all(keep.reshape(-1, m).sum(dim=1) == n)


def test_nm_hand_computed() -> None:
    weight = torch.tensor([[0.5, -3.0, 2.0, 1.0, 1.0, -1.0, 1.0, 0.0]])
    votes = torch.tensor([[0, 1, 0, 2, 1, 1, 1, 1]])
    # Group 1: fewest votes are columns 0 and 2. Group 2: all tie on votes; |W| = 1 ties
    # for columns 4, 5, 6, so the smaller indices 4 and 5 win.
    keep = expand_mask_nm(weight, votes, 2, 4)
    assert torch.equal(keep, torch.tensor([[True, False, True, False, True, True, False, False]]))


def test_nm_vote_order_within_groups() -> None:
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(16, 32, generator=generator)
    votes = torch.randint(0, 5, (16, 32), generator=generator)
    keep = expand_mask_nm(weight, votes, 2, 4).reshape(-1, 4)
    grouped_votes = votes.reshape(-1, 4)
    kept_max = torch.where(keep, grouped_votes, -1).max(dim=1).values
    pruned_min = torch.where(~keep, grouped_votes, 99).min(dim=1).values
    assert torch.all(kept_max <= pruned_min)


def test_nm_errors() -> None:
    votes = torch.zeros(2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="0 < n < m"):
        expand_mask_nm(torch.ones(2, 8), votes, 4, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        expand_mask_nm(torch.ones(2, 8), votes, 0, 4)
    with pytest.raises(ValueError, match="divisible"):
        expand_mask_nm(torch.ones(2, 6), torch.zeros(2, 6, dtype=torch.int64), 2, 4)
    with pytest.raises(ValueError, match="shape"):
        expand_mask_nm(torch.ones(2, 8), torch.zeros(2, 4, dtype=torch.int64), 2, 4)
