"""Resource-aware layer sampling with coverage (FedSpaLLM, DESIGN §2).

Each client ``i`` gets a budget ``b_i`` of decoder layers per round (its node config
``layer-budget``, else the run config's ``layer-fraction`` of the ``L`` layers). The
server draws ``b_i`` distinct layers per client, uniformly at random and independently
across clients, from a seeded ``numpy.random.Generator``. Before repair a client
includes any given layer with probability exactly ``b_i / L``.

The independent draws may leave a layer that no client prunes, so the draw is repaired:
while some layer is uncovered, a random (client, layer) pair whose layer is covered by at
least two clients is chosen, and that client swaps the layer for the uncovered one.
Budgets are kept exactly and every layer ends up covered (``sum b_i >= L`` guarantees a
doubly covered layer exists while one is uncovered).

How repair perturbs the probabilities: uncovered layers are visited in random order and
donors chosen uniformly, so the procedure treats every layer label alike. The joint law
of the repaired draw is therefore invariant under relabelling layers, and since each
client still holds exactly ``b_i`` layers its marginal inclusion probability stays
``b_i / L``, the paper's unbiasedness. What repair changes is the dependence *between*
clients: they no longer draw independently (their sets are pushed apart, overlaps traded
for coverage), and every layer is covered with probability 1 instead of
``1 - prod_i (1 - b_i / L)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

logger = logging.getLogger(__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def layer_budget(num_layers: int, layer_fraction: float, node_budget: int | None) -> int:
    """Layers per round for one client.

    Parameters
    ----------
    num_layers
        ``L``, the number of decoder layers.
    layer_fraction
        Run config ``layer-fraction`` in (0, 1]; gives ``max(1, round(f * L))`` with
        halves rounded up.
    node_budget
        The node's ``layer-budget`` node config, or None. When given it wins over the
        fraction; a budget above ``L`` means the node can prune every layer and is
        capped at ``L``.

    Raises
    ------
    ValueError
        Naming ``layer-budget`` or ``layer-fraction`` when it is invalid.
    """
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if node_budget is not None:
        if not _is_int(node_budget) or node_budget < 1:
            raise ValueError(f"layer-budget must be a positive integer, got {node_budget!r}")
        return min(int(node_budget), num_layers)
    if isinstance(layer_fraction, bool) or not isinstance(layer_fraction, int | float):
        raise ValueError(f"layer-fraction must be a number in (0, 1], got {layer_fraction!r}")
    if not 0.0 < layer_fraction <= 1.0:
        raise ValueError(f"layer-fraction must be in (0, 1], got {layer_fraction!r}")
    # floor(x + 0.5), not round(): Python's round() sends 2.5 to 2 (banker's rounding).
    return max(1, int(np.floor(layer_fraction * num_layers + 0.5)))


def _check_budgets(num_layers: int, budgets: Mapping[int, int]) -> None:
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if not budgets:
        raise ValueError("no clients to sample layers for")
    for node_id, budget in budgets.items():
        if not _is_int(budget) or not 1 <= budget <= num_layers:
            raise ValueError(
                f"layer budget of node {node_id} must be an integer in [1, {num_layers}], "
                f"got {budget!r}"
            )


def sample_without_repair(
    num_layers: int, budgets: Mapping[int, int], rng: np.random.Generator
) -> dict[int, list[int]]:
    """Independent uniform draws: ``b_i`` distinct layers per node, no coverage repair.

    Nodes draw in sorted node-id order, so the result is a function of the generator's
    state. Each node includes each layer with probability ``b_i / L``.
    """
    _check_budgets(num_layers, budgets)
    draws: dict[int, list[int]] = {}
    for node_id in sorted(budgets):
        layers = rng.choice(num_layers, size=int(budgets[node_id]), replace=False)
        draws[node_id] = sorted(int(layer) for layer in layers)
    return draws


def _repair_coverage(
    num_layers: int, draws: dict[int, list[int]], rng: np.random.Generator
) -> dict[int, list[int]]:
    """Swap doubly covered layers for uncovered ones until every layer is covered."""
    holders: list[set[int]] = [set() for _ in range(num_layers)]  # layer -> nodes
    for node_id, layers in draws.items():
        for layer in layers:
            holders[layer].add(node_id)
    uncovered = [layer for layer in range(num_layers) if not holders[layer]]
    # Random visiting order keeps the repair blind to layer labels (module docstring).
    for index in rng.permutation(len(uncovered)):
        missing = uncovered[int(index)]
        donors = [
            (node_id, layer)
            for layer in range(num_layers)
            if len(holders[layer]) >= 2
            for node_id in sorted(holders[layer])
        ]
        node_id, layer = donors[int(rng.integers(len(donors)))]
        holders[layer].discard(node_id)
        holders[missing].add(node_id)
        logger.debug("coverage repair: node %s swaps layer %d for %d", node_id, layer, missing)
    repaired: dict[int, list[int]] = {node_id: [] for node_id in draws}
    for layer, nodes in enumerate(holders):
        for node_id in nodes:
            repaired[node_id].append(layer)  # layers ascend, so each list is sorted
    return repaired


def sample_layers(
    num_layers: int, budgets: Mapping[int, int], rng: np.random.Generator
) -> dict[int, list[int]]:
    """Draw each node's layers for a round so that every layer is covered.

    Parameters
    ----------
    num_layers
        ``L``, the number of decoder layers.
    budgets
        Node id -> number of layers ``b_i`` (from :func:`layer_budget`).
    rng
        Seeded generator; the same state gives the same result.

    Returns
    -------
    dict[int, list[int]]
        Node id -> sorted distinct layer ids, exactly ``b_i`` of them; together they
        cover ``range(num_layers)``.

    Raises
    ------
    ValueError
        If a budget is outside ``[1, L]`` or ``sum b_i < L`` (coverage impossible).
    """
    _check_budgets(num_layers, budgets)
    total = sum(int(budget) for budget in budgets.values())
    if total < num_layers:
        raise ValueError(
            f"the clients' total layer budget {total} is below the {num_layers} layers of the "
            "model, so some layer would be pruned by nobody: raise layer-fraction (run config) "
            "or layer-budget (node config), or add clients"
        )
    draws = sample_without_repair(num_layers, budgets, rng)
    return _repair_coverage(num_layers, draws, rng)
