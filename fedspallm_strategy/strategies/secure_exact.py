"""Strategy ``exact`` under secure aggregation: the server learns only the clients' sums.

``secure-aggregation = true`` runs every layer round of :class:`~fedspallm_strategy.exact.Exact`
through Flower's own SecAgg+ protocol (``secagg_workflow.py``): the clients mask their
statistics and the server unmasks only the sum.

- :class:`SecureExact` keeps ``Exact``'s plan, messages, pruning and accounting, and replaces
  ``Strategy.start``'s send-and-receive by one SecAgg+ workflow per round, with the round's
  ``exact`` request as FitIns;
- the statistics travel as fixed-point digits that Flower's quantiser carries exactly
  (``secure_encoding.py``): with two clients the pruned model is bit-identical to plain exact.

Recovery rounds after it go through SecAgg+ too (``secure_recovery.py``).
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedspallm_strategy.strategies.exact import Exact
from fedspallm_strategy.strategies.secagg_workflow import SecureRound, run_secure_round
from fedspallm_strategy.wire.protocol import request_to_fitins
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from fedspallm_strategy.wire.secure_encoding import (
    masked_bytes,
    quantization_range,
    statistics_from_secure_sum,
    vector_lengths,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------- what the workflow drives


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
            secure_round = run_secure_round(
                grid,
                {m.metadata.dst_node_id: request_to_fitins(m.content, secure) for m in messages},
                server_round,
                clipping_range=self.config.secure_clipping_range,
                quantization_range=quantization,
                timeout=timeout,
            )
            self._aggregate_secure(server_round, secure_round, quantization)
        return Result()

    @property
    def tokens(self) -> int:
        """Token rows of every client's statistics: ``calib-samples × seqlen``, public."""
        return self.config.calib_samples * self.config.seqlen

    def _aggregate_secure(
        self,
        server_round: int,
        secure_round: SecureRound,
        quantization: int,
    ):
        layers = next(iter(self.assignments.values()))
        expected = self._expected(layers)
        errors = secure_round.errors
        accepted = sorted(secure_round.contributors, key=lambda n: (self._name(n), n))
        for node in sorted(set(self.assignments) - set(accepted)):
            reason = f"client error: {errors[node]}" if node in errors else "no reply in time"
            self.accounting.reject(server_round, node, layers, f"secure aggregation: {reason}")
        if secure_round.mean is None:
            reasons = "; ".join(f"node {node}: {reason}" for node, reason in sorted(errors.items()))
            raise RuntimeError(
                f"exact: secure aggregation of layers {layers} halted in round {server_round}: "
                f"fewer than a majority of the {len(self.assignments)} nodes completed its "
                f"stages, so no later layer can be pruned; {reasons or 'no node replied in time'}"
            )
        try:
            entries = statistics_from_secure_sum(
                secure_round.mean,
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
            self.accounting.add_metrics(node, secure_round.metrics.get(node, {}))
        sums = {name: stats for name, (stats, _covers) in entries.items()}
        self._finish_round(server_round, layers, sums, accepted)
