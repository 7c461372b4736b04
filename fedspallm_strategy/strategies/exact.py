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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from transformers import PreTrainedModel

from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.run.accounting import Accounting
from fedspallm_strategy.strategies.base import ServerEvaluated
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
from fedspallm_strategy.wire.secure_encoding import masked_bytes, vector_lengths
from fedspallm_strategy.wire.stats_payload import (
    decode_statistics,
    kind_of,
    statistics_limit,
    statistics_nbytes,
)
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.families import family_of, num_layers, prunable_weights
from llm_pruning.lazy import resident_layers
from llm_pruning.pruners import Pruner, Stats, get_pruner, num_to_prune

if TYPE_CHECKING:
    from fedspallm_strategy.strategies.setup import RunSetup

log = logging.getLogger(__name__)

MIB = 2**20


# ------------------------------------------------------------------------------ the plan


def shared_input_groups(model: PreTrainedModel) -> list[tuple[str, ...]]:
    """The prunable Linears of a decoder layer grouped by the input tensor they read.

    Relative names (``self_attn.q_proj``). q/k/v read one tensor, gate/up another: their
    statistics are identical, so a client sends one copy per group. Found by running decoder
    layer 0 once on a few tokens (the layers of a model share one structure).
    """
    family = family_of(model)
    probe = torch.arange(8).remainder(model.config.vocab_size)[None]  # (1, 8) token ids
    calibrator = LayerwiseCalibrator(model, probe, "cpu")
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module, inputs, _output) -> None:  # None: the output stays as it is
            seen.setdefault(name, inputs[0])

        return hook

    handles = [
        linear.register_forward_hook(record(name))
        for name, linear in zip(family.linears, prunable_weights(model, 0).values(), strict=True)
    ]
    try:
        calibrator.advance(0)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in family.linears:  # `seen` keeps the tensors alive, so `is` cannot be fooled
        for group in groups:
            if seen[group[0]] is seen[name]:
                group.append(name)
                break
        else:
            groups.append([name])
    return [tuple(group) for group in groups]


@dataclass(frozen=True)
class ExactPlan:
    """Rounds, shared-input groups and bytes of an ``exact`` run, from the model's shapes."""

    rounds: tuple[tuple[int, ...], ...]  # decoder layers per round
    shared: tuple[tuple[str, ...], ...]  # relative Linear names that share one input
    kind: str  # statistics kind: hessian | column-norms
    stats_bytes: dict[int, int]  # layer -> statistics bytes per client
    fedspallm_bytes: dict[int, int]  # layer -> what a fedspallm client would upload

    @property
    def stats_total(self) -> int:
        return sum(self.stats_bytes.values())

    @property
    def fedspallm_total(self) -> int:
        return sum(self.fedspallm_bytes.values())

    def round_bytes(self, layers: Iterable[int]) -> int:
        return sum(self.stats_bytes[layer] for layer in layers)

    def check_budget(self, config: RunConfig) -> None:
        """Refuse a run whose statistics exceed ``max-stats-mb`` (or one reply
        ``max-payload-mb``), before any node does any work."""
        per_layer = max(self.stats_bytes.values())
        what = f"{'masked ' if config.secure_aggregation else ''}{self.kind} statistics"
        if self.stats_total > config.max_stats_mb * MIB:
            raise ConfigError(
                f"strategy exact: each client would upload {self.stats_total / MIB:.1f} MiB of "
                f"{what} ({per_layer / MIB:.2f} MiB per decoder layer, "
                f"{len(self.stats_bytes)} layers), over max-stats-mb={config.max_stats_mb:g}. "
                f"Raise max-stats-mb, or use strategy fedspallm "
                f"({self.fedspallm_total / MIB:.1f} MiB per client)"
            )
        largest = max(self.round_bytes(layers) for layers in self.rounds)
        if largest > config.max_payload_mb * MIB:
            raise ConfigError(
                f"strategy exact: one round's statistics reply would be {largest / MIB:.1f} MiB, "
                f"over max-payload-mb={config.max_payload_mb:g}; lower exact-layers-per-round "
                f"(now {config.exact_layers_per_round}) or raise max-payload-mb"
            )

    def as_dict(self) -> dict:
        return {
            "rounds": len(self.rounds),
            "layers_per_round": [list(layers) for layers in self.rounds],
            "shared_inputs": [list(group) for group in self.shared],
            "statistics_kind": self.kind,
            "statistics_bytes_per_layer": {str(k): v for k, v in self.stats_bytes.items()},
            "statistics_bytes_per_client": self.stats_total,
            "fedspallm_bytes_per_layer": {str(k): v for k, v in self.fedspallm_bytes.items()},
            "fedspallm_bytes_per_client": self.fedspallm_total,
        }


def fedspallm_upload_bytes(linear: torch.nn.Linear, pruner: Pruner, sparsity: float) -> int:
    """What ``payload.encode`` makes of one pruned matrix (tensor data, without the header)."""
    numel = linear.weight.numel()
    mask = math.ceil(numel / 8)
    if not pruner.updates_weights:
        return mask
    return (numel - num_to_prune(numel, sparsity)) * linear.weight.element_size() + mask


def plan_exact(model: PreTrainedModel, config: RunConfig) -> ExactPlan:
    """Everything an ``exact`` run will do and send, computed before it starts."""
    pruner = get_pruner(config.pruner)
    if pruner.make_stats is None:
        raise ConfigError(f"strategy exact needs a pruner with statistics, not {pruner.name}")
    kind = kind_of(pruner.make_stats)
    total = num_layers(model)
    step = config.exact_layers_per_round
    rounds = tuple(tuple(range(s, min(s + step, total))) for s in range(0, total, step))
    shared = tuple(shared_input_groups(model))
    prefix = family_of(model).layer_prefix
    stats_bytes, fedspallm_bytes = {}, {}
    for layer in range(total):
        linears = prunable_weights(model, layer)
        inputs = [linears[f"{prefix(layer)}{group[0]}.weight"].in_features for group in shared]
        if config.secure_aggregation:  # masked int64 digits (secure_encoding.py)
            stats_bytes[layer] = masked_bytes(vector_lengths(kind, inputs))
        else:
            stats_bytes[layer] = sum(statistics_nbytes(kind, d) for d in inputs)
        fedspallm_bytes[layer] = sum(
            fedspallm_upload_bytes(linear, pruner, config.sparsity) for linear in linears.values()
        )
    return ExactPlan(rounds, shared, kind, stats_bytes, fedspallm_bytes)


# --------------------------------------------------------------------------- the strategy


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
    ):
        self.model, self.config = model, config
        self.node_names = dict(node_names or {})
        self.pruner = get_pruner(config.pruner)
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

    @classmethod
    def for_run(cls, run: RunSetup) -> Exact:
        return cls(run.model, run.config, node_names=run.names)

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
            self.accounting.bytes_down[node] = self.accounting.bytes_down.get(node, 0) + down
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
        accept = partial(self._accept, expected=expected)
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
            "bytes-up": sum(self.accounting.bytes_up.values()),
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

    def _accept(self, reply: Message, node: int, accepted: list[int], expected) -> dict:
        """Decode and validate one reply completely before anything is summed."""
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
                new_weight, keep = self.pruner.prune(weight, sums[key_of[name]], pattern)
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
