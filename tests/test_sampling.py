"""Tests for fedspallm_strategy.sampling: budgets, determinism, coverage, unbiasedness."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedspallm_strategy.merge.sampling import layer_budget, sample_layers, sample_without_repair

# 30 layers; budgets at 30/50/70/100 % of them, keyed by non-contiguous node ids.
UNEQUAL_BUDGETS = {17: 9, 3: 15, 250: 21, 42: 30}


def test_layer_budget_from_fraction() -> None:
    assert layer_budget(30, 1.0, None) == 30
    assert layer_budget(30, 0.5, None) == 15
    assert layer_budget(30, 0.3, None) == 9
    assert layer_budget(5, 0.5, None) == 3  # 2.5 rounds up, not to even
    assert layer_budget(30, 0.01, None) == 1  # at least one layer
    assert layer_budget(1, 0.2, None) == 1


def test_node_budget_wins_over_fraction() -> None:
    assert layer_budget(30, 0.5, 4) == 4
    assert layer_budget(30, 1.0, 1) == 1
    assert layer_budget(30, 0.5, 100) == 30  # a node that can do more does every layer


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01, float("nan"), "0.5", True])
def test_bad_fraction_names_the_key(fraction: object) -> None:
    with pytest.raises(ValueError, match="layer-fraction"):
        layer_budget(30, fraction, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [0, -3, 2.5, "4", True])
def test_bad_node_budget_names_the_key(budget: object) -> None:
    with pytest.raises(ValueError, match="layer-budget"):
        layer_budget(30, 0.5, budget)  # type: ignore[arg-type]


def test_same_seed_same_draw_and_different_seed_differs() -> None:
    first = sample_layers(30, UNEQUAL_BUDGETS, np.random.default_rng(123))
    second = sample_layers(30, UNEQUAL_BUDGETS, np.random.default_rng(123))
    other = sample_layers(30, UNEQUAL_BUDGETS, np.random.default_rng(124))
    assert first == second
    assert first != other


def test_result_does_not_depend_on_mapping_order() -> None:
    reordered = dict(reversed(list(UNEQUAL_BUDGETS.items())))
    assert sample_layers(30, UNEQUAL_BUDGETS, np.random.default_rng(9)) == sample_layers(
        30, reordered, np.random.default_rng(9)
    )


@pytest.mark.parametrize(
    "budgets",
    [UNEQUAL_BUDGETS, {0: 10, 1: 10, 2: 10}, {0: 1, 1: 29}, {5: 8, 6: 8, 7: 8, 8: 8}],
)
def test_budgets_exact_distinct_sorted_and_covering(budgets: dict[int, int]) -> None:
    for seed in range(300):
        draw = sample_layers(30, budgets, np.random.default_rng(seed))
        assert set(draw) == set(budgets)
        for node_id, layers in draw.items():
            assert len(layers) == budgets[node_id]
            assert layers == sorted(set(layers))
            assert all(isinstance(layer, int) and 0 <= layer < 30 for layer in layers)
        assert set().union(*map(set, draw.values())) == set(range(30))


def test_exact_partition_when_budgets_sum_to_layer_count() -> None:
    # sum b_i = L: coverage forces every layer to exactly one client.
    draw = sample_layers(12, {0: 5, 1: 4, 2: 3}, np.random.default_rng(0))
    assert sorted(sum(draw.values(), [])) == list(range(12))


def test_without_repair_can_leave_gaps() -> None:
    # Otherwise the coverage test above would not show that repair does anything.
    gaps = sum(
        len(set(range(30)) - set().union(*map(set, draws.values())))
        for draws in (
            sample_without_repair(30, {0: 9, 1: 9, 2: 15}, np.random.default_rng(seed))
            for seed in range(50)
        )
    )
    assert gaps > 0


def test_total_budget_below_layer_count_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"29.*30 layers.*layer-fraction.*layer-budget"):
        sample_layers(30, {0: 10, 1: 19}, np.random.default_rng(0))


@pytest.mark.parametrize("budgets", [{0: 0, 1: 30}, {0: 31}, {0: 2.0}, {}])
def test_bad_budgets(budgets: dict[int, int]) -> None:
    with pytest.raises(ValueError):
        sample_layers(30, budgets, np.random.default_rng(0))


def _inclusion_frequency(sampler, budgets: dict[int, int], num_seeds: int) -> np.ndarray:
    nodes = sorted(budgets)
    counts = np.zeros((len(nodes), 30))
    for seed in range(num_seeds):
        draw = sampler(30, budgets, np.random.default_rng(seed))
        for row, node_id in enumerate(nodes):
            counts[row, draw[node_id]] += 1
    return counts / num_seeds


@pytest.mark.parametrize("sampler", [sample_without_repair, sample_layers])
def test_inclusion_probability_is_budget_over_layers(sampler) -> None:
    # P(layer l in node i's draw) = b_i / L, before repair and (by label symmetry) after.
    budgets = {0: 9, 1: 9, 2: 15}  # sum 33 of 30: repair runs in most draws
    num_seeds = 2000
    frequency = _inclusion_frequency(sampler, budgets, num_seeds)
    for row, node_id in enumerate(sorted(budgets)):
        p = budgets[node_id] / 30
        sigma = math.sqrt(p * (1 - p) / num_seeds)
        # 4 sigma per cell: 90 cells at 3 sigma would flag one by chance every few seeds.
        assert np.all(np.abs(frequency[row] - p) <= 4 * sigma), (node_id, frequency[row])
