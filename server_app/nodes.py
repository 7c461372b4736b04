"""The nodes a run works with: those that answered the resources query with a valid config."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class HealthyNodes(Grid):
    """``grid`` as it is, except that ``get_node_ids`` lists only ``healthy`` nodes.

    Strategies choose their nodes with ``grid.get_node_ids()`` every round; through this
    wrapper a node left out of the run (its resources query failed, or it connected only
    after the query, so nobody checked it) is never sent a train message.
    """

    def __init__(self, grid: Grid, healthy: Collection[int]):
        self.grid = grid
        self.healthy = frozenset(healthy)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        # Still connected ones only: a healthy node that went away is gone for the strategy too.
        return [node for node in self.grid.get_node_ids() if node in self.healthy]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)
