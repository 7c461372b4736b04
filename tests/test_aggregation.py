"""Tests for fedspallm_strategy.aggregation: hand-computed l0-norm aggregates."""

from __future__ import annotations

import pytest
import torch

from fedspallm_strategy.merge.aggregation import L0Accumulator, l0_aggregate


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_hand_computed_three_clients() -> None:
    weights = [
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        torch.tensor([[5.0, 6.0], [7.0, 8.0]]),
        torch.tensor([[9.0, 10.0], [11.0, 12.0]]),
    ]
    masks = [_mask([[1, 0], [1, 0]]), _mask([[1, 1], [0, 0]]), _mask([[0, 1], [1, 0]])]
    # (0,0): clients 0,1 -> (1+5)/2; (0,1): 1,2 -> (6+10)/2; (1,0): 0,2 -> (3+11)/2; (1,1): none.
    expected = torch.tensor([[3.0, 8.0], [7.0, 0.0]])
    assert torch.equal(l0_aggregate(weights, masks), expected)


def test_pruned_values_are_ignored_not_averaged_in() -> None:
    # A client's value at a pruned position must not matter, even if it is not zero.
    weights = [torch.tensor([[2.0, 100.0]]), torch.tensor([[-50.0, 4.0]])]
    masks = [_mask([[1, 0]]), _mask([[0, 1]])]
    assert torch.equal(l0_aggregate(weights, masks), torch.tensor([[2.0, 4.0]]))


def test_prune_votes_hand_computed() -> None:
    accumulator = L0Accumulator((2, 2))
    accumulator.add(torch.ones(2, 2), _mask([[1, 0], [1, 0]]))
    accumulator.add(torch.ones(2, 2), _mask([[1, 1], [0, 0]]))
    accumulator.add(torch.ones(2, 2), _mask([[0, 1], [1, 0]]))
    assert accumulator.num_clients == 3
    assert torch.equal(accumulator.prune_votes, torch.tensor([[1, 1], [1, 3]], dtype=torch.int32))
    assert torch.equal(accumulator.kept_count, torch.tensor([[2, 2], [2, 0]], dtype=torch.int32))


def test_identical_clients_give_the_same_layer() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 24, generator=generator)
    keep = torch.rand(16, 24, generator=generator) > 0.5
    pruned = weight * keep
    result = l0_aggregate([pruned] * 5, [keep] * 5)
    assert torch.equal(result, pruned)


def test_order_invariance() -> None:
    generator = torch.Generator().manual_seed(1)
    # Dyadic values (multiples of 1/8) keep every float32 sum exact, so any order agrees.
    weights = [torch.randint(-64, 64, (8, 12), generator=generator) / 8.0 for _ in range(4)]
    masks = [torch.rand(8, 12, generator=generator) > 0.4 for _ in range(4)]
    forward = l0_aggregate(weights, masks)
    backward = l0_aggregate(weights[::-1], masks[::-1])
    shuffled = l0_aggregate([weights[i] for i in (2, 0, 3, 1)], [masks[i] for i in (2, 0, 3, 1)])
    assert torch.equal(forward, backward)
    assert torch.equal(forward, shuffled)


def test_zero_only_where_every_client_pruned() -> None:
    generator = torch.Generator().manual_seed(2)
    # Weights in [1, 2): never zero, so a zero in the result can only come from pruning.
    weights = [1.0 + torch.rand(10, 10, generator=generator) for _ in range(3)]
    masks = [torch.rand(10, 10, generator=generator) > 0.6 for _ in range(3)]
    result = l0_aggregate(weights, masks)
    nobody_kept = ~(masks[0] | masks[1] | masks[2])
    assert nobody_kept.any() and (~nobody_kept).any()
    assert torch.equal(result == 0, nobody_kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_clients", [2, 3, 7, 11])
def test_untouched_kept_values_are_recovered_exactly(dtype: torch.dtype, num_clients: int) -> None:
    # Wanda/magnitude clients send dense * M_i: every kept entry must come back bit-exact.
    generator = torch.Generator().manual_seed(num_clients)
    dense = torch.randn(64, 48, generator=generator).to(dtype)
    masks = [torch.rand(64, 48, generator=generator) > 0.5 for _ in range(num_clients)]
    result = l0_aggregate([dense * mask for mask in masks], masks)
    kept_by_someone = torch.stack(masks).any(dim=0)
    assert result.dtype == dtype
    assert torch.equal(result[kept_by_someone], dense[kept_by_someone])
    assert torch.equal(result[~kept_by_someone], torch.zeros_like(dense)[~kept_by_someone])


def test_streaming_equals_batch() -> None:
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(20, 30, generator=generator) for _ in range(6)]
    masks = [torch.rand(20, 30, generator=generator) > 0.5 for _ in range(6)]
    accumulator = L0Accumulator((20, 30))
    for weight, mask in zip(weights, masks, strict=True):
        accumulator.add(weight, mask)
    assert torch.equal(accumulator.finish(), l0_aggregate(weights, masks))
    expected = sum(m.float() * w for w, m in zip(weights, masks, strict=True)) / torch.stack(
        masks
    ).sum(0).clamp(min=1)
    torch.testing.assert_close(accumulator.finish(), expected)


def test_finish_is_repeatable_and_accumulator_can_continue() -> None:
    accumulator = L0Accumulator((1, 2))
    accumulator.add(torch.tensor([[2.0, 4.0]]), _mask([[1, 1]]))
    assert torch.equal(accumulator.finish(), torch.tensor([[2.0, 4.0]]))
    accumulator.add(torch.tensor([[6.0, 8.0]]), _mask([[1, 0]]))
    assert torch.equal(accumulator.finish(), torch.tensor([[4.0, 4.0]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_is_preserved(dtype: torch.dtype) -> None:
    weights = [torch.tensor([[1.5, 2.5]], dtype=dtype), torch.tensor([[2.5, 3.5]], dtype=dtype)]
    masks = [_mask([[1, 1]]), _mask([[1, 0]])]
    result = l0_aggregate(weights, masks)
    assert result.dtype == dtype
    assert torch.equal(result, torch.tensor([[2.0, 2.5]], dtype=dtype))


def test_memory_does_not_grow_with_clients() -> None:
    accumulator = L0Accumulator((4, 4))
    accumulator.add(torch.ones(4, 4, dtype=torch.float16), torch.ones(4, 4, dtype=torch.bool))
    held = [t.numel() * t.element_size() for t in vars(accumulator).values() if torch.is_tensor(t)]
    for _ in range(20):
        accumulator.add(torch.ones(4, 4, dtype=torch.float16), torch.ones(4, 4, dtype=torch.bool))
    after = [t.numel() * t.element_size() for t in vars(accumulator).values() if torch.is_tensor(t)]
    assert held == after
    # float32 sum + int16 count for 16-bit weights: 6 bytes per entry.
    assert sum(after) == 16 * 6


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        l0_aggregate([], [])
    with pytest.raises(ValueError, match="masks"):
        l0_aggregate([torch.ones(2)], [])
    with pytest.raises(ValueError, match="shape"):
        l0_aggregate([torch.ones(2, 2), torch.ones(2, 3)], [_mask([[1, 1]] * 2)] * 2)
    with pytest.raises(ValueError, match="bool"):
        l0_aggregate([torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match="floating"):
        l0_aggregate([torch.ones(2, dtype=torch.int32)], [torch.ones(2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="dtype"):
        l0_aggregate(
            [torch.ones(2), torch.ones(2, dtype=torch.float16)],
            [torch.ones(2, dtype=torch.bool)] * 2,
        )
    with pytest.raises(ValueError, match="non-finite"):
        l0_aggregate([torch.tensor([float("nan"), 1.0])], [torch.tensor([True, True])])
    # ... but a non-finite value at a pruned position is ignored.
    result = l0_aggregate([torch.tensor([float("inf"), 1.0])], [torch.tensor([False, True])])
    assert torch.equal(result, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="before any client"):
        L0Accumulator((2,)).finish()
