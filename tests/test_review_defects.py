"""Defects from the review: re-solve dilution by dead inputs, fedavg's global calibration on
mask-only pruners, and unbounded ``hessian-diagonal`` weights.

Each test computes the expected merge by hand (or from the pruner itself) and failed on the code
before its fix.
"""

import torch
from flwr.app import ArrayRecord
from test_layerwise import make_config, partitions  # tests/ is on sys.path under pytest

from client_app.app import app as client_app
from fedspallm_strategy.merge.aggregation import L0Accumulator
from fedspallm_strategy.merge.merging import MatrixMerger
from fedspallm_strategy.strategies.layerwise import LayerwiseMerge, ResolveAverage
from fedspallm_strategy.wire.payload import decode
from fedspallm_strategy.wire.protocol import GLOBAL_KEY
from fedspallm_strategy.wire.replies import reply_bytes
from llm_pruning.families import prunable_weights
from llm_pruning.lazy import layer_tensors
from llm_pruning.models import load_model
from llm_pruning.pruners import HessianStats, SparsityPattern, sparsegpt_prune
from server_app.inprocess import InProcessGrid

# ----------------------------------------------------------------- 1. dead input columns


def _stats(inputs: torch.Tensor) -> HessianStats:
    stats = HessianStats(inputs.shape[1])
    stats.add(inputs)
    return stats


def test_a_column_one_client_never_saw_is_averaged_over_the_clients_that_saw_it():
    """Three clients re-solve under one mask; client 3's calibration never reaches input 2, so
    SparseGPT sets its weights there to 0. Entry (r, 2) must be the mean of clients 1 and 2,
    not 2/3 of it."""
    generator = torch.Generator().manual_seed(0)
    rows, cols, dead = 6, 8, 2
    dense = torch.randn(rows, cols, generator=generator)
    keep = torch.rand(rows, cols, generator=generator) > 0.4
    keep[:, dead] = True  # the merged mask keeps the whole column
    mixing = torch.randn(cols, cols, generator=generator)
    inputs = [torch.randn(200, cols, generator=generator) @ mixing for _ in range(3)]
    inputs[2][:, dead] = 0.0  # client 3's calibration never reaches input `dead`
    resolved = [
        sparsegpt_prune(dense, _stats(x), SparsityPattern(0.5), keep_mask=keep)[0] for x in inputs
    ]
    assert torch.all(resolved[2][:, dead] == 0)  # SparseGPT's dead-input rule
    assert torch.all(resolved[0][:, dead] != 0) and torch.all(resolved[1][:, dead] != 0)
    average = ResolveAverage({"w": keep}, ["w"])
    for weight in resolved:
        average.add({"w": weight[keep]}, {})
    merged = torch.zeros(rows, cols, dtype=torch.float64)
    merged[keep] = average.finish("w", dense[keep]).double()
    # The uniform mean sums in float32: within K * 2^-24 * max|value| of the float64 mean.
    tolerance = 3 * 2**-24 * max(float(r.abs().max()) for r in resolved)
    seen = (resolved[0].double() + resolved[1].double()) / 2
    torch.testing.assert_close(merged[:, dead], seen[:, dead], rtol=0, atol=tolerance)
    # Every other column was reached by all three: their plain mean, as before.
    everyone = sum(r.double() for r in resolved) / 3
    others = torch.arange(cols) != dead
    kept = keep & others
    torch.testing.assert_close(merged[kept], everyone[kept], rtol=0, atol=tolerance)


def test_hand_computed_resolve_means_leave_out_each_clients_dead_columns():
    keep = torch.tensor([[True, True, False], [True, True, True]])  # columns 0, 1, 0, 1, 2
    dense = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    clients = [
        torch.tensor([2.0, 4.0, 6.0, 8.0, 3.0]),
        torch.tensor([4.0, 0.0, 2.0, 0.0, 5.0]),  # column 1 dead
        torch.tensor([0.0, 6.0, 0.0, 2.0, 0.0]),  # columns 0 and 2 dead
    ]
    average = ResolveAverage({"w": keep}, ["w"])
    for values in clients:
        average.add({"w": values}, {})
    # Column 0: clients 1, 2; column 1: clients 1, 3; column 2: clients 1, 2.
    expected = torch.tensor([3.0, 5.0, 4.0, 5.0, 4.0])
    assert torch.equal(average.finish("w", dense), expected)


def test_a_column_no_client_reached_stays_zero_and_a_zero_dense_column_is_no_dead_one():
    keep = torch.tensor([[True, True], [True, True]])  # columns 0, 1, 0, 1
    average = ResolveAverage({"w": keep}, ["w"])
    average.add({"w": torch.tensor([0.0, 2.0, 0.0, 4.0])}, {})
    average.add({"w": torch.tensor([0.0, 0.0, 0.0, 0.0])}, {})
    # Column 0: nobody reached it (SparseGPT on the pooled inputs zeroes it too): 0.
    # Column 1: its dense weights are 0, so client 2's zeros are values, not a dead input.
    dense = torch.tensor([3.0, 0.0, 3.0, 0.0])
    assert torch.equal(average.finish("w", dense), torch.tensor([0.0, 1.0, 0.0, 2.0]))


def test_the_l0_mean_leaves_out_kept_entries_of_a_dead_column_but_counts_their_votes():
    """Prune round: client 3's block ran out of prune budget before its dead column, so it
    kept entries there with value 0. The l0 mean is over the keepers that reached the column;
    the keep votes (hence the mask) are unchanged."""
    dense = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    keep = torch.tensor([[True, True, False, False], [True, True, False, False]])
    clients = [
        torch.tensor([[1.5, 2.5, 0.0, 0.0], [5.5, 6.5, 0.0, 0.0]]),
        torch.tensor([[0.5, 3.5, 0.0, 0.0], [4.5, 7.5, 0.0, 0.0]]),
        torch.tensor([[1.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]),  # column 1 dead
    ]
    merger = MatrixMerger("fedspallm", {"w": dense}, SparsityPattern(0.5), torch.Generator())
    for weight in clients:
        merger.add({"w": weight}, {"w": keep})
    merged, mask = merger.finish("w")
    assert torch.equal(mask, keep)
    expected = torch.tensor([[1.0, 3.0, 0.0, 0.0], [5.0, 7.0, 0.0, 0.0]])
    assert torch.equal(merged, expected)


def test_a_value_mask_leaves_values_out_of_the_l0_mean_and_keeps_the_votes():
    accumulator = L0Accumulator((1, 3))
    keep = torch.tensor([[True, True, False]])
    accumulator.add(torch.tensor([[2.0, 4.0, 9.0]]), keep)  # before any value was left out
    accumulator.add(torch.tensor([[0.0, 6.0, 9.0]]), keep, torch.tensor([[False, True, True]]))
    accumulator.add(torch.tensor([[0.0, 8.0, 9.0]]), keep, torch.tensor([[False, True, True]]))
    assert torch.equal(accumulator.prune_votes, torch.tensor([[0, 0, 3]], dtype=torch.int32))
    assert torch.equal(accumulator.finish(), torch.tensor([[2.0, 6.0, 0.0]]))
    nobody = L0Accumulator((1, 1))
    nobody.add(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1) > 0)
    assert torch.equal(nobody.finish(), torch.zeros(1, 1))  # every keeper's column was dead


def test_the_robust_l0_rule_leaves_out_dead_columns_too():
    dense = torch.tensor([[1.0, 2.0]])
    keep = torch.ones(1, 2, dtype=torch.bool)
    merger = MatrixMerger(
        "fedspallm", {"w": dense}, SparsityPattern(0.0), torch.Generator(), aggregation="median"
    )
    for weight in ([[1.0, 2.5]], [[2.0, 0.0]], [[1.0, 1.5]]):  # client 2: column 1 dead
        merger.add({"w": torch.tensor(weight)}, {"w": keep})
    merged, _ = merger.finish("w")
    # Changes from dense: norms 0.5, 1 (column 0 only) and 0.5, so client 2's 2.0 is clipped to
    # 1.5; column 0 is median(1, 1.5, 1), column 1 the median of 2.5 and 1.5 alone.
    assert merged.tolist() == [[1.0, 2.0]]


def test_robust_resolve_rules_leave_out_dead_columns_too():
    keep = torch.tensor([[True, True]])
    average = ResolveAverage({"w": keep}, ["w"], "median")
    for values in ([1.0, 2.0], [3.0, 0.0], [5.0, 4.0]):  # client 2: column 1 dead
        average.add({"w": torch.tensor(values)}, {})
    # No dense weights given (so no clipping): column 1 is the median of 2 and 4 alone.
    assert average.finish("w").tolist() == [3.0, 3.0]


# ----------------------------------------------------- 2. fedavg + global + mask-only pruner


def test_fedavg_global_calibration_hands_down_the_merged_values_of_a_mask_only_pruner(tmp_path):
    """The clients must advance through the layers the server merged: with fedavg those are a
    re-pruned mean, not dense * mask, so a mask-only pruner's hand-down needs the values."""
    config = make_config(tmp_path, strategy="fedavg", calibration="global", pruner="wanda")
    model, _ = load_model(config.model)
    dense = {n: p.data.clone() for n, p in model.named_parameters()}
    grid = InProcessGrid(client_app, partitions(2), {}, run_id=7)
    strategy = LayerwiseMerge(model, config, node_budgets={1: None, 2: None}, rule="fedavg")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)
    assert not strategy.remaining and not strategy.accounting.rejected
    handed = 0
    for message in grid.sent:
        if GLOBAL_KEY not in message.content:
            continue
        tensors, masks = decode(reply_bytes(message, GLOBAL_KEY, max_bytes=2**30))
        for name, keep in masks.items():
            layer = int(name.split(".layers.")[1].split(".")[0])
            values = tensors[name] if tensors else dense[name]  # what the client applies
            applied = torch.where(keep, values, torch.zeros(()))
            assert torch.equal(applied, layer_tensors(strategy.model, layer)[name]), name
            handed += 1
    # Rounds 2..4 hand down layers 0..2 to both nodes.
    assert handed == 3 * 2 * len(prunable_weights(strategy.model, 0))


# ------------------------------------------------------- 3. bounded hessian-diagonal weights


def test_one_client_cannot_own_the_hessian_weighted_mean_by_inflating_its_weights():
    keep = torch.tensor([[True, False, True], [False, True, True]])  # columns 0, 2, 1, 2
    honest = [
        ({"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, {"w": torch.tensor([1.0, 2.0, 4.0])}),
        ({"w": torch.tensor([2.0, 3.0, 4.0, 5.0])}, {"w": torch.tensor([2.0, 2.0, 2.0])}),
    ]
    attacker = ({"w": torch.full((4,), 10.0)}, {"w": torch.full((3,), 1e6)})
    average = ResolveAverage({"w": keep}, ["w"])
    for reply in (*honest, attacker):
        average.add(*reply)
    merged = average.finish("w")
    # Per column the attacker's weight is clipped to 4x the median client's: column 0
    # median(1, 2, 1e6) = 2 -> 8; column 1 median(2, 2, 1e6) = 2 -> 8; column 2 -> 4 -> 16.
    expected = torch.tensor(
        [
            (1 * 1 + 2 * 2 + 8 * 10) / 11,  # (0, 0), column 0
            (4 * 2 + 2 * 3 + 16 * 10) / 22,  # (0, 2), column 2
            (2 * 3 + 2 * 4 + 8 * 10) / 12,  # (1, 1), column 1
            (4 * 4 + 2 * 5 + 16 * 10) / 22,  # (1, 2), column 2
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=0)
    # The attacker's share of an entry, 4m / (4m + the honest weights), stays under 3/4 (it
    # was 1 - 1e-6 before the bound).
    honest_mean = torch.tensor([5 / 3, 14 / 6, 7 / 2, 26 / 6], dtype=torch.float64)
    share = (merged - honest_mean) / (10.0 - honest_mean)
    assert torch.all(share < 0.75), share
