"""Tests for llm_pruning.pruners: patterns, exact counts, masks, statistics, the three pruners."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from llm_pruning.pruners import (
    PRUNERS,
    ColumnNormStats,
    HessianStats,
    Pruner,
    SparsityPattern,
    get_pruner,
    num_to_prune,
)
from llm_pruning.pruners import sparsegpt as sparsegpt_module
from llm_pruning.pruners.masks import lowest_k_mask, nm_group_pruned, nm_keep_mask, prune_counts
from llm_pruning.pruners.panel_kernel import panel_sweep
from llm_pruning.pruners.sparsegpt import inverse_hessian_factor, sparsegpt_prune

SHAPES = [(37, 130), (64, 256)]
SPARSITIES = [0.0, 0.3, 0.5, 0.7]
NAMES = ["magnitude", "sparsegpt", "wanda"]


def make_stats(name: str, inputs: torch.Tensor) -> HessianStats | ColumnNormStats | None:
    """Statistics for pruner ``name`` built through its own factory."""
    pruner = get_pruner(name)
    if pruner.make_stats is None:
        return None
    stats = pruner.make_stats(inputs.shape[-1], torch.device("cpu"))
    stats.add(inputs)
    return stats


def correlated_inputs(rows: int, cols: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Low-rank-plus-noise inputs with unequal column scales, like real activations."""
    latent = torch.randn(rows, rank, generator=generator)  # (rows, rank)
    mixing = torch.randn(rank, cols, generator=generator)  # (rank, cols)
    noise = 0.1 * torch.randn(rows, cols, generator=generator)
    scales = torch.exp(torch.randn(cols, generator=generator))  # (cols,)
    return (latent @ mixing + noise) * scales


def assert_valid_nm(keep_mask: torch.Tensor, n: int, m: int) -> None:
    groups = keep_mask.reshape(keep_mask.shape[0], -1, m)
    assert bool((groups.sum(dim=-1) == n).all())


# --- SparsityPattern -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "sparsity", "expected", "text"),
    [
        ("unstructured", 0.5, SparsityPattern(0.5), "unstructured 50%"),
        ("unstructured", 0.0, SparsityPattern(0.0), "unstructured 0%"),
        (" Unstructured ", 0.7, SparsityPattern(0.7), "unstructured 70%"),
        ("2:4", 0.5, SparsityPattern(0.5, 2, 4), "2:4"),
        ("4:8", 0.5, SparsityPattern(0.5, 4, 8), "4:8"),
        ("1:4", 0.75, SparsityPattern(0.75, 1, 4), "1:4"),
        ("3:8", 0.625, SparsityPattern(0.625, 3, 8), "3:8"),
    ],
)
def test_parse_valid(pattern: str, sparsity: float, expected: SparsityPattern, text: str) -> None:
    parsed = SparsityPattern.parse(pattern, sparsity)
    assert parsed == expected
    assert str(parsed) == text
    assert parsed.is_nm == (expected.m > 0)


@pytest.mark.parametrize(
    ("pattern", "sparsity", "keys"),
    [
        ("unstructured", 1.2, ["sparsity"]),
        ("unstructured", 1.0, ["sparsity"]),
        ("unstructured", -0.1, ["sparsity"]),
        ("unstructured", math.nan, ["sparsity"]),
        ("unstructured", "0.5", ["sparsity"]),
        ("3:2", 0.5, ["pattern", "2:4"]),
        ("2:2", 0.0, ["pattern"]),
        ("0:4", 0.5, ["pattern"]),
        ("x", 0.5, ["pattern", "unstructured"]),
        ("2:4:8", 0.5, ["pattern"]),
        ("", 0.5, ["pattern"]),
        ("2:4", 0.7, ["pattern", "sparsity", "0.5"]),
        ("4:8", 0.3, ["pattern", "sparsity", "0.5"]),
    ],
)
def test_parse_invalid_names_the_key(pattern: str, sparsity: object, keys: list[str]) -> None:
    with pytest.raises(ValueError) as excinfo:
        SparsityPattern.parse(pattern, sparsity)  # type: ignore[arg-type]
    for key in keys:
        assert key in str(excinfo.value)


# --- exact counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numel", "sparsity", "expected"),
    [
        (8, 0.5, 4),
        (10, 0.7, 7),
        (7, 0.3, 3),
        (3, 0.1, 1),
        (10, 0.0, 0),
        (0, 0.5, 0),
        (100, 0.29, 29),  # 28.999999999999996
        (25, 0.28, 7),  # 7.000000000000001 must not round up to 8
    ],
)
def test_num_to_prune(numel: int, sparsity: float, expected: int) -> None:
    assert num_to_prune(numel, sparsity) == expected


@pytest.mark.parametrize(
    ("units", "size", "sparsity", "expected"),
    [
        (4, 10, 0.7, [7, 7, 7, 7]),  # 0.7*10 is exactly 7 per unit, not 8
        (3, 7, 0.3, [3, 2, 2]),  # cumulative ceil of 2.1, 4.2, 6.3 -> 3, 5, 7
        (5, 3, 0.5, [2, 1, 2, 1, 2]),  # cumulative ceil of 1.5, 3, 4.5, 6, 7.5 -> 2, 3, 5, 6, 8
        (3, 4, 0.0, [0, 0, 0]),
        (2, 25, 0.28, [7, 7]),  # 0.28*25 = 7.000000000000001 and 0.28*50 = 14.000000000000002
    ],
)
def test_prune_counts(units: int, size: int, sparsity: float, expected: list[int]) -> None:
    counts = prune_counts(units, size, sparsity)
    assert counts.tolist() == expected
    assert int(counts.sum()) == num_to_prune(units * size, sparsity)


def test_prune_counts_total_and_spread_on_awkward_sizes() -> None:
    for units, size, sparsity in [(37, 130, 0.3), (130, 37, 0.7), (11, 1, 0.5), (64, 256, 0.45)]:
        counts = prune_counts(units, size, sparsity)
        assert int(counts.sum()) == num_to_prune(units * size, sparsity)
        assert float((counts - sparsity * size).abs().max()) < 1.0


# --- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [3, 50, None])  # many ties, some, none
def test_lowest_k_mask_is_a_stable_sorts_first_k(levels) -> None:
    generator = torch.Generator().manual_seed(levels or 0)
    score = torch.rand(37, 29, generator=generator)
    if levels is not None:
        score = (score * levels).floor()  # only `levels` distinct values: ties everywhere
    score[0, :3] = -0.0  # signed zeros are ties of 0.0 too
    for k in (0, 1, 5, 500, score.numel() - 1, score.numel()):
        order = torch.sort(score.reshape(-1), stable=True).indices
        expected = torch.ones(score.numel(), dtype=torch.bool)
        expected[order[:k]] = False
        assert torch.equal(lowest_k_mask(score, k), expected.reshape(score.shape)), k


def test_lowest_k_mask_ties_prune_lower_index_first() -> None:
    score = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    # Both zeros go first, then the first of the tied ones (index 0).
    assert lowest_k_mask(score, 3).tolist() == [False, False, True, False, True]
    assert lowest_k_mask(torch.ones(6), 4).tolist() == [False] * 4 + [True] * 2
    # 2-D: ties ordered by flat row-major index.
    matrix = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert lowest_k_mask(matrix, 1).tolist() == [[True, False], [True, True]]
    assert lowest_k_mask(matrix, 3).tolist() == [[False, False], [False, True]]
    assert lowest_k_mask(matrix, 0).all()


def test_lowest_k_mask_deterministic_on_quantised_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (50, 70), generator=generator).float()  # like 4-bit levels
    first = lowest_k_mask(score, 1234)
    assert int((~first).sum()) == 1234
    assert torch.equal(first, lowest_k_mask(score.clone(), 1234))
    # Every pruned score is <= every kept score, and among the boundary level the lower flat
    # indices were pruned.
    flat_keep, flat = first.flatten(), score.flatten()
    assert float(flat[~flat_keep].max()) <= float(flat[flat_keep].min())
    boundary = float(flat[~flat_keep].max())
    at_boundary = (flat == boundary).nonzero().flatten()
    pruned_at_boundary = (~flat_keep)[at_boundary]
    assert torch.equal(pruned_at_boundary, pruned_at_boundary.sort(descending=True).values)


def test_nm_keep_mask_hand_examples() -> None:
    score = torch.tensor([[0.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert nm_keep_mask(score, 2, 4).tolist() == [
        [False, True, True, False, True, True, False, False]
    ]
    assert nm_keep_mask(torch.ones(1, 8), 1, 4).tolist() == [[True, False, False, False] * 2]
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_keep_mask(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_group_pruned_chooses_what_nm_keep_mask_chooses(n: int, m: int) -> None:
    # Few distinct levels, zeros and infinities: ties everywhere, broken by index in both.
    generator = torch.Generator().manual_seed(23)
    score = torch.randint(0, 3, (m, 500), generator=generator).float()
    score[0, :7] = float("inf")
    score[:, 7:9] = 0.0
    assert torch.equal(~nm_group_pruned(score, n), nm_keep_mask(score.t(), n, m).t())
    assert nm_group_pruned(torch.tensor([[0.0], [5.0], [5.0], [1.0]]), 2).flatten().tolist() == [
        True,
        False,
        False,
        True,
    ]


# --- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("stats_cls", [HessianStats, ColumnNormStats])
def test_stats_are_additive(stats_cls: type) -> None:
    generator = torch.Generator().manual_seed(1)
    batch_a = torch.randn(2, 5, 12, generator=generator)  # (batch, seq, d)
    batch_b = torch.randn(3, 4, 12, generator=generator).to(torch.bfloat16)

    sequential = stats_cls(12)
    sequential.add(batch_a)
    sequential.add(batch_b)

    pooled = stats_cls(12)
    pooled.add(torch.cat([batch_a.reshape(-1, 12), batch_b.float().reshape(-1, 12)]))

    client_a, client_b = stats_cls(12), stats_cls(12)
    client_a.add(batch_a)
    client_b.add(batch_b)
    client_a.merge(client_b)

    pooled_rows = torch.cat([batch_a.reshape(-1, 12), batch_b.float().reshape(-1, 12)])
    if stats_cls is HessianStats:
        expected = pooled_rows.double().T @ pooled_rows.double()
        values = [s.xtx for s in (sequential, pooled, client_a)]
    else:
        expected = pooled_rows.double().square().sum(dim=0)
        values = [s.sq_norm for s in (sequential, pooled, client_a)]
    for value in values:
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
    assert sequential.count == pooled.count == client_a.count == 10 + 12


@pytest.mark.parametrize("stats_cls", [HessianStats, ColumnNormStats])
def test_stats_reject_wrong_width(stats_cls: type) -> None:
    stats = stats_cls(8)
    with pytest.raises(ValueError, match="8"):
        stats.add(torch.ones(3, 7))
    with pytest.raises(ValueError, match="9 and 8 inputs"):
        stats.merge(stats_cls(9))
    other_cls = ColumnNormStats if stats_cls is HessianStats else HessianStats
    with pytest.raises(ValueError, match=f"cannot merge {other_cls.__name__}"):
        stats.merge(other_cls(8))  # a Hessian and column norms never add up
    assert stats.count == 0 and not stats.sums.any()  # a rejected merge changes nothing


# --- all pruners: exact sparsity, valid N:M, no in-place change ------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_unstructured_sparsity_is_exact(name: str, shape: tuple[int, int], sparsity: float) -> None:
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(shape, generator=generator)
    original = weight.clone()
    stats = make_stats(name, correlated_inputs(300, shape[1], 8, generator))
    new_weight, keep_mask = get_pruner(name).prune(weight, stats, SparsityPattern(sparsity))

    assert torch.equal(weight, original)  # input untouched
    assert keep_mask.dtype == torch.bool and keep_mask.shape == weight.shape
    assert new_weight.shape == weight.shape and new_weight.dtype == weight.dtype
    assert int((~keep_mask).sum()) == num_to_prune(weight.numel(), sparsity)
    assert bool((new_weight[~keep_mask] == 0).all())
    if not get_pruner(name).updates_weights:
        assert torch.equal(new_weight[keep_mask], weight[keep_mask])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_groups_are_valid(name: str, nm: tuple[int, int]) -> None:
    n, m = nm
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(37, 136, generator=generator)  # 136 columns: a ragged last block
    stats = make_stats(name, correlated_inputs(300, 136, 8, generator))
    pattern = SparsityPattern.parse(f"{n}:{m}", 1 - n / m)
    new_weight, keep_mask = get_pruner(name).prune(weight, stats, pattern)
    assert_valid_nm(keep_mask, n, m)
    assert bool((new_weight[~keep_mask] == 0).all())


def test_nm_rejects_columns_not_multiple_of_m() -> None:
    weight = torch.randn(4, 10)
    for name in NAMES:
        stats = make_stats(name, torch.randn(20, 10))
        with pytest.raises(ValueError, match="multiple"):
            get_pruner(name).prune(weight, stats, SparsityPattern(0.5, 2, 4))
    with pytest.raises(ValueError, match="block_size"):
        sparsegpt_prune(
            torch.randn(4, 16),
            make_stats("sparsegpt", torch.randn(20, 16)),
            SparsityPattern(0.5, 4, 8),
            block_size=12,
        )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip(name: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(24, 64, generator=generator).to(dtype)
    stats = make_stats(name, correlated_inputs(200, 64, 8, generator).to(dtype))
    for pattern in (SparsityPattern(0.5), SparsityPattern(0.5, 2, 4)):
        new_weight, keep_mask = get_pruner(name).prune(weight, stats, pattern)
        assert new_weight.dtype == dtype
        assert int((~keep_mask).sum()) == 24 * 64 // 2
        assert bool((new_weight[~keep_mask] == 0).all())
        if not get_pruner(name).updates_weights:
            assert torch.equal(new_weight[keep_mask], weight[keep_mask])


# --- magnitude and wanda ---------------------------------------------------------------------


def test_magnitude_hand_example() -> None:
    weight = torch.tensor([[0.5, -3.0, 1.0], [-0.2, 2.0, -0.5]])
    new_weight, keep_mask = get_pruner("magnitude").prune(weight, None, SparsityPattern(0.5))
    # ceil(0.5 * 6) = 3 pruned: |-0.2| first, then the two 0.5s (lower flat index first).
    assert keep_mask.tolist() == [[False, True, True], [False, True, False]]
    assert new_weight.tolist() == [[0.0, -3.0, 1.0], [0.0, 2.0, 0.0]]


def test_wanda_follows_activation_weighted_score_not_magnitude() -> None:
    weight = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    stats = ColumnNormStats(4)
    stats.add(torch.tensor([[1.0, 10.0, 100.0, 1000.0]]))  # score |W|*|x| = 4, 30, 200, 1000
    pattern = SparsityPattern(0.5)
    new_weight, keep_mask = get_pruner("wanda").prune(weight, stats, pattern)
    assert keep_mask.tolist() == [[False, False, True, True]]
    assert new_weight.tolist() == [[0.0, 0.0, 2.0, 1.0]]
    _, magnitude_mask = get_pruner("magnitude").prune(weight, None, pattern)
    assert magnitude_mask.tolist() == [[True, True, False, False]]


def test_wanda_compares_within_rows() -> None:
    # Row 1 is tiny everywhere; a global comparison would prune all of it.
    weight = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.1, 0.4, 0.3, 0.2]])
    stats = ColumnNormStats(4)
    stats.add(torch.ones(3, 4))
    _, keep_mask = get_pruner("wanda").prune(weight, stats, SparsityPattern(0.5))
    assert keep_mask.tolist() == [[False, False, True, True], [False, True, True, False]]


# --- sparsegpt -------------------------------------------------------------------------------


def test_sparsegpt_obs_update_hand_example() -> None:
    # X rows [2, 1] and [0, 1] give H = XᵀX = [[4, 2], [2, 2]]. Pruning w1 = 1 (saliency
    # w1² / [H⁻¹]_11 = 1 / 0.5 = 2, versus 9 / 0.5 = 18 for w2) and re-fitting w2 by least squares
    # gives w2' = w2 + w1 · H_12 / H_22 = 3 + 1 = 4.
    stats = HessianStats(2)
    stats.add(torch.tensor([[2.0, 1.0], [0.0, 1.0]]))
    weight = torch.tensor([[1.0, 3.0]])
    new_weight, keep_mask = sparsegpt_prune(weight, stats, SparsityPattern(0.5), damp_fraction=0.0)
    assert keep_mask.tolist() == [[False, True]]
    torch.testing.assert_close(new_weight, torch.tensor([[0.0, 4.0]]))


def test_sparsegpt_changes_kept_values() -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 64, generator=generator)
    stats = make_stats("sparsegpt", correlated_inputs(256, 64, 8, generator))
    new_weight, keep_mask = get_pruner("sparsegpt").prune(weight, stats, SparsityPattern(0.5))
    assert get_pruner("sparsegpt").updates_weights
    assert float((new_weight - weight)[keep_mask].abs().max()) > 1e-2


def test_sparsegpt_zero_sparsity_is_identity() -> None:
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(37, 130, generator=generator)
    stats = make_stats("sparsegpt", correlated_inputs(300, 130, 8, generator))
    new_weight, keep_mask = sparsegpt_prune(weight, stats, SparsityPattern(0.0))
    assert bool(keep_mask.all())
    torch.testing.assert_close(new_weight, weight, rtol=1e-5, atol=1e-5)


def test_sparsegpt_block_shares_are_exact() -> None:
    # 130 columns = a block of 128 and a block of 2; each prunes its cumulative-ceil share.
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(37, 130, generator=generator)
    stats = make_stats("sparsegpt", correlated_inputs(300, 130, 8, generator))
    _, keep_mask = sparsegpt_prune(weight, stats, SparsityPattern(0.3))
    assert int((~keep_mask[:, :128]).sum()) == math.ceil(0.3 * 37 * 128)  # 1420.8 -> 1421
    assert int((~keep_mask).sum()) == math.ceil(0.3 * 37 * 130)  # 1443


def test_sparsegpt_lazy_updates_match_eager_updates() -> None:
    # For N:M the mask is chosen per group, so the block size only changes when the updates are
    # applied, not their result: block 4 (nearly eager) and 128 (lazy) must agree.
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(16, 256, generator=generator)
    stats = make_stats("sparsegpt", correlated_inputs(512, 256, 32, generator))
    pattern = SparsityPattern(0.5, 2, 4)
    lazy_weight, lazy_mask = sparsegpt_prune(weight, stats, pattern, block_size=128)
    eager_weight, eager_mask = sparsegpt_prune(weight, stats, pattern, block_size=4)
    assert torch.equal(lazy_mask, eager_mask)
    torch.testing.assert_close(lazy_weight, eager_weight, rtol=1e-4, atol=1e-4)


def test_sparsegpt_dead_inputs() -> None:
    generator = torch.Generator().manual_seed(9)
    inputs = correlated_inputs(300, 130, 8, generator)
    inputs[:, [3, 77, 129]] = 0.0
    weight = torch.randn(37, 130, generator=generator)
    stats = make_stats("sparsegpt", inputs)
    new_weight, keep_mask = sparsegpt_prune(weight, stats, SparsityPattern(0.3))
    assert bool(torch.isfinite(new_weight).all())
    assert int((~keep_mask).sum()) == num_to_prune(weight.numel(), 0.3)
    assert bool((new_weight[:, [3, 77, 129]] == 0).all())
    assert bool((new_weight[~keep_mask] == 0).all())


def test_sparsegpt_dead_inputs_need_no_dampening(caplog: pytest.LogCaptureFixture) -> None:
    # Without dampening only the unit diagonal given to dead inputs keeps H invertible.
    generator = torch.Generator().manual_seed(14)
    inputs = torch.randn(200, 16, generator=generator)
    inputs[:, 4] = 0.0
    weight = torch.randn(8, 16, generator=generator)
    with caplog.at_level(logging.WARNING, logger="llm_pruning.pruners.sparsegpt"):
        new_weight, keep_mask = sparsegpt_prune(
            weight, make_stats("sparsegpt", inputs), SparsityPattern(0.5), damp_fraction=0.0
        )
    assert not caplog.records
    assert bool(torch.isfinite(new_weight).all()) and int((~keep_mask).sum()) == 64


def _check_fallback_result(weight: torch.Tensor, stats: HessianStats) -> None:
    for pattern in (SparsityPattern(0.5), SparsityPattern(0.5, 2, 4)):
        new_weight, keep_mask = sparsegpt_prune(weight, stats, pattern)
        assert bool(torch.isfinite(new_weight).all())
        assert int((~keep_mask).sum()) == num_to_prune(weight.numel(), 0.5)
        assert bool((new_weight[~keep_mask] == 0).all())


def test_sparsegpt_negative_definite_hessian_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    stats = HessianStats(32)
    stats.xtx = -torch.eye(32)  # no amount of relative dampening makes this positive definite
    stats.count = 10
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(10))
    with caplog.at_level(logging.WARNING, logger="llm_pruning.pruners.sparsegpt"):
        _check_fallback_result(weight, stats)
    assert any("falling back" in record.getMessage() for record in caplog.records)
    # The fallback here is magnitude pruning: the mask is the magnitude mask.
    _, keep_mask = sparsegpt_prune(weight, stats, SparsityPattern(0.5, 2, 4))
    _, magnitude_mask = get_pruner("magnitude").prune(weight, None, SparsityPattern(0.5, 2, 4))
    assert torch.equal(keep_mask, magnitude_mask)


def test_sparsegpt_indefinite_hessian_retries_dampening(caplog: pytest.LogCaptureFixture) -> None:
    generator = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator))
    eigenvalues = torch.ones(32)
    eigenvalues[0] = -5.0  # mean diagonal 0.8125 > 0: dampening 1000x larger fixes it
    stats = HessianStats(32)
    stats.xtx = basis @ torch.diag(eigenvalues) @ basis.T
    stats.count = 10
    weight = torch.randn(8, 32, generator=generator)
    with caplog.at_level(logging.WARNING, logger="llm_pruning.pruners.sparsegpt"):
        _check_fallback_result(weight, stats)
    messages = [record.getMessage() for record in caplog.records]
    assert any("retries" in message for message in messages)
    assert not any("falling back" in message for message in messages)


def test_sparsegpt_non_finite_hessian_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    stats = HessianStats(16)
    stats.add(torch.randn(40, 16, generator=torch.Generator().manual_seed(12)))
    stats.xtx[2, 5] = float("nan")
    with caplog.at_level(logging.WARNING, logger="llm_pruning.pruners.sparsegpt"):
        _check_fallback_result(torch.randn(8, 16), stats)
    assert any("falling back" in record.getMessage() for record in caplog.records)


def test_pruners_require_stats() -> None:
    for name in ("sparsegpt", "wanda"):
        with pytest.raises(ValueError, match="statistics"):
            get_pruner(name).prune(torch.randn(4, 8), None, SparsityPattern(0.5))
        with pytest.raises(ValueError, match="columns"):
            get_pruner(name).prune(
                torch.randn(4, 8), make_stats(name, torch.randn(5, 6)), SparsityPattern(0.5)
            )


# --- reconstruction quality ------------------------------------------------------------------


def reconstruction_errors(pattern: SparsityPattern) -> dict[str, float]:
    """Relative ``||(W - Ŵ) Xᵀ||`` of each pruner on correlated calibration inputs."""
    generator = torch.Generator().manual_seed(13)
    inputs = correlated_inputs(512, 128, 16, generator)  # (512, 128)
    weight = torch.randn(64, 128, generator=generator)  # (64, 128)
    reference = torch.linalg.norm(weight @ inputs.T)
    errors = {}
    for name in NAMES:
        new_weight, _ = get_pruner(name).prune(weight, make_stats(name, inputs), pattern)
        errors[name] = float(torch.linalg.norm((weight - new_weight) @ inputs.T) / reference)
    return errors


@pytest.mark.parametrize(
    "pattern", [SparsityPattern(0.5), SparsityPattern(0.5, 2, 4)], ids=["unstructured", "2:4"]
)
def test_reconstruction_error_ordering(pattern: SparsityPattern) -> None:
    errors = reconstruction_errors(pattern)
    logging.getLogger(__name__).info("reconstruction errors %s: %s", pattern, errors)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"]


# --- registry --------------------------------------------------------------------------------


def test_registry() -> None:
    assert sorted(PRUNERS) == NAMES
    for name in NAMES:
        pruner = get_pruner(name)
        assert isinstance(pruner, Pruner) and pruner.name == name
    assert get_pruner("sparsegpt").updates_weights
    assert not get_pruner("wanda").updates_weights and not get_pruner("magnitude").updates_weights
    assert get_pruner("magnitude").make_stats is None
    assert isinstance(get_pruner("sparsegpt").make_stats(8, torch.device("cpu")), HessianStats)
    assert isinstance(get_pruner("wanda").make_stats(8, torch.device("cpu")), ColumnNormStats)


def test_get_pruner_unknown_lists_names() -> None:
    with pytest.raises(
        ValueError, match="unknown pruner 'nope'; choose one of: magnitude, sparsegpt, wanda"
    ):
        get_pruner("nope")


# --- the fast sweep against Algorithm 1 as written ---------------------------------------------


def column_by_column_sparsegpt(
    weight: torch.Tensor, xtx: torch.Tensor, pattern: SparsityPattern, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's Algorithm 1 without any of the speed-ups, in float64: the reference's factor
    (Cholesky, inverse, Cholesky of the inverse), each column's error applied at once to every
    later column of the matrix, masks chosen as ``sparsegpt_prune`` defines them (per block of
    128 at its start for unstructured, per group of ``m`` when reached for N:M)."""
    w = weight.double().clone()
    rows, cols = w.shape
    hessian = xtx.double().clone()
    hessian.diagonal().add_(0.01 * hessian.diagonal().mean())
    upper = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True
    )
    counts = prune_counts(cols, rows, pattern.sparsity)
    chosen = torch.ones(rows, cols, dtype=torch.bool) if keep is None else keep.clone()
    for j in range(cols):
        if keep is None and not pattern.is_nm and j % 128 == 0:
            block = slice(j, min(j + 128, cols))
            saliency = w[:, block].square() / upper.diagonal()[block].square()
            chosen[:, block] = lowest_k_mask(saliency, int(counts[block].sum()))
        if keep is None and pattern.is_nm and j % pattern.m == 0:
            group = slice(j, j + pattern.m)
            saliency = w[:, group].square() / upper.diagonal()[group].square()
            chosen[:, group] = nm_keep_mask(saliency, pattern.n, pattern.m)
        err = w[:, j] * ~chosen[:, j] / upper[j, j]  # (rows,)
        w[:, j:] -= torch.outer(err, upper[j, j:])
    return w.masked_fill(~chosen, 0.0).float(), chosen


@pytest.mark.parametrize(
    "pattern", [SparsityPattern(0.5), SparsityPattern(0.6), SparsityPattern(0.5, 2, 4)]
)
@pytest.mark.parametrize("given_mask", [False, True])
@pytest.mark.parametrize("panel", ["numba", "torch"])
def test_fast_sweep_equals_column_by_column_sweep(
    pattern: SparsityPattern, given_mask: bool, panel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if panel == "torch":  # the path of CUDA tensors, and of a CPU without numba
        monkeypatch.setattr(sparsegpt_module, "panel_sweep", lambda: None)
    # 300 columns: two full blocks of 128 (eight panels each) and a ragged one of 44.
    generator = torch.Generator().manual_seed(21)
    weight = torch.randn(24, 300, generator=generator)
    stats = make_stats("sparsegpt", correlated_inputs(1200, 300, 40, generator))
    keep = torch.rand(24, 300, generator=generator) > pattern.sparsity if given_mask else None
    expected_weight, expected_mask = column_by_column_sparsegpt(weight, stats.xtx, pattern, keep)
    new_weight, keep_mask = sparsegpt_prune(weight, stats, pattern, keep_mask=keep)
    assert torch.equal(keep_mask, expected_mask)
    # Float32 against float64: within 2e-5 of the largest weight here (the one-column-at-a-time
    # float32 sweep this replaced was within 5e-5).
    scale = float(expected_weight.abs().max())
    torch.testing.assert_close(new_weight, expected_weight, rtol=0.0, atol=5e-5 * scale)


def test_the_compiled_panel_sweep_is_installed() -> None:
    # numba is a dependency: without it the CPU sweep silently takes the slower torch path.
    assert panel_sweep() is not None


@pytest.mark.parametrize("size", [96, 700])  # 700: two slabs of the triangular inverse
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_inverse(size: int) -> None:
    generator = torch.Generator().manual_seed(22)
    xtx = make_stats("sparsegpt", correlated_inputs(3 * size, size, 30, generator)).xtx
    upper = inverse_hessian_factor(xtx, damp_fraction=0.01)
    damped = xtx.double() + 0.01 * xtx.diagonal().mean().double() * torch.eye(
        size, dtype=torch.float64
    )
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # unique such factor
    torch.testing.assert_close(upper.double(), expected, rtol=1e-4, atol=1e-5)
