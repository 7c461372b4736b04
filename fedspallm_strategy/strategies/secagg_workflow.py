"""One round of Flower's SecAgg+ protocol, driven from a Message-API strategy.

``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (client) do the cryptography: the
clients exchange keys, mask their vectors with pairwise and private masks, and the server
unmasks only their mean. No cryptography is written here. The workflow is a legacy one
(``LegacyContext``, FitIns/FitRes): :class:`SecAggRound` is the one-round legacy strategy it
drives, with each node's request as its FitIns, and :func:`run_secure_round` runs one.
``secure_exact.py`` runs one per layer round of ``exact``, ``secure_recovery.py`` one per
recovery round.

Protocol settings: every client shares its keys with every other (``num_shares`` = all) and a
majority (``K // 2 + 1``) of shares rebuilds a key, so up to ``ceil(K / 2) - 1`` nodes may drop
out of a round; with two nodes none may (the survivor's "sum" would be its own vector). Every
client weighs 1 (``max_weight`` 1, ``num_examples`` 1): the result is the plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedspallm_strategy.strategies.grids import GridView
from fedspallm_strategy.wire.secure_encoding import MODULUS


@dataclass
class SecureRound:
    """What one SecAgg+ round gave the server.

    Attributes
    ----------
    mean
        The unmasked mean of the contributors' vectors, or None if too few completed.
    contributors
        The nodes whose masked vectors are in the mean.
    metrics
        Each contributor's FitRes metrics (sent in the clear).
    errors
        Each node that replied with an error: its reason (the workflow drops those replies).
    """

    mean: list[np.ndarray] | None
    contributors: list[int]
    metrics: dict[int, dict]
    errors: dict[int, str]


def run_secure_round(
    grid: Grid,
    instructions: Mapping[int, FitIns],
    server_round: int,
    *,
    clipping_range: float,
    quantization_range: int,
    timeout: float,
) -> SecureRound:
    """Send each node its FitIns through one SecAgg+ workflow; the mean of their replies."""
    adapter = SecAggRound(instructions, grid)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every client holds a share of every other's keys
        reconstruction_threshold=len(instructions) // 2 + 1,  # a majority rebuilds a key
        max_weight=1.0,  # every client weighs 1: a value on the grid stays on it
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=MODULUS,
        timeout=timeout,
    )
    logged = ErrorLog(grid)
    workflow(logged, legacy_context(grid, adapter, server_round))
    return SecureRound(adapter.mean, adapter.contributors, adapter.metrics, logged.errors)


class SecAggRound(LegacyStrategy):
    """The legacy strategy ``SecAggPlusWorkflow`` calls: one round, fixed instructions.

    ``aggregate_fit`` receives the unmasked mean only (the workflow writes it into every
    result in place of the clients' parameters) and keeps it.
    """

    def __init__(self, instructions: Mapping[int, FitIns], grid: Grid):
        self.instructions = dict(instructions)
        self.proxies = {node: GridClientProxy(node, grid, grid.run.run_id) for node in instructions}
        self.mean: list[np.ndarray] | None = None
        self.contributors: list[int] = []
        self.metrics: dict[int, dict] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        return [(self.proxies[node], fitins) for node, fitins in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.contributors = [proxy.node_id for proxy, _ in results]
        self.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class ErrorLog(GridView):
    """``grid`` as it is, remembering the clients' error replies (the workflow drops them)."""

    def __init__(self, grid: Grid):
        super().__init__(grid)
        self.errors: dict[int, str] = {}

    def pull_messages(self, message_ids):
        return self._note(self.grid.pull_messages(message_ids))

    def send_and_receive(self, messages, *, timeout=None):
        return self._note(self.grid.send_and_receive(messages, timeout=timeout))

    def _note(self, replies):
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                self.errors[reply.metadata.src_node_id] = reply.error.reason
        return replies


def legacy_context(grid: Grid, strategy: SecAggRound, server_round: int) -> LegacyContext:
    """The context ``SecAggPlusWorkflow`` reads: the round number and (empty) parameters."""
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={})
    manager = SimpleClientManager()
    for proxy in strategy.proxies.values():
        manager.register(proxy)
    return LegacyContext(context, strategy=strategy, client_manager=manager)
