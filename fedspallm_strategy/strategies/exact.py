"""Exact federated pruning: the clients' statistics are summed and the server prunes once.

Beyond the paper. SparseGPT's ``H = Σ xᵀx`` and Wanda's ``Σ x²`` per input column are sums
over token rows, so summing the clients' sums gives the statistics of their pooled text. Layer
by layer (one round per ``exact-layers-per-round`` decoder layers):

1. each client runs its calibration activations through the round's layer(s) and sends their
   statistics (``stats_payload.py``; Linears that share an input send one copy);
2. the server sums them over the clients (in node-name order, as ``centralized`` pools the
   shards) and prunes each matrix with the engine's pruner;
3. the next round's message carries the pruned matrices (``payload.encode``: values and mask,
   the mask alone for pruners that keep values), and each client advances its activations
   through the *pruned global* layer(s) before it collects the next statistics.

With one layer per round the result is the ``centralized`` model up to float rounding (sums
in another order), without moving any text. With more, the statistics of the later layers of
a round come from activations advanced through the still-dense earlier layers of that round:
fewer rounds, no longer exact. The run takes ``ceil(L / exact-layers-per-round)`` rounds
whatever ``num-rounds`` says. A node that fails a round is left out of the later rounds (its
activations would be stale); from then on the model is the centralized one of the others.

A reply is summed only once it is valid (``stats_payload.py``) and of a plausible scale: its
trace per token within 100x of the server's own probe of the layer (``exact_probe.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.run.accounting import Accounting
from fedspallm_strategy.strategies.base import ServerEvaluated
from fedspallm_strategy.strategies.exact_plan import MIB, plan_exact
from fedspallm_strategy.strategies.exact_probe import ScaleProbe, check_all
from fedspallm_strategy.wire.payload import encode
from fedspallm_strategy.wire.protocol import (
    EXACT_KEY,
    EXACT_MESSAGE_TYPE,
    PAYLOAD_KEY,
    PREVIOUS_KEY,
    SPEC_KEY,
    bytes_record,
    request_record,
)
from fedspallm_strategy.wire.replies import reply_bytes, reply_metrics, screen
from fedspallm_strategy.wire.stats_payload import (
    decode_statistics,
    statistics_limit,
)
from llm_pruning.engine import reconstruction_options
from llm_pruning.families import family_of, num_layers, prunable_weights
from llm_pruning.lazy import resident_layers
from llm_pruning.pruners import Stats, get_pruner

if TYPE_CHECKING:
    from fedspallm_strategy.strategies.setup import RunSetup

log = logging.getLogger(__name__)


class Exact(ServerEvaluated):
    """Federated pruning that reaches the centralized model: sum statistics, prune once.

    Parameters
    ----------
    model
        The server's dense model; each round's layers are pruned into it in place.
    config
        The validated run configuration (``exact-layers-per-round``, ``max-stats-mb``).
    node_names
        Node id -> a stable name; the sums run in this order, as ``centralized`` pools.
    tokenizer
        The model's, for the probe of the statistics' scale on the public corpus
        (``exact_probe.py``); without it the probe is seeded random tokens.

    Raises
    ------
    ConfigError
        If the statistics would exceed ``max-stats-mb`` or a reply ``max-payload-mb``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: RunConfig,
        *,
        node_names: Mapping[int, str] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        self.model, self.config = model, config
        self.node_names = dict(node_names or {})
        self.pruner = get_pruner(config.pruner)
        # lsq: the exact masked least squares on the summed statistics, the pooled optimum
        self.reconstruction = reconstruction_options(self.pruner, config.reconstruction)
        self.pattern = config.sparsity_pattern
        self.plan = plan_exact(model, config)
        self.plan.check_budget(config)
        self.rounds = len(self.plan.rounds)  # what Strategy.start must run
        self.remaining = list(range(num_layers(model)))
        self.participants: list[int] | None = None  # fixed in round 1
        self.dropped: set[int] = set()
        self.assignments: dict[int, list[int]] = {}
        self.sent: list[Message] = []  # this round's messages
        self.previous: tuple[list[int], bytes] | None = None  # last round's pruned layers
        self.accounting = Accounting()
        self.contributors: dict[int, list[int]] = {}
        self.round_seconds: dict[int, float] = {}
        self._round_start = 0.0
        self.probe = ScaleProbe(
            model, tokenizer, seqlen=config.seqlen, seed=config.seed, device=config.device
        )

    @classmethod
    def for_run(cls, run: RunSetup) -> Exact:
        return cls(run.model, run.config, node_names=run.names, tokenizer=run.tokenizer)

    profile_kind = "statistics"  # owl: the pooled dense column norms, as centralized has

    def profile_groups(self) -> tuple[tuple[str, ...], ...]:
        """The shared-input groups a statistics profile reply sends one copy of."""
        return self.plan.shared

    def profile_expected(self) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Every layer's statistics groups: what a profile reply must hold."""
        return self._expected(list(range(num_layers(self.model))))

    def check_rounds(self, nodes: list[int], budgets: Mapping[int, int | None]) -> None:
        self.plan.check_budget(self.config)  # one round per layer group: only bytes can refuse

    def conclude(self, run: RunSetup) -> PreTrainedModel | None:
        run.report.update(self.client_report(run.budgets))
        run.report["exact"] = self.costs()
        return super().conclude(run)

    def summary(self) -> None:
        plan = self.plan
        log.info(
            "exact: %s %s, %d layers in %d rounds; per client %.2f MiB of %s statistics per "
            "layer (%.1f MiB in all) vs %.1f MiB for fedspallm; shared inputs %s",
            self.pruner.name,
            self.pattern,
            len(plan.stats_bytes),
            self.rounds,
            max(plan.stats_bytes.values()) / MIB,
            plan.kind,
            plan.stats_total / MIB,
            plan.fedspallm_total / MIB,
            [list(group) for group in plan.shared],
        )

    def _name(self, node: int) -> str:
        return self.node_names.get(node, str(node))

    # ----------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.assignments = {}
        if server_round > self.rounds or not self.remaining:
            return []
        self._round_start = time.perf_counter()
        self.accounting.start_round(server_round)
        layers = list(self.plan.rounds[server_round - 1])
        if self.participants is None:
            self.participants = sorted(grid.get_node_ids(), key=lambda n: (self._name(n), n))
            if not self.participants:
                raise RuntimeError("no nodes are connected to the federation")
        connected = set(grid.get_node_ids())
        nodes = [n for n in self.participants if n in connected and n not in self.dropped]
        if not nodes:
            raise RuntimeError(
                f"exact: none of the nodes that started the run is left for layers {layers}"
            )
        previous_layers, previous = self.previous or ([], b"")
        extra = ConfigRecord(
            {
                "shared": [",".join(group) for group in self.plan.shared],
                "previous-layers": previous_layers,
            }
        )
        messages = []
        for node in nodes:
            spec = request_record(self.config, layers)
            content = RecordDict({SPEC_KEY: spec, EXACT_KEY: extra})
            if previous:
                content[PREVIOUS_KEY] = bytes_record(previous, PREVIOUS_KEY)
            down = len(spec.deflate()) + len(extra.deflate()) + len(previous)
            self.accounting.add_down(node, down)
            self.assignments[node] = layers
            messages.append(
                Message(
                    content,
                    message_type=EXACT_MESSAGE_TYPE,
                    dst_node_id=node,
                    group_id=str(server_round),
                )
            )
        self.accounting.assignments[server_round] = dict(self.assignments)
        self.sent = messages
        log.info(
            "exact round %d/%d: statistics of layers %s from %d nodes (%.2f MiB each)",
            server_round,
            self.rounds,
            layers,
            len(messages),
            self.plan.round_bytes(layers) / MIB,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.assignments:
            return None, None
        start = time.perf_counter()
        layers = next(iter(self.assignments.values()))
        expected = self._expected(layers)
        # Replies come in the order the messages went out, node-name order (StreamingReplies;
        # the in-process grid too): the order in which `centralized` pools the shards.
        sums: dict[str, Stats] = {}
        accepted: list[int] = []
        scales = self.probe.expected(layers, expected)  # trace per token per group
        accept = partial(self._accept, expected=expected, scales=scales)
        for node, entries in self.accepted(server_round, replies, accept):
            for name, (stats, _covers) in entries.items():
                if name in sums:
                    sums[name].merge(stats)
                else:
                    sums[name] = stats
            accepted.append(node)
            del entries  # streaming: one client's statistics at a time
        return None, self._finish_round(server_round, layers, sums, accepted, start)

    def _finish_round(
        self,
        server_round: int,
        layers: list[int],
        sums: Mapping[str, Stats],
        accepted: list[int],
        start: float | None = None,
    ) -> MetricRecord:
        """Prune the round's layers on the summed statistics; drop the nodes that failed."""
        start = time.perf_counter() if start is None else start
        failed = set(self.assignments) - set(accepted)
        if not accepted:
            reasons = sorted(
                {r["reason"] for r in self.accounting.rejected if r["round"] == server_round}
            )
            raise RuntimeError(
                f"exact: no valid statistics for layers {layers} in round {server_round}, so "
                f"no later layer can be pruned; rejected: {'; '.join(reasons)}"
            )
        if failed:
            self.dropped |= failed
            log.warning(
                "exact: nodes %s left out from layer %d on; the model is the centralized one "
                "of the other nodes' data from there",
                sorted(failed),
                layers[0],
            )
        self.contributors[server_round] = accepted
        masks, pruned = self._prune(layers, sums)
        self.previous = (layers, encode(pruned if self.pruner.updates_weights else None, masks))
        self.remaining = [layer for layer in self.remaining if layer not in layers]
        self.round_seconds[server_round] = round(time.perf_counter() - self._round_start, 3)
        metrics = {
            "clients": len(accepted),
            "rejected": len(failed),
            "layers-done": len(layers),
            "layers-pending": len(self.remaining),
            **self.accounting.round_bytes(server_round),
            "prune-seconds": round(time.perf_counter() - start, 3),
        }
        return MetricRecord(metrics)

    def _expected(self, layers: list[int]) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Group key -> (inputs, covers) of every statistics group the round must deliver."""
        expected = {}
        for layer in layers:
            linears = prunable_weights(self.model, layer)
            prefix = family_of(self.model).layer_prefix(layer)
            for group in self.plan.shared:
                names = tuple(f"{prefix}{name}.weight" for name in group)
                expected[names[0]] = (linears[names[0]].in_features, names)
        return expected

    def _accept(
        self, reply: Message, node: int, accepted: list[int], expected, scales=None
    ) -> dict:
        """Decode and validate one reply completely before anything is summed: its
        statistics' scale too, against the server's probe (``scales``, key -> trace/token)."""
        screen(reply, node, self.assignments, accepted)
        limit = self.config.reply_limit(statistics_limit(self.plan.kind, expected))
        data = reply_bytes(reply, PAYLOAD_KEY, max_bytes=limit)
        kind, entries = decode_statistics(
            data,
            max_bytes=limit,
            expected_kind=self.plan.kind,
            expected=expected,
            tokens=self.config.calib_samples * self.config.seqlen,
        )
        check_all(entries, scales or {})
        self.accounting.add_up(node, len(data))
        self.accounting.add_metrics(node, reply_metrics(reply))
        return entries

    @torch.no_grad()
    def _prune(self, layers: list[int], sums: Mapping) -> tuple[dict, dict]:
        """Prune the round's layers with the summed statistics, as ``prune_layer`` would."""
        with resident_layers(self.model, layers):  # a lazily loaded model: saved, then freed
            return self._prune_resident(layers, sums)

    def _prune_resident(self, layers: list[int], sums: Mapping) -> tuple[dict, dict]:
        device = torch.device(self.config.device)
        masks, pruned = {}, {}
        for layer in layers:
            prefix = family_of(self.model).layer_prefix(layer)
            key_of = {
                f"{prefix}{name}.weight": f"{prefix}{group[0]}.weight"
                for group in self.plan.shared
                for name in group
            }
            for name, linear in prunable_weights(self.model, layer).items():
                weight = linear.weight.data.to(device)
                pattern = self.pattern_of(name)  # the layer's own under an owl profile
                new_weight, keep = self.pruner.prune(
                    weight, sums[key_of[name]], pattern, **self.reconstruction
                )
                linear.weight.data.copy_(new_weight.to(linear.weight.device))
                masks[name] = keep.cpu()
                pruned[name] = linear.weight.data
            log.info("exact: layer %d pruned on the summed statistics", layer)
        return masks, pruned

    def costs(self) -> dict:
        """The ``exact`` section of the report: the plan, who contributed, wall time."""
        return {
            **self.plan.as_dict(),
            "layers_per_round_setting": self.config.exact_layers_per_round,
            "contributors": {str(r): nodes for r, nodes in self.contributors.items()},
            "dropped": sorted(self.dropped),
            "round_seconds": {str(r): s for r, s in self.round_seconds.items()},
        }
