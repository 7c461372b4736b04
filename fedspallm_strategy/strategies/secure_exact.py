"""Strategy ``exact`` under secure aggregation: the server learns only the clients' sums.

``secure-aggregation = true`` runs every layer round of :class:`~fedspallm_strategy.exact.Exact`
through Flower's own SecAgg+ protocol (``SecAggPlusWorkflow`` on the server, the
``secaggplus_mod`` client mod): the clients exchange keys, mask their statistics with pairwise
and private masks, and the server unmasks only the sum. No cryptography is written here:

- :class:`SecureExact` keeps ``Exact``'s plan, messages, pruning and accounting, and replaces
  ``Strategy.start``'s send-and-receive by one SecAgg+ workflow per round;
- the workflow is a legacy one (``LegacyContext``, FitIns/FitRes): :class:`_SecAggRound` is the
  one-round legacy strategy it drives, with the round's ``exact`` request as FitIns;
- the statistics travel as fixed-point digits that Flower's quantiser carries exactly
  (``secure_encoding.py``): with two clients the pruned model is bit-identical to plain exact.

Protocol settings: every client shares its keys with every other (``num_shares`` = all) and a
majority (``K // 2 + 1``) of shares rebuilds a key, so up to ``ceil(K / 2) - 1`` nodes may drop
out of a round; with two nodes none may (the survivor's "sum" would be its own statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

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
from flwr.serverapp.strategy import Result

from fedspallm_strategy.strategies.exact import Exact
from fedspallm_strategy.strategies.grids import GridView
from fedspallm_strategy.wire.protocol import request_to_fitins
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from fedspallm_strategy.wire.secure_encoding import (
    MODULUS,
    masked_bytes,
    quantization_range,
    statistics_from_secure_sum,
    vector_lengths,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------- what the workflow drives


class _SecAggRound(LegacyStrategy):
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


class _ErrorLog(GridView):
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


# ---------------------------------------------------------------------------- the strategy


class SecureExact(Exact):
    """:class:`Exact` whose rounds go through SecAgg+: the server sees sums, never one client's.

    Same parameters as :class:`Exact`; the run config must set ``secure-aggregation`` (and may
    set ``secure-clipping-range``).
    """

    def summary(self) -> None:
        super().summary()
        log.info(
            "exact: secure aggregation (SecAgg+), clipping range %g, masked upload %.1f MiB "
            "per client in all",
            self.config.secure_clipping_range,
            self.plan.stats_total / 2**20,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 1,
        timeout: float = 3600,
        **_unused,
    ) -> Result:
        """One SecAgg+ workflow per layer round (replaces ``Strategy.start``'s loop)."""
        self.summary()
        for server_round in range(1, num_rounds + 1):
            messages = list(
                self.configure_train(server_round, initial_arrays, ConfigRecord(), grid)
            )
            if not messages:
                break
            nodes = [message.metadata.dst_node_id for message in messages]
            if len(nodes) < 2:
                raise RuntimeError(
                    f"secure-aggregation: only node {nodes} is left for round {server_round}; "
                    "the sum of one client's statistics would be its statistics, so the run stops"
                )
            quantization = quantization_range(len(nodes))
            secure = {
                "clipping-range": self.config.secure_clipping_range,
                "quantization-range": quantization,
                "tokens": self.tokens,
            }
            adapter = _SecAggRound(
                {m.metadata.dst_node_id: request_to_fitins(m.content, secure) for m in messages},
                grid,
            )
            workflow = SecAggPlusWorkflow(
                num_shares=1.0,  # every client holds a share of every other's keys
                reconstruction_threshold=len(nodes) // 2 + 1,  # a majority rebuilds a key
                max_weight=1.0,  # every client weighs 1: the digits stay on the grid
                clipping_range=self.config.secure_clipping_range,
                quantization_range=quantization,
                modulus_range=MODULUS,
                timeout=timeout,
            )
            logged = _ErrorLog(grid)
            workflow(logged, _legacy_context(grid, adapter, server_round))
            self._aggregate_secure(server_round, adapter, quantization, logged.errors)
        return Result()

    @property
    def tokens(self) -> int:
        """Token rows of every client's statistics: ``calib-samples × seqlen``, public."""
        return self.config.calib_samples * self.config.seqlen

    def _aggregate_secure(
        self,
        server_round: int,
        adapter: _SecAggRound,
        quantization: int,
        errors: Mapping[int, str],
    ):
        layers = next(iter(self.assignments.values()))
        expected = self._expected(layers)
        accepted = sorted(adapter.contributors, key=lambda n: (self._name(n), n))
        for node in sorted(set(self.assignments) - set(accepted)):
            reason = f"client error: {errors[node]}" if node in errors else "no reply in time"
            self.accounting.reject(server_round, node, layers, f"secure aggregation: {reason}")
        if adapter.mean is None:
            reasons = "; ".join(f"node {node}: {reason}" for node, reason in sorted(errors.items()))
            raise RuntimeError(
                f"exact: secure aggregation of layers {layers} halted in round {server_round}: "
                f"fewer than a majority of the {len(self.assignments)} nodes completed its "
                f"stages, so no later layer can be pruned; {reasons or 'no node replied in time'}"
            )
        try:
            entries = statistics_from_secure_sum(
                adapter.mean,
                expected=expected,
                kind=self.plan.kind,
                clients=len(accepted),
                count=self.tokens,
                clip=self.config.secure_clipping_range,
                q=quantization,
            )
        except (ValueError, PayloadError) as error:
            raise RuntimeError(
                f"exact: the secure sum of layers {layers} is invalid: {error}"
            ) from error
        inputs = [expected[name][0] for name in sorted(expected)]
        upload = masked_bytes(vector_lengths(self.plan.kind, inputs))
        for node in accepted:
            self.accounting.add_up(node, upload)
            self.accounting.add_metrics(node, adapter.metrics.get(node, {}))
        sums = {name: stats for name, (stats, _covers) in entries.items()}
        self._finish_round(server_round, layers, sums, accepted)


def _legacy_context(grid: Grid, strategy: _SecAggRound, server_round: int) -> LegacyContext:
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
