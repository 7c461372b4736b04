"""The nodes a run works with: those that answered the resources query with a valid config."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from flwr.serverapp import Grid

from fedspallm_strategy.strategies.grids import GridView


class HealthyNodes(GridView):
    """``grid`` as it is, except that ``get_node_ids`` lists only ``healthy`` nodes.

    Strategies choose their nodes with ``grid.get_node_ids()`` every round; through this
    wrapper a node left out of the run (its resources query failed, or it connected only
    after the query, so nobody checked it) is never sent a train message.
    """

    def __init__(self, grid: Grid, healthy: Collection[int]):
        super().__init__(grid)
        self.healthy = frozenset(healthy)

    def get_node_ids(self) -> Iterable[int]:
        # Still connected ones only: a healthy node that went away is gone for the strategy too.
        return [node for node in self.grid.get_node_ids() if node in self.healthy]
