"""The re-solve merger's memory: the uniform mean holds a float32 sum per kept entry and an int32
count per input column, nothing per entry besides, and gives the float64 mean's values.

The expected means are computed by hand, entry by entry, from the module docstring's rules
(dead columns left out, dense-zero columns counted), not by the code under test.
"""

import gc
import weakref
from collections.abc import Mapping

import pytest
import torch

from fedspallm_strategy.merge import resolve_average
from fedspallm_strategy.merge.resolve_average import ResolveAverage, resolve_state_bytes


def _random_case(seed: int, rows: int = 24, cols: int = 16, clients: int = 5):
    """A mask, dense kept values with all-zero columns, and clients' values with dead ones."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols, generator=generator) > 0.4
    keep[:, :4] = True  # the special columns below keep every row
    dense = torch.randn(rows, cols, generator=generator)
    dense[:, 0] = 0.0  # dense-zero column: a client's 0 there is a value
    dense[:, 1] = 0.0  # dense-zero column that every client leaves at 0: its mean is 0
    values = []
    for client in range(clients):
        weight = dense + 0.1 * torch.randn(rows, cols, generator=generator)
        weight[:, 1] = 0.0
        if client % 2:
            weight[:, 0] = 0.0  # zeros in a dense-zero column count
        weight[:, 2] = 0.0  # no client reached column 2: its entries stay 0
        weight[:, 3 + client] = 0.0  # each client leaves one other column dead
        values.append(weight[keep])
    return keep, dense[keep], values


def _mean_by_hand(keep, dense_kept, values) -> list[float]:
    """The uniform rule in float64, one entry at a time."""
    rows, cols = keep.shape
    positions = [(r, c) for r in range(rows) for c in range(cols) if keep[r, c]]
    column_of = [c for _, c in positions]

    def column_has_a_value(kept, column):
        return any(float(kept[k]) != 0.0 for k in range(len(kept)) if column_of[k] == column)

    expected = []
    for k, column in enumerate(column_of):
        dense_zero = not column_has_a_value(dense_kept, column)
        counted = [v for v in values if dense_zero or column_has_a_value(v, column)]
        total = sum(float(v[k]) for v in counted)  # Python floats: float64
        expected.append(total / len(counted) if counted else 0.0)
    return expected


@pytest.mark.parametrize("block_entries", [1 << 20, 16, 40, 1])
def test_the_uniform_mean_equals_the_float64_mean_by_hand(monkeypatch, block_entries):
    """Within K * 2^-24 * max|value| (the float32 sum's bound), whatever the row blocks."""
    monkeypatch.setattr(resolve_average, "BLOCK_ENTRIES", block_entries)
    keep, dense, values = _random_case(seed=block_entries)
    average = ResolveAverage({"w": keep}, ["w"])
    for kept in values:
        average.add({"w": kept}, {})
    merged = average.finish("w", dense)
    assert merged.dtype == torch.float32 and merged.shape == dense.shape
    expected = torch.tensor(_mean_by_hand(keep, dense, values), dtype=torch.float64)
    tolerance = len(values) * 2**-24 * max(float(v.abs().max()) for v in values)
    torch.testing.assert_close(merged.double(), expected, rtol=0, atol=tolerance)
    columns = keep.nonzero()[:, 1]
    assert torch.all(merged[columns == 1] == 0) and torch.all(merged[columns == 2] == 0)
    assert torch.all(merged[columns == 0] != 0)  # the dense-zero column's values are averaged


def test_the_uniform_state_is_one_float32_per_kept_entry_and_one_int32_per_column():
    keep, dense, values = _random_case(seed=1, rows=40, cols=24, clients=6)
    other = torch.rand(8, 56, generator=torch.Generator().manual_seed(2)) > 0.5
    masks = {"w": keep, "v": other}
    average = ResolveAverage(masks, ["w", "v"])
    assert average.masks is masks  # referenced, not copied
    kept, width = int(keep.sum()), keep.shape[1]
    for kept_values in values:
        average.add({"w": kept_values, "v": torch.randn(int(other.sum()))}, {})
    # Exactly the running sum and the per-column count, each fixed in size whatever K.
    state = [t for store in (average.plain, average.reached) for t in store.values()]
    assert [t for t in state if t.dtype == torch.int64] == []
    assert average.plain["w"].dtype == torch.float32 and average.plain["w"].shape == (kept,)
    assert average.reached["w"].dtype == torch.int32 and average.reached["w"].shape == (width,)
    assert average.replies == {}
    assert average.state_bytes("w") == 4 * kept + 4 * width
    assert average.state_bytes("w") == resolve_state_bytes(kept, width, len(values), "mean", False)
    assert average.state_bytes() == average.state_bytes("w") + 4 * int(other.sum()) + 4 * 56
    assert average.finish("w", dense).shape == (kept,)
    assert average.state_bytes("w") == 0 and average.state_bytes() == average.state_bytes("v")


class _UnpackOnRead(Mapping):
    """Masks handed out as a fresh tensor on every read (as packed masks are), remembered weakly."""

    def __init__(self, masks):
        self.masks, self.handed_out = masks, []

    def __getitem__(self, name):
        mask = self.masks[name].clone()
        self.handed_out.append(weakref.ref(mask))
        return mask

    def __iter__(self):
        return iter(self.masks)

    def __len__(self):
        return len(self.masks)


def test_no_mask_is_held_between_replies_and_a_packed_mapping_gives_the_same_mean():
    keep, dense, values = _random_case(seed=5)
    masks = _UnpackOnRead({"w": keep})
    average, plain = ResolveAverage(masks, ["w"]), ResolveAverage({"w": keep}, ["w"])
    for kept in values:
        average.add({"w": kept}, {})
        plain.add({"w": kept}, {})
        gc.collect()
        assert all(ref() is None for ref in masks.handed_out)  # read, used and let go
    assert torch.equal(average.finish("w", dense), plain.finish("w", dense))
    assert len(masks.handed_out) == 1 + len(values) + 1  # counted once, one read a reply, finish


@pytest.mark.parametrize(
    ("kept", "in_features", "clients"), [(1, 1, 1), (5_000, 64, 3), (11_272_192, 4096, 16)]
)
def test_resolve_state_bytes_of_the_uniform_mean_do_not_grow_with_the_clients(
    kept, in_features, clients
):
    uniform = resolve_state_bytes(kept, in_features, clients, "mean", False)
    assert uniform == 4 * kept + 4 * in_features
    assert uniform == resolve_state_bytes(kept, in_features, 1, "mean", False)
    # The buffered rules hold every client's values and stack them at finish.
    for aggregation, weighted in (("mean", True), ("median", False), ("trimmed-mean", False)):
        buffered = resolve_state_bytes(kept, in_features, clients, aggregation, weighted)
        held = clients * (4 * kept + (4 * in_features if weighted else 0))
        assert buffered > held + 8 * clients * kept  # at least a float64 stack of the values


def test_buffered_rules_hold_each_reply_and_no_column_index():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    for aggregation, weights in (("mean", {"w": torch.ones(3)}), ("median", {})):
        average = ResolveAverage({"w": keep}, ["w"], aggregation)
        for _ in range(3):
            average.add({"w": torch.randn(4)}, weights)
        held = 3 * (4 * 4 + (4 * 3 if weights else 0))
        assert average.state_bytes() == held == average.state_bytes("w")
        assert average.plain == average.reached == {}
        assert not hasattr(average, "columns")
        assert resolve_state_bytes(4, 3, 3, aggregation, bool(weights)) > held
        assert average.finish("w").dtype == torch.float64 and average.state_bytes() == 0


def test_equal_16_bit_values_come_back_exactly():
    """16-bit values (the default wire dtype, ``payload-dtype`` auto) sum exactly in float32."""
    keep = torch.rand(64, 32, generator=torch.Generator().manual_seed(3)) > 0.5
    for dtype in (torch.float16, torch.bfloat16):
        value = torch.randn(int(keep.sum()), generator=torch.Generator().manual_seed(4)).to(dtype)
        average = ResolveAverage({"w": keep}, ["w"])
        for _ in range(7):
            average.add({"w": value}, {})
        assert torch.equal(average.finish("w", value).to(dtype), value)


def test_a_reply_of_the_wrong_length_is_refused_before_it_is_added():
    keep = torch.tensor([[True, False], [True, True]])
    average = ResolveAverage({"w": keep}, ["w"])
    average.add({"w": torch.tensor([1.0, 2.0, 3.0])}, {})
    with pytest.raises(ValueError, match="keeps 3"):
        average.add({"w": torch.tensor([1.0, 2.0])}, {})
    assert torch.equal(average.finish("w"), torch.tensor([1.0, 2.0, 3.0]))
