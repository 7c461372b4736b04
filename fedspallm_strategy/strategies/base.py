"""What every strategy here shares, over Flower's ``Strategy``.

Flower's ``Strategy.start`` owns the round loop; a strategy only says what each node is
asked to do (``configure_train``) and how the replies become the global model
(``aggregate_train``). :class:`ServerEvaluated` adds what all of ours have in common: models
scored on the server after the rounds, replies taken one at a time (accepted, or rejected
with a reason), and the optional OWL profile round that sets per-layer sparsities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from transformers import PreTrainedModel

from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.run.accounting import Accounting
from fedspallm_strategy.strategies.profile_round import run_profile_round
from fedspallm_strategy.wire.replies import RejectedReply
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.owl import SparsityProfile, profile_patterns
from llm_pruning.pruners import SparsityPattern

if TYPE_CHECKING:
    from fedspallm_strategy.strategies.setup import RunSetup

log = logging.getLogger(__name__)


def reject_reply(
    accounting: Accounting, server_round: int, node: int, layers: list[int], error: Exception
) -> None:
    """Record a reply that will not be aggregated. An error other than the two expected ones
    is a reply nobody foresaw: still only that reply's problem, logged with its traceback."""
    if not isinstance(error, PayloadError | RejectedReply):
        log.error("round %d: unforeseen reply of node %d", server_round, node, exc_info=error)
        error = RejectedReply(f"unreadable reply: {type(error).__name__}: {error}")
    accounting.reject(server_round, node, layers, str(error))


class ServerEvaluated(Strategy):
    """What every strategy here shares: its models are scored on the server after the rounds
    (perplexity), so no evaluate messages go to the clients; and a round's replies are taken
    one at a time (:meth:`accepted`), each accepted or rejected with its reason.

    A subclass sets ``accounting``, and in ``configure_train`` ``assignments`` (node -> its
    layers this round) and ``sent`` (the round's messages).
    """

    accounting: Accounting
    assignments: dict[int, list[int]]
    sent: list[Message]
    model: PreTrainedModel
    config: RunConfig
    compares_to_centralized = True  # compare-centralized prunes a central copy beside it
    # sparsity-profile='owl': the profile, and every matrix's pattern under it (else empty)
    profile: SparsityProfile | None = None
    patterns: Mapping[str, SparsityPattern] = MappingProxyType({})
    profile_kind = "counts"  # what the profile round asks the nodes for (profile_round.py)
    node_names: Mapping[int, str] = MappingProxyType({})

    # ------------------------------------------------------------------- owl
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        **kwargs,
    ):
        """Flower's round loop, after the owl profile round when the run has one."""
        if self.needs_profile_round():
            self.set_profile(run_profile_round(self, grid, timeout))
        return super().start(grid, initial_arrays, num_rounds, timeout, **kwargs)

    def needs_profile_round(self) -> bool:
        return self.config.sparsity_profile == "owl" and self.profile is None

    def set_profile(self, profile: SparsityProfile) -> None:
        """Fix every layer's sparsity (logged; reported by :meth:`report_profile`)."""
        self.profile = profile
        self.patterns = profile_patterns(self.model, profile.sparsities)
        log.info(
            "owl profile: layer sparsities %s (outlier ratios %s)",
            [round(s, 4) for s in profile.sparsities],
            [round(r, 4) for r in profile.ratios],
        )

    def layer_sparsities(self, layers: Iterable[int]) -> dict[int, float] | None:
        """Layer -> sparsity for a train message's spec; None without a profile."""
        if self.profile is None:
            return None
        return {layer: self.profile.sparsities[layer] for layer in layers}

    def pattern_of(self, name: str) -> SparsityPattern:
        """The pattern matrix ``name`` is pruned to: its own under a profile, else the run's."""
        return self.patterns.get(name, self.config.sparsity_pattern)

    def report_profile(self, run: RunSetup) -> None:
        """The report's ``sparsity-profile`` section (owl runs only)."""
        if self.profile is not None:
            run.report["sparsity-profile"] = {
                "profile": "owl",
                "owl-m": self.config.owl_m,
                "owl-lambda": self.config.owl_lambda,
                **self.profile.as_report(),
            }

    # ------------------------------------------------------------- the run's hooks
    @classmethod
    def for_run(cls, run: RunSetup) -> ServerEvaluated:
        """The strategy for ``run`` (``registry.strategy_class`` picks the class)."""
        raise NotImplementedError

    @classmethod
    def resume_refusal(cls, config: RunConfig) -> str | None:
        """Why a run with ``config`` cannot continue from a checkpoint; None if it can."""
        return f"the {config.strategy} strategy keeps no checkpoint to resume from"

    def check_rounds(self, nodes: list[int], budgets: Mapping[int, int | None]) -> None:
        """Refuse, before any work, rounds that cannot cover the model (ConfigError)."""

    def conclude(self, run: RunSetup) -> PreTrainedModel | None:
        """After the rounds: this strategy's part of the report, its model scored; returns
        the model to save."""
        self.report_profile(run)
        with run.clock("global-eval"):
            run.perplexities["global"] = run.evaluate(self.model, "global")
        return self.model

    def client_report(self, budgets: Mapping[int, int | None]) -> dict:
        """The report's ``clients``, ``communication`` and ``rejected`` sections."""
        accounting = self.accounting
        dense_fp16 = 2 * sum(
            linear.weight.numel()
            for layer in range(num_layers(self.model))
            for linear in prunable_weights(self.model, layer).values()
        )
        return {
            "clients": {
                str(node): {
                    "layer-budget": budgets.get(node),
                    "layers": {str(r): a.get(node, []) for r, a in accounting.assignments.items()},
                    "metrics": accounting.client_metrics.get(node, {}),
                }
                for node in budgets
            },
            "communication": {
                "bytes_up": {str(n): b for n, b in accounting.bytes_up.items()},
                "bytes_down": {str(n): b for n, b in accounting.bytes_down.items()},
                "total_up": sum(accounting.bytes_up.values()),
                "total_down": sum(accounting.bytes_down.values()),
                "largest_up": accounting.largest_up,
                # what each round alone moved (the sections above are totals over the run)
                "per_round": {
                    str(r): {
                        kind: {str(n): b for n, b in sizes.items()} for kind, sizes in moved.items()
                    }
                    for r, moved in sorted(accounting.per_round.items())
                },
                "dense_fp16_bytes_all_layers": dense_fp16,
            },
            "rejected": accounting.rejected,
        }

    # ------------------------------------------------------------------ replies

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def accepted(
        self, server_round: int, replies: Iterable[Message], accept: Callable
    ) -> Iterator[tuple[int, object]]:
        """``(node, accept(reply, node, answered))`` for every reply that ``accept`` takes.

        A reply ``accept`` raises on is recorded as rejected, with the reason, and the round
        goes on; once the replies are exhausted, every assigned node that gave no accepted
        reply is recorded as silent. No reply is referenced here once it is handed on, so
        with :class:`~fedspallm_strategy.grids.StreamingReplies` the server holds one.
        """
        answered: list[int] = []
        for reply in replies:
            node = self.sender(reply)
            try:
                taken = accept(reply, node, answered)
            except Exception as error:
                layers = self.assignments.get(node, [])
                reject_reply(self.accounting, server_round, node, layers, error)
                continue
            finally:
                del reply
            answered.append(node)
            yield node, taken
            del taken
        self.accounting.reject_silent(server_round, self.assignments, answered)

    def sender(self, reply: Message) -> int:
        """The node a reply answers for.

        An error the SuperLink itself generates (e.g. "Node Unavailable" when a node stops
        sending heartbeats) comes from the SuperLink's own node id, not the node's: it is
        attributed to the node the message it answers was sent to. Nothing else is.
        """
        src = reply.metadata.src_node_id
        if src == SUPERLINK_NODE_ID and reply.has_error():
            sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
            return sent_to.get(reply.metadata.reply_to_message_id, src)
        return src
