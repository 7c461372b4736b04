"""Strategy exact: the statistics codec, and the proof that it reaches the centralized model."""

import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord

from client_app.app import app as client_app
from client_app.running_inputs import STATE_FILE, state_dir
from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig
from fedspallm_strategy.strategies.centralized import Centralized, pooled
from fedspallm_strategy.strategies.exact import Exact
from fedspallm_strategy.strategies.exact_plan import plan_exact
from fedspallm_strategy.wire.payload import decode
from fedspallm_strategy.wire.protocol import (
    EXACT_KEY,
    EXACT_MESSAGE_TYPE,
    PAYLOAD_KEY,
    PREVIOUS_KEY,
    SPEC_KEY,
)
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from fedspallm_strategy.wire.stats_payload import (
    decode_statistics,
    encode_statistics,
    statistics_nbytes,
    validate_statistics,
)
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.models import load_model
from llm_pruning.pruners import ColumnNormStats, HessianStats
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {"model": "tiny-llama", "seqlen": 64, "calib-samples": 4, "eval-windows": 2}
LLAMA_GROUPS = [
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
]


def make_config(tmp_path, **overrides) -> RunConfig:
    settings = {**TINY, "strategy": "exact", "output-dir": str(tmp_path), **overrides}
    return RunConfig.from_mapping(settings)


# ------------------------------------------------------------------------------- codec


def hessian(inputs=8, rows=20, seed=0) -> HessianStats:
    stats = HessianStats(inputs)
    stats.add(torch.randn(rows, inputs, generator=torch.Generator().manual_seed(seed)))
    return stats


def column_norms(inputs=8, rows=20, seed=0) -> ColumnNormStats:
    stats = ColumnNormStats(inputs)
    stats.add(torch.randn(rows, inputs, generator=torch.Generator().manual_seed(seed)))
    return stats


def test_hessian_round_trip_keeps_the_upper_triangle_bit_exact():
    stats = hessian(inputs=13, rows=40)
    data = encode_statistics({"a.weight": (stats, ["a.weight", "b.weight"])})
    kind, entries = decode_statistics(data)
    decoded, covers = entries["a.weight"]
    assert kind == "hessian" and covers == ("a.weight", "b.weight")
    assert decoded.count == 40 and decoded.num_inputs == 13
    assert torch.equal(decoded.xtx.triu(), stats.xtx.triu())
    assert torch.equal(decoded.xtx, decoded.xtx.T)
    # The tensor is the upper triangle in float32; the rest is a small JSON header.
    assert statistics_nbytes("hessian", 13) == 13 * 14 // 2 * 4
    assert 0 < len(data) - statistics_nbytes("hessian", 13) < 400


def test_column_norms_round_trip_is_bit_exact():
    stats = column_norms(inputs=9, rows=7)
    kind, entries = decode_statistics(encode_statistics({"w": (stats, ["w"])}))
    assert kind == "column-norms"
    assert torch.equal(entries["w"][0].sq_norm, stats.sq_norm) and entries["w"][0].count == 7


def test_encode_refuses_inconsistent_input():
    with pytest.raises(ValueError, match="one kind"):
        encode_statistics({"a": (hessian(), ["a"]), "b": (column_norms(), ["b"])})
    with pytest.raises(ValueError, match="start with"):
        encode_statistics({"a": (hessian(), ["b", "a"])})
    with pytest.raises(ValueError, match="covered twice"):
        encode_statistics({"a": (hessian(), ["a", "b"]), "b": (hessian(), ["b"])})


def forged(tensors, matrices, **metadata) -> bytes:
    """A statistics payload with chosen tensors and metadata (defaults valid)."""
    header = {"format": "fedspallm-statistics", "version": "1", "kind": "hessian"}
    header.update(metadata)
    header["matrices"] = json.dumps(matrices)
    return safetensors.torch.save(tensors, metadata=header)


GOOD_ENTRY = {"inputs": 2, "count": 5, "covers": ["w"]}
GOOD_TENSOR = torch.tensor([1.0, 0.5, 2.0])  # upper triangle of [[1, .5], [.5, 2]]

MALFORMED = {
    "empty": b"",
    "truncated": encode_statistics({"w": (hessian(), ["w"])})[:-9],
    "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",
    "other format": forged({"stats/w": GOOD_TENSOR}, {"w": GOOD_ENTRY}, format="x"),
    "unknown kind": forged({"stats/w": GOOD_TENSOR}, {"w": GOOD_ENTRY}, kind="gram"),
    "wrong length": forged({"stats/w": torch.ones(4)}, {"w": GOOD_ENTRY}),
    "2-D": forged({"stats/w": torch.ones(3, 1)}, {"w": GOOD_ENTRY}),
    "float64": forged({"stats/w": GOOD_TENSOR.double()}, {"w": GOOD_ENTRY}),
    "nan": forged({"stats/w": torch.tensor([1.0, float("nan"), 2.0])}, {"w": GOOD_ENTRY}),
    "negative diagonal": forged({"stats/w": torch.tensor([-1.0, 0.0, 2.0])}, {"w": GOOD_ENTRY}),
    "extra tensor": forged(
        {"stats/w": GOOD_TENSOR, "stats/v": GOOD_TENSOR.clone()}, {"w": GOOD_ENTRY}
    ),
    "missing tensor": forged({}, {"w": GOOD_ENTRY}),
    "covers without key": forged({"stats/w": GOOD_TENSOR}, {"w": {**GOOD_ENTRY, "covers": ["v"]}}),
    "duplicate cover": forged(
        {"stats/w": GOOD_TENSOR}, {"w": {**GOOD_ENTRY, "covers": ["w", "w"]}}
    ),
    "bool count": forged({"stats/w": GOOD_TENSOR}, {"w": {**GOOD_ENTRY, "count": True}}),
    "negative count": forged({"stats/w": GOOD_TENSOR}, {"w": {**GOOD_ENTRY, "count": -1}}),
    "sums over 0 rows": forged({"stats/w": GOOD_TENSOR}, {"w": {**GOOD_ENTRY, "count": 0}}),
    "extra entry key": forged({"stats/w": GOOD_TENSOR}, {"w": {**GOOD_ENTRY, "dtype": "f32"}}),
    "no matrices": forged({}, {}),
}


def test_forged_baseline_is_valid():
    _, entries = decode_statistics(forged({"stats/w": GOOD_TENSOR}, {"w": GOOD_ENTRY}))
    assert torch.equal(entries["w"][0].xtx, torch.tensor([[1.0, 0.5], [0.5, 2.0]]))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_statistics_are_rejected(case):
    with pytest.raises(PayloadError):
        decode_statistics(MALFORMED[case])


def test_size_limit_is_checked_before_parsing():
    data = encode_statistics({"w": (hessian(), ["w"])})
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decode_statistics(data, max_bytes=len(data) - 1)


def test_validation_against_the_round():
    entries = {"a": (hessian(8), ("a", "b")), "c": (hessian(8), ("c",))}
    expected = {"a": (8, ("a", "b")), "c": (8, ("c",))}
    validate_statistics("hessian", entries, expected_kind="hessian", expected=expected)
    bad = [
        ("column-norms", entries, expected, "kind"),
        ("hessian", {"a": entries["a"]}, expected, "lacks"),
        ("hessian", entries, {"a": expected["a"]}, "unexpected"),
        ("hessian", entries, {**expected, "a": (8, ("a",))}, "covering"),
        ("hessian", entries, {**expected, "c": (4, ("c",))}, "inputs"),
        ("hessian", {**entries, "c": (hessian(8, rows=3), ("c",))}, expected, "counts differ"),
    ]
    for kind, got, want, fragment in bad:
        with pytest.raises(PayloadError, match=fragment):
            validate_statistics(kind, got, expected_kind="hessian", expected=want)


# ----------------------------------------------------------------------- the federation


def node_names(grid: InProcessGrid) -> dict[int, str]:
    return {n: NodeConfig.from_mapping(c.node_config).name for n, c in grid.contexts.items()}


def run_exact(config: RunConfig, num_nodes=3, *, run_id, reply_filter=None):
    grid = InProcessGrid.simulation(
        client_app, num_nodes, {}, run_id=run_id, reply_filter=reply_filter
    )
    model, _ = load_model(config.model)
    strategy = Exact(model, config, node_names=node_names(grid))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)
    return strategy, grid


def centralized(config: RunConfig, grid: InProcessGrid, nodes=None):
    """The centralized model on the pooled shards of ``nodes`` (default: all of the grid's)."""
    model, tokenizer = load_model(config.model)
    configs = {
        n: NodeConfig.from_mapping(c.node_config)
        for n, c in grid.contexts.items()
        if nodes is None or n in nodes
    }
    Centralized(model, config, pooled(config, tokenizer, configs)).prune()
    return model


def compare(first, second, layers=None):
    """``(flipped mask entries, largest |difference| outside rows with a flip)`` over every
    prunable matrix of ``layers`` (default all)."""
    a, b = dict(first.named_parameters()), dict(second.named_parameters())
    flips, worst = 0, 0.0
    for layer in range(num_layers(first)) if layers is None else layers:
        for name in prunable_weights(first, layer):
            x, y = a[name].data, b[name].data
            flipped = (x != 0) != (y != 0)
            flips += int(flipped.sum())
            # SparseGPT and Wanda treat the rows of a matrix independently, so a near-tie
            # flip disturbs only its own row.
            rows = ~flipped.any(dim=1)
            if rows.any():
                worst = max(worst, float((x[rows] - y[rows]).abs().max()))
    return flips, worst


# The float32 unit roundoff, 2^-24: one rounding moves a value by at most this, relatively.
UNIT = torch.finfo(torch.float32).eps / 2


def rounding_bound(stats) -> float:
    """``ε``: two float32 evaluations of one layer's pruning whose statistics were summed in
    different orders differ in ``H = Σ xᵀx`` entry ``(i, k)`` by at most ``ε·g_i·g_k``, with
    ``g_i = sqrt(H_ii + λ)`` (λ SparseGPT's dampening), and in Wanda's ``Σ x²`` by ``ε·Σ x²``.

    Each run's sum of ``n`` products is off by at most ``γ_n·Σ|x_i x_k| ≤ γ_n·g_i·g_k``
    (Cauchy-Schwarz), ``γ_n = n·u / (1 - n·u)``; SparseGPT's Cholesky and triangular inverse of
    the ``d x d`` damped ``H`` add backward errors of the same form, ``γ_{d+1}`` each; two runs.
    """
    terms = stats.count + 2 * (stats.num_inputs + 1)
    return 2 * terms * UNIT / (1 - terms * UNIT)


def within_rounding(stats, pooled) -> bool:
    """Whether one run's statistics are the other's up to the order of their sums."""
    eps = rounding_bound(pooled)
    if isinstance(pooled, HessianStats):
        g = damped(pooled.xtx.double()).diagonal().sqrt()
        return bool(((stats.xtx.double() - pooled.xtx).abs() <= eps * torch.outer(g, g)).all())
    return bool(((stats.sq_norm.double() - pooled.sq_norm).abs() <= eps * pooled.sq_norm).all())


def damped(hessian):
    """``H + λI`` as ``sparsegpt_prune`` factors it: dead inputs get a unit diagonal first."""
    hessian = hessian + torch.diag((hessian.diagonal() == 0).to(hessian.dtype))
    eye = torch.eye(len(hessian), dtype=hessian.dtype)
    return hessian + 0.01 * hessian.diagonal().mean() * eye


def obs_factor(hessian):
    """The upper factor ``U`` of ``(H + λI)^{-1}`` that SparseGPT sweeps with, in float64 and
    differentiable (``inverse_hessian_factor``: reversed Cholesky, triangular inverse)."""
    lower = torch.linalg.cholesky(damped(hessian).flip(0, 1))
    eye = torch.eye(len(hessian), dtype=hessian.dtype)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


def obs_reached(hessian, row, keep, start):
    """One row's values as SparseGPT's sweep reaches column ``start``: every earlier column
    pruned as ``keep`` says has passed its error ``w_j / U_jj`` on through row ``j`` of ``U``."""
    factor = obs_factor(hessian)
    values = row.double() * (hessian.diagonal() != 0)  # dead inputs' weights are zeroed
    later = torch.arange(len(values))
    for j in range(start):
        if not keep[j]:
            values = values - values[j] / factor[j, j] * torch.where(later > j, factor[j], 0)
    return values


def obs_group_scores(hessian, row, keep, start, m):
    """SparseGPT's N:M saliencies ``(w / U_jj)²`` of one row's group at ``start``."""
    reached = obs_reached(hessian, row, keep, start)[start : start + m]
    return (reached / obs_factor(hessian).diagonal()[start : start + m]) ** 2


def first_order_tolerance(scores, hessian, eps):
    """How far ``scores(H')`` can be from ``scores(H)`` when ``|H' - H| ≤ eps·g gᵀ``
    (``rounding_bound``), to first order: ``Σ_ik |∂score/∂H_ik|·eps·g_i·g_k``."""
    g = damped(hessian).diagonal().sqrt()
    jacobian = torch.autograd.functional.jacobian(scores, hessian)  # (scores, d, d)
    return (jacobian.abs() * (eps * torch.outer(g, g))).sum(dim=(-2, -1))


def uncrossable(scores, tolerance, keep, differs):
    """Rows are selection sets (each keeps its highest scores): the differing entries that no
    change of every score within its tolerance can carry across their set's boundary."""
    infinity = torch.tensor(math.inf, dtype=scores.dtype)
    highest_pruned = torch.where(keep, -infinity, scores + tolerance).amax(dim=1, keepdim=True)
    lowest_kept = torch.where(keep, scores - tolerance, infinity).amin(dim=1, keepdim=True)
    # The mask must rank these scores, up to their tolerance: else they are not the scores it
    # was chosen on, and every flip would look like a tie.
    pruned_floor = torch.where(keep, -infinity, scores - tolerance).amax(dim=1)
    kept_ceiling = torch.where(keep, scores + tolerance, infinity).amin(dim=1)
    assert (pruned_floor <= kept_ceiling).all(), "the mask does not rank these scores"
    crossable = torch.where(
        keep, scores - tolerance <= highest_pruned, scores + tolerance >= lowest_kept
    )
    return differs & ~crossable


def unexplained_flips(pruner, pattern, weight, stats, keep, differs) -> int:
    """How many of the mask entries ``differs`` (where the other run's mask differs from
    ``keep``, chosen on ``stats``) are not near-ties: their scores are further from their
    selection set's boundary than statistics within ``rounding_bound`` can move them.

    The scores are what the pruner ranks. Wanda: ``|W_ij|·sqrt(Σx_j² / n)``, per row
    (unstructured) or group of ``m`` (N:M). SparseGPT unstructured: ``W_ij² / U_jj²`` of the
    dense weight over the whole matrix (one block of 128 columns). SparseGPT N:M: per group, on
    the values the sweep reaches; a flip changes the rest of its row, so only each row's first
    differing group is a near-tie to check (the weights of rows with a flip are not compared).
    """
    if not differs.any():
        return 0
    eps, keep, differs = rounding_bound(stats), keep.cpu(), differs.cpu()
    m = 0 if pattern == "unstructured" else int(pattern.split(":")[1])
    if pruner == "wanda":  # a relative error ε of Σx², halved by the root
        scores = weight.abs().double() * (stats.sq_norm.double() / stats.count).sqrt()
        shape = (weight.shape[0], -1) if m == 0 else (-1, m)  # rows, or groups of m
        sets = (scores, eps * scores, keep, differs)
        return int(uncrossable(*(t.reshape(shape) for t in sets)).sum())
    hessian = stats.xtx.double()
    if m == 0:
        assert weight.shape[1] <= 128  # one block: its scores are the dense weight's
        squares = (weight.double() * (hessian.diagonal() != 0)).square()

        def per_column(h):
            return obs_factor(h).diagonal() ** -2

        tolerance = squares * first_order_tolerance(per_column, hessian, eps)
        sets = (squares * per_column(hessian), tolerance, keep, differs)
        return int(uncrossable(*(t.reshape(1, -1) for t in sets)).sum())
    unexplained = 0
    for r in differs.any(dim=1).nonzero().flatten().tolist():
        start = int(differs[r].nonzero()[0]) // m * m  # the row's first differing group
        group = slice(start, start + m)

        def scores(h, row=weight[r], row_keep=keep[r], start=start):
            return obs_group_scores(h, row, row_keep, start, m)

        tolerance = first_order_tolerance(scores, hessian, eps)
        sets = (scores(hessian), tolerance, keep[r, group], differs[r, group])
        unexplained += int(uncrossable(*(t[None] for t in sets)).sum())
    return unexplained


def record_pruning(monkeypatch, name, replay=None) -> list:
    """Record every ``prune`` call of pruner ``name`` as ``(weight, stats, new weight, mask)``.

    With ``replay`` (an earlier recording), call ``i`` returns that run's result ``i`` instead
    of its own: the model goes on exactly as in that run, so every later matrix is pruned on
    the same inputs and only the order of the sums differs.
    """
    import copy
    import dataclasses

    from llm_pruning.pruners import PRUNERS  # what get_pruner reads

    real = PRUNERS[name]
    calls = []

    def prune(weight, stats, pattern, **given):
        new_weight, keep = real.prune(weight, stats, pattern, **given)
        calls.append((weight.clone(), copy.deepcopy(stats), new_weight.clone(), keep.clone()))
        if replay is None:
            return new_weight, keep
        dense, _, their_weight, their_keep = replay[len(calls) - 1]
        assert torch.equal(weight, dense)  # the same matrix, in the same order
        return their_weight.clone(), their_keep.clone()

    monkeypatch.setitem(PRUNERS, name, dataclasses.replace(real, prune=prune))
    return calls


@pytest.mark.parametrize(
    ("model", "pruner", "pattern", "sparsity"),
    [
        ("tiny-llama", "sparsegpt", "unstructured", 0.5),
        ("tiny-llama", "wanda", "2:4", 0.5),
        ("tiny-llama", "sparsegpt", "4:8", 0.5),
        ("tiny-llama", "wanda", "unstructured", 0.6),
        ("tiny-opt", "sparsegpt", "unstructured", 0.6),
    ],
)
def test_exact_with_three_clients_is_centralized_on_their_pooled_shards(
    tmp_path, monkeypatch, model, pruner, pattern, sparsity
):
    config = make_config(tmp_path, model=model, pruner=pruner, pattern=pattern, sparsity=sparsity)
    exact = record_pruning(monkeypatch, pruner)
    strategy, grid = run_exact(config, run_id=101)
    assert not strategy.remaining and strategy.contributors == {r: [1, 2, 3] for r in (1, 2, 3, 4)}
    # The centralized pruner on the pooled shards, matrix by matrix, each on the model exact had
    # pruned so far (it goes on with exact's result). End to end, one near-tie flip would change
    # every later layer's inputs by more than rounding, and no bound would hold.
    monkeypatch.undo()  # the real pruner again, to be wrapped anew
    central = record_pruning(monkeypatch, pruner, replay=exact)
    assert compare(strategy.model, centralized(config, grid)) == (0, 0.0)
    pruned = strategy.model
    matrices = sum(len(prunable_weights(pruned, layer)) for layer in range(num_layers(pruned)))
    assert len(exact) == len(central) == matrices
    worst = 0.0
    for (dense, summed, weight, keep), (_, pooled_stats, central_weight, central_keep) in zip(
        exact, central, strict=True
    ):
        # The sums run in another order (per client, then across clients): the statistics are
        # the pooled shards' up to float32 summation error...
        assert summed.count == pooled_stats.count and within_rounding(summed, pooled_stats)
        # ...so a mask entry may differ only where its score is within that error of a tie.
        differs = keep != central_keep
        assert unexplained_flips(pruner, pattern, dense, pooled_stats, central_keep, differs) == 0
        # Wanda keeps values untouched (identical); SparseGPT's updates differ by rounding only.
        # SparseGPT and Wanda treat the rows of a matrix independently: a flip moves only its row.
        rows = ~differs.any(dim=1)
        if rows.any():
            worst = max(worst, float((weight[rows] - central_weight[rows]).abs().max()))
    assert worst < 1e-5
    # Control: the tolerance is tight. Leaving one client's shard out changes the model.
    monkeypatch.undo()  # the real pruner again
    flips_without, worst_without = compare(strategy.model, centralized(config, grid, {1, 2}))
    assert flips_without > 100 or worst_without > 1e-3


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_the_near_tie_check_excuses_rounding_and_nothing_more(pattern):
    """``unexplained_flips`` on a matrix SparseGPT prunes: its scores rank as the pruner's do, a
    flip between two scores a millionth apart is a near-tie, a swap across the ranking is not."""
    from llm_pruning.pruners import SparsityPattern, sparsegpt_prune

    generator = torch.Generator().manual_seed(0)
    stats = HessianStats(16)  # correlated inputs: the error propagation matters
    stats.add(torch.randn(256, 16, generator=generator) @ torch.randn(16, 16, generator=generator))
    weight = torch.randn(8, 16, generator=generator)
    rule = SparsityPattern.parse(pattern, 0.5)
    hessian = stats.xtx.double()
    diagonal = obs_factor(hessian).diagonal()
    # One set of scores the pruner ranks: the whole matrix's, or those of row 1's second group
    # on the values the sweep reaches after pruning its first group.
    if pattern == "unstructured":
        entries = [(r, c) for r in range(8) for c in range(16)]
    else:
        entries = [(1, c) for c in range(4, 8)]
    columns = torch.tensor([c for _, c in entries])

    def scored():
        _, keep = sparsegpt_prune(weight, stats, rule)
        if pattern == "unstructured":
            values = weight.double().flatten()
        else:
            values = obs_reached(hessian, weight[1], keep[1], 4)[4:8]
        kept = torch.tensor([bool(keep[entry]) for entry in entries])
        return keep, values, (values / diagonal[columns]) ** 2, kept

    def unexplained(keep, *swapped):
        differs = torch.zeros_like(keep)
        for i in swapped:
            differs[entries[i]] = True
        return unexplained_flips("sparsegpt", pattern, weight, stats, keep, differs)

    keep, values, scores, kept = scored()
    # These are the pruner's scores: its mask keeps the highest of every set.
    if pattern == "unstructured":
        sets = [(scores, kept)]
    else:
        sets = [
            (obs_group_scores(hessian, weight[r], keep[r], start, 4), keep[r, start : start + 4])
            for r in range(8)
            for start in range(0, 16, 4)
        ]
    for set_scores, set_kept in sets:
        assert set_kept[set_scores.argsort(descending=True)[: int(set_kept.sum())]].all()
    order = scores.argsort().tolist()
    pruned_order, kept_order = [i for i in order if not kept[i]], [i for i in order if kept[i]]
    # A near-tie: the lowest kept score set to a millionth above the highest pruned one.
    a, b = kept_order[0], pruned_order[-1]
    target = values[b].abs() * diagonal[columns[a]] / diagonal[columns[b]] * (1 + 1e-6)
    weight[entries[a]] += float(torch.copysign(target, values[a]) - values[a])
    keep, values, scores, kept = scored()
    assert (scores[a] / scores[b] - 1).abs() < 1e-5
    # With the tie too, the pruner's mask is these scores' ranking, up to the tie.
    ranked = torch.zeros_like(kept)
    ranked[scores.argsort(descending=True)[: int(kept.sum())]] = True
    assert unexplained(keep, *(ranked != kept).nonzero().flatten().tolist()) == 0
    assert unexplained(keep, a, b) == 0  # a flip of the tie: rounding can do that
    # Swapping the lowest pruned with the highest kept score: the highest is no tie.
    assert unexplained(keep, pruned_order[0], kept_order[-1]) > 0


def test_messages_carry_the_previous_pruned_layers_and_state_lives_on_disk(tmp_path):
    config = make_config(tmp_path)
    on_disk = []

    def look(node, reply):  # runs after the client handled the round's message
        if node == 1:
            node_config = NodeConfig.from_mapping(grid_ref[0].contexts[1].node_config)
            on_disk.append((state_dir(node_config, 102) / STATE_FILE).is_file())
        return reply

    grid_ref = []
    grid = InProcessGrid.simulation(client_app, 2, {}, run_id=102, reply_filter=look)
    grid_ref.append(grid)
    model, _ = load_model(config.model)
    strategy = Exact(model, config, node_names=node_names(grid))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)
    to_node_1 = [m for m in grid.sent if m.metadata.dst_node_id == 1]
    assert [m.metadata.message_type for m in to_node_1] == [EXACT_MESSAGE_TYPE] * 4
    assert [m.content.config_records[SPEC_KEY]["layers"] for m in to_node_1] == [[0], [1], [2], [3]]
    previous = [list(m.content.config_records[EXACT_KEY]["previous-layers"]) for m in to_node_1]
    assert previous == [[], [0], [1], [2]]
    assert PREVIOUS_KEY not in to_node_1[0].content.array_records
    # Round 2 hands down layer 0 exactly as the server pruned it: values and masks.
    data = to_node_1[1].content.array_records[PREVIOUS_KEY][PREVIOUS_KEY].numpy().tobytes()
    tensors, masks = decode(data)
    params = dict(strategy.model.named_parameters())
    assert set(masks) == set(prunable_weights(strategy.model, 0))
    for name, keep in masks.items():
        assert torch.equal(tensors[name], params[name].data)
        assert torch.equal(keep, params[name].data != 0)
    # Activations persist between rounds on disk and are removed after the last one.
    assert on_disk == [True, True, True, False]
    assert not state_dir(NodeConfig.from_mapping(grid.contexts[1].node_config), 102).parent.exists()


def test_bytes_up_are_the_upper_triangles_of_the_shared_hessians(tmp_path):
    config = make_config(tmp_path)
    model, _ = load_model(config.model)
    plan = plan_exact(model, config)
    assert [tuple(g) for g in plan.shared] == LLAMA_GROUPS
    # tiny-llama: d = 64 for q/k/v, o and gate/up; 128 for down: d (d + 1) / 2 x 4 bytes each.
    assert plan.stats_bytes[0] == 3 * (64 * 65 // 2 * 4) + 128 * 129 // 2 * 4
    strategy, _ = run_exact(config, num_nodes=2, run_id=103)
    for node in (1, 2):
        headers = strategy.accounting.bytes_up[node] - plan.stats_total
        assert 0 < headers < 4 * 1500  # one safetensors header (names, JSON) per round
    # Wanda sends Σx² per column instead: d x 4 bytes.
    wanda = plan_exact(model, make_config(tmp_path, pruner="wanda"))
    assert wanda.stats_bytes[0] == 3 * 64 * 4 + 128 * 4
    assert wanda.fedspallm_bytes[0] == sum(
        math.ceil(linear.weight.numel() / 8) for linear in prunable_weights(model, 0).values()
    )


def test_opt_groups_share_only_qkv(tiny_opt):
    model, _ = tiny_opt
    plan = plan_exact(model, RunConfig.from_mapping({**TINY, "model": "tiny-opt"}))
    assert [tuple(g) for g in plan.shared] == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ]


def test_more_layers_per_round_trade_exactness_for_rounds(tmp_path):
    config = make_config(tmp_path, **{"exact-layers-per-round": 2})
    strategy, grid = run_exact(config, run_id=104)
    assert strategy.rounds == 2 and strategy.plan.rounds == ((0, 1), (2, 3))
    central = centralized(config, grid)
    assert compare(strategy.model, central, [0])[1] < 1e-5  # its inputs are the dense model's
    # Layer 1's statistics come from the still-dense layer 0, and every later layer's inputs
    # pass through layer 1: not the centralized model any more.
    for layer in (1, 2, 3):
        flips, worst = compare(strategy.model, central, [layer])
        assert flips > 0 and worst > 1e-3


def test_budget_refuses_the_run_before_any_client_work(tmp_path):
    grid = InProcessGrid.simulation(client_app, 2, {}, run_id=105)
    config = make_config(tmp_path, **{"max-stats-mb": 0.1})  # the run needs 0.22 MiB
    with pytest.raises(ConfigError, match=r"0\.2 MiB .*max-stats-mb=0\.1.*fedspallm"):
        run_federation(grid, config, run_id=105)
    assert all(m.metadata.message_type == "query" for m in grid.sent)
    # One round of all 4 layers is a 0.22 MiB reply: over a 0.2 MiB max-payload-mb.
    config = make_config(tmp_path, **{"exact-layers-per-round": 4, "max-payload-mb": 0.2})
    with pytest.raises(ConfigError, match="exact-layers-per-round"):
        run_federation(grid, config, run_id=105)
    with pytest.raises(ConfigError, match="magnitude"):
        make_config(tmp_path, pruner="magnitude")


def test_run_writes_report_with_costs_and_matches_centralized_perplexity(tmp_path):
    config = make_config(tmp_path, **{"compare-centralized": True, "num-rounds": 1})
    grid = InProcessGrid.simulation(client_app, 2, {}, run_id=106)
    run_dir = run_federation(grid, config, run_id=106)
    report = json.loads((run_dir / "report.json").read_text())
    exact = report["exact"]
    assert exact["rounds"] == 4  # num-rounds=1 is ignored: one round per layer
    assert exact["contributors"] == {str(r): [1, 2] for r in (1, 2, 3, 4)}
    communication = report["communication"]
    assert communication["bytes_up"]["1"] > exact["statistics_bytes_per_client"]
    # Down: layers 0-2 pruned (values + mask) go back; the last layer stays on the server.
    assert communication["bytes_down"]["1"] > 3 * 0.9 * exact["fedspallm_bytes_per_layer"]["0"]
    assert report["clients"]["1"]["metrics"]["rounds"] == 4
    perplexity = report["perplexity"]
    assert perplexity["global"] == pytest.approx(perplexity["centralized"], rel=1e-4)
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)


def test_a_node_that_fails_a_round_is_left_out_of_the_rest(tmp_path):
    def lose_node_2_in_round_2(node, reply):
        return None if node == 2 and reply.metadata.group_id == "2" else reply

    config = make_config(tmp_path)
    strategy, grid = run_exact(config, run_id=107, reply_filter=lose_node_2_in_round_2)
    assert strategy.contributors == {1: [1, 2, 3], 2: [1, 3], 3: [1, 3], 4: [1, 3]}
    assert strategy.accounting.rejected == [
        {"round": 2, "node": 2, "layers": [1], "reason": "no reply in time"}
    ]
    assert max(int(m.metadata.group_id) for m in grid.sent if m.metadata.dst_node_id == 2) == 2
    assert not strategy.remaining


def test_lost_activations_fail_the_node_and_no_reply_at_all_fails_the_run(tmp_path):
    config = make_config(tmp_path)

    def wipe_after_round_1(node, reply):
        if reply.metadata.group_id == "1":
            folder = state_dir(NodeConfig(partition_id=node - 1, num_partitions=2), 108)
            (folder / STATE_FILE).unlink()
        return reply

    with pytest.raises(
        RuntimeError, match=r"no valid statistics for layers \[1\].*has no activations"
    ):
        run_exact(config, num_nodes=2, run_id=108, reply_filter=wipe_after_round_1)


def test_replies_that_lie_about_their_statistics_are_rejected(tmp_path):
    def halve_node_1(node, reply):
        if node == 1 and not reply.has_error():
            data = reply.content.array_records[PAYLOAD_KEY][PAYLOAD_KEY].numpy().tobytes()
            _, entries = decode_statistics(data)
            first = next(iter(entries))  # drop a group: the server must notice
            entries.pop(first)
            forged_data = encode_statistics(entries)
            reply.content[PAYLOAD_KEY] = ArrayRecord(
                {PAYLOAD_KEY: Array(np.frombuffer(forged_data, dtype=np.uint8))}
            )
        return reply

    strategy, _ = run_exact(
        make_config(tmp_path), num_nodes=2, run_id=109, reply_filter=halve_node_1
    )
    assert strategy.accounting.rejected[0]["node"] == 1
    assert "lacks statistics" in strategy.accounting.rejected[0]["reason"]
    assert strategy.contributors[1] == [2] and 1 in strategy.dropped
