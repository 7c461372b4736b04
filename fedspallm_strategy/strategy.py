"""Flower strategies: FedSpaLLM and its baselines, thin over the Flower-free maths.

Flower's ``Strategy.start`` owns the round loop; these classes only say what each node is
asked to prune (``configure_train``) and how the replies become the global model
(``aggregate_train``). Clients already hold the dense model, so no weights go down: a train
message carries the pruning spec and the node's layer ids, and a reply carries one
safetensors payload of the pruned layers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from transformers import PreTrainedModel

from fedspallm_strategy import checkpoint
from fedspallm_strategy.accounting import Accounting
from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.merging import MatrixMerger
from fedspallm_strategy.payload import PayloadError, decode, validate_layer
from fedspallm_strategy.sampling import layer_budget, sample_layers
from llm_pruning.models import num_layers, prunable_weights
from llm_pruning.pruners import get_pruner

log = logging.getLogger(__name__)

SPEC_KEY = "spec"  # ConfigRecord of a train message: pruning spec + layer ids
PAYLOAD_KEY = "payload"  # ArrayRecord/Array of a train reply: the safetensors bytes
# The run-config keys a client needs to prune; everything else stays on the server.
CLIENT_KEYS = (
    "model",
    "strategy",
    "resolve",
    "resolve-weighting",
    "pruner",
    "sparsity",
    "pattern",
    "calib-data",
    "partition",
    "calib-samples",
    "seqlen",
    "seed",
    "device",
)


def request_record(config: RunConfig, layer_ids: list[int]) -> ConfigRecord:
    settings = config.as_dict()
    return ConfigRecord({**{key: settings[key] for key in CLIENT_KEYS}, "layers": layer_ids})


def request_from_record(record: ConfigRecord) -> tuple[RunConfig, list[int]]:
    """The client's side of :func:`request_record`, validated like a run config."""
    values = dict(record)
    layers = values.pop("layers", None)
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"train message: 'layers' must be a list of layer ids, got {layers!r}")
    return RunConfig.from_mapping(values), layers


class RejectedReply(Exception):
    """A reply the server will not aggregate; the reason goes to the log and the report."""


def bytes_record(data: bytes, key: str = PAYLOAD_KEY) -> ArrayRecord:
    """``data`` as one 1-D uint8 array named ``key`` (1-D: Flower chunks it)."""
    return ArrayRecord({key: Array(np.frombuffer(data, dtype=np.uint8))})


def reply_bytes(reply: Message, key: str) -> bytes:
    """The bytes a reply carries under ``key``: exactly one 1-D uint8 array in that record."""
    if key not in reply.content.array_records:
        raise RejectedReply(f"reply has no '{key}' ArrayRecord")
    arrays = reply.content.array_records[key]
    if list(arrays.keys()) != [key]:
        raise RejectedReply(f"{key} record must hold exactly one array '{key}'")
    array = arrays[key]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise RejectedReply(f"{key} must be a 1-D uint8 array, got {array.dtype} {array.shape}")
    return array.numpy().tobytes()


def reply_payload(reply: Message) -> bytes:
    """The payload bytes of a reply: exactly one 1-D uint8 array under ``PAYLOAD_KEY``."""
    return reply_bytes(reply, PAYLOAD_KEY)


class ServerEvaluated(Strategy):
    """A strategy whose models are scored on the server after the rounds (perplexity), so no
    evaluate messages go to the clients."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None


class FedSpaLLM(ServerEvaluated):
    """Federated one-shot pruning with l0-norm aggregation and adaptive mask expansion.

    Parameters
    ----------
    model
        The server's copy of the dense model; pruned layers are written into it in place.
    config
        The validated run configuration.
    node_budgets
        Node id -> ``layer-budget`` the node reported (``None``: use ``layer-fraction``).
    node_names
        Node id -> a name that survives restarts (its partition or data path). Sampling
        orders nodes by it, so a resumed run draws what the uninterrupted one would have.
    reply_dir
        If given, each accepted payload is also written there, for per-client evaluation.
    checkpoint_dir
        If given, the state is saved there after every round (see ``checkpoint.py``).
    rule
        How matrices are merged: ``fedspallm``, ``fedavg``, ``fedprllm``, or ``standalone``
        (nothing merged: only the clients' own models are evaluated).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: RunConfig,
        *,
        node_budgets: Mapping[int, int | None] | None = None,
        node_names: Mapping[int, str] | None = None,
        reply_dir: Path | None = None,
        checkpoint_dir: Path | None = None,
        rule: str = "fedspallm",
    ):
        self.model, self.config, self.rule = model, config, rule
        self.node_budgets = dict(node_budgets or {})
        self.node_names = dict(node_names or {})
        self.reply_dir, self.checkpoint_dir = reply_dir, checkpoint_dir
        self.rounds = config.num_rounds  # what Strategy.start must run
        self.completed_rounds = 0  # before this process started, when resuming
        self.pattern = config.sparsity_pattern
        self.pruner = get_pruner(config.pruner)
        self.rng = np.random.default_rng(config.seed)  # layer sampling
        self.generator = torch.Generator().manual_seed(config.seed)  # fedprllm tie-breaks
        self.remaining = list(range(num_layers(model)))  # layers no valid reply delivered yet
        self.assignments: dict[int, list[int]] = {}
        self.sent: list[Message] = []  # this round's train messages
        # Names of nodes with no valid reply last round: asked again only as a last resort.
        self.failed_names: set[str] = set()
        self.accounting = Accounting()
        self.reply_files: dict[int, list[Path]] = {}

    def summary(self) -> None:
        log.info(
            "%s: %s %s, %d layers, layer-fraction %.2f, node budgets %s",
            self.rule,
            self.pruner.name,
            self.pattern,
            len(self.remaining),
            self.config.layer_fraction,
            self.node_budgets or "none",
        )

    # ----------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.assignments, self.sent = {}, []
        if not self.remaining:  # every layer is done: later rounds are idle
            return []
        self.assignments = self.assign_layers(list(grid.get_node_ids()))
        self.accounting.assignments[self._round(server_round)] = self.assignments
        messages = []
        for node, layers in self.assignments.items():
            record = request_record(self.config, layers)
            self.accounting.bytes_down[node] = self.accounting.bytes_down.get(node, 0) + len(
                record.deflate()
            )
            content = RecordDict({SPEC_KEY: record})
            messages.append(
                Message(content, message_type="train", dst_node_id=node, group_id=str(server_round))
            )
        log.info(
            "round %d: %d layers over %d nodes", server_round, len(self.remaining), len(messages)
        )
        self.sent = messages  # the grid gives them their message ids as it pushes them
        return messages

    def assign_layers(self, nodes: list[int]) -> dict[int, list[int]]:
        """Each node's layers this round: its budget of the remaining layers, all covered."""
        if not nodes:
            raise RuntimeError("no nodes are connected to the federation")
        # A node that timed out or sent garbage is not asked again while others can do the work.
        nodes = [n for n in nodes if self._name(n) not in self.failed_names] or nodes
        nodes = sorted(nodes, key=lambda n: (self._name(n), n))  # stable across restarts
        remaining = self.remaining
        total = num_layers(self.model)
        budgets = {
            rank: min(
                len(remaining),
                layer_budget(total, self.config.layer_fraction, self.node_budgets.get(node)),
            )
            for rank, node in enumerate(nodes)
        }
        # If the budgets cannot cover every remaining layer this round, cover a random
        # subset now; later rounds take the rest.
        if sum(budgets.values()) < len(remaining):
            chosen = sorted(self.rng.choice(len(remaining), sum(budgets.values()), replace=False))
            remaining = [remaining[i] for i in chosen]
        draw = sample_layers(len(remaining), budgets, self.rng)
        return {nodes[rank]: [remaining[i] for i in ids] for rank, ids in draw.items()}

    def _name(self, node: int) -> str:
        return self.node_names.get(node, str(node))

    def _round(self, server_round: int) -> int:
        """Rounds count on across a resume."""
        return self.completed_rounds + server_round

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.assignments:
            return None, None
        this_round = self._round(server_round)
        start = time.perf_counter()
        dense = {
            name: linear.weight.data
            for layers in self.assignments.values()
            for layer in layers
            for name, linear in prunable_weights(self.model, layer).items()
        }
        merger = MatrixMerger(
            "fedspallm" if self.rule == "standalone" else self.rule,
            dense,
            self.pattern,
            self.generator,
        )
        delivered: dict[int, set[int]] = {}
        for reply in replies:
            node = self._sender(reply)
            layers = self.assignments.get(node, [])
            try:
                tensors, masks = self._accept(reply, node, delivered)
            except (PayloadError, RejectedReply) as error:
                self.accounting.reject(this_round, node, layers, str(error))
                continue
            if self.rule != "standalone":
                merger.add(tensors, masks)
            for layer in layers:
                delivered.setdefault(layer, set()).add(node)
            del tensors, masks  # streaming: one client's matrices at a time
        finished = {}
        for layer in sorted(delivered):
            if self.rule != "standalone":
                finished.update(self._write_layer(layer, merger))
            self.remaining.remove(layer)
        answered = {n for nodes in delivered.values() for n in nodes}
        failed = set(self.assignments) - answered
        self.failed_names = {self._name(n) for n in failed}
        rejected_now = {r["node"] for r in self.accounting.rejected if r["round"] == this_round}
        for node in sorted(failed - rejected_now):
            self.accounting.reject(this_round, node, self.assignments[node], "no reply in time")
        missing = sorted(set().union(*self.assignments.values()) - set(delivered))
        if missing:
            log.warning(
                "round %d: no valid reply for layers %s; they stay pending", server_round, missing
            )
        metrics = {
            "clients": len(answered),
            "rejected": sum(1 for r in self.accounting.rejected if r["round"] == this_round),
            "layers-done": len(delivered),
            "layers-pending": len(self.remaining),
            "bytes-up": sum(self.accounting.bytes_up.values()),
            "aggregation-seconds": round(time.perf_counter() - start, 3),
        }
        if self.checkpoint_dir is not None:
            checkpoint.save_round(self.checkpoint_dir, this_round, finished, self.state())
        return None, MetricRecord(metrics)

    def _sender(self, reply: Message) -> int:
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

    def _accept(
        self, reply: Message, node: int, delivered: Mapping[int, set[int]]
    ) -> tuple[dict, dict]:
        """Decode and validate one reply completely before anything is aggregated."""
        if reply.has_error():
            raise RejectedReply(f"client error: {reply.error.reason}")
        if node not in self.assignments:
            raise RejectedReply("reply from a node that was not asked this round")
        if any(node in nodes for nodes in delivered.values()):
            raise RejectedReply("duplicate reply")
        tensors, masks, data = self._decode_pruned(reply, self.assignments[node])
        self.accounting.bytes_up[node] = self.accounting.bytes_up.get(node, 0) + len(data)
        if "metrics" in reply.content.metric_records:
            self.accounting.client_metrics[node] = dict(reply.content.metric_records["metrics"])
        if self.reply_dir is not None:
            self._store(node, data)
        return tensors, masks

    def _decode_pruned(self, reply: Message, layers: list[int]) -> tuple[dict, dict, bytes]:
        """The reply's pruned matrices, checked to be exactly those of ``layers``."""
        data = reply_payload(reply)
        tensors, masks = decode(data, max_bytes=int(self.config.max_payload_mb * 2**20))
        expected = {
            name: tuple(linear.weight.shape)
            for layer in layers
            for name, linear in prunable_weights(self.model, layer).items()
        }
        validate_layer(tensors, masks, expected, require_values=self.pruner.updates_weights)
        return tensors, masks, data

    def _store(self, node: int, data: bytes) -> None:
        self.reply_dir.mkdir(parents=True, exist_ok=True)
        path = (
            self.reply_dir / f"node-{node}-part-{len(self.reply_files.get(node, []))}.safetensors"
        )
        path.write_bytes(data)
        self.reply_files.setdefault(node, []).append(path)

    def _write_layer(self, layer: int, merger: MatrixMerger) -> dict[str, torch.Tensor]:
        written = {}
        for name, linear in prunable_weights(self.model, layer).items():
            merged, _keep = merger.finish(name)
            linear.weight.data.copy_(merged)
            written[name] = merged
        return written

    # ------------------------------------------------------------ checkpoint
    def _resumable_config(self) -> dict:
        """The settings a resumed run must share with the original (JSON-normalised)."""
        settings = self.config.as_dict()
        # Limits, logistics and other strategies' settings do not change the pruned model.
        for key in (
            "resume-from",
            "output-dir",
            "round-timeout",
            "num-rounds",
            "min-clients",
            "max-payload-mb",
            "max-stats-mb",
            "exact-layers-per-round",
            "compare-centralized",
        ):
            settings.pop(key)
        return json.loads(json.dumps(settings))

    def state(self) -> dict:
        """Everything a restarted server needs besides the finished matrices (JSON-able)."""
        return {
            "config": self._resumable_config(),
            "remaining": self.remaining,
            "failed_names": sorted(self.failed_names),
            "rng": checkpoint.numpy_rng_state(self.rng),
            "generator": checkpoint.torch_rng_state(self.generator),
            "accounting": self.accounting.to_json(),
            "reply_files": {
                str(n): [str(p) for p in paths] for n, paths in self.reply_files.items()
            },
        }

    def restore(self, folder: Path) -> None:
        """Continue from a checkpoint: finished layers, pending ones, generators, accounting."""
        state, matrices = checkpoint.load(folder)
        changed = sorted(
            key
            for key in set(state["config"]) | set(self._resumable_config())
            if state["config"].get(key) != self._resumable_config().get(key)
        )
        if changed:
            raise ValueError(
                f"resume-from: the run config differs from the checkpoint's in {changed}"
            )
        parameters = dict(self.model.named_parameters())
        for name, matrix in matrices.items():
            parameters[name].data.copy_(matrix)
        self.remaining = state["remaining"]
        self.failed_names = set(state["failed_names"])
        self.rng = checkpoint.restore_numpy_rng(state["rng"])
        checkpoint.restore_torch_rng(self.generator, state["generator"])
        self.accounting = Accounting.from_json(state["accounting"])
        self.reply_files = {int(n): [Path(p) for p in ps] for n, ps in state["reply_files"].items()}
        self.completed_rounds = state["completed_round"]
        log.info(
            "resumed after round %d: %d layers pending", self.completed_rounds, len(self.remaining)
        )


class Centralized(ServerEvaluated):
    """The upper bound that privacy forbids: one pruner on every client's shard pooled.

    Simulation only — the server reads the shards itself. It sends no messages; the
    pruning happens in round 1's ``aggregate_train`` so the run goes through
    ``Strategy.start`` like every other strategy.
    """

    def __init__(self, model: PreTrainedModel, config: RunConfig, pooled_segments):
        self.model, self.config = model, config
        self.pooled_segments = pooled_segments  # callable: () -> (N, T) tokens of all shards
        self.remaining = list(range(num_layers(model)))
        self.rounds = 1  # the pruning happens in round 1

    def summary(self) -> None:
        log.info(
            "centralized: %s %s on the pooled shards",
            self.config.pruner,
            self.config.sparsity_pattern,
        )

    def prune(self) -> dict[str, float | int]:
        """Prune the model in place on the pooled segments; returns metrics."""
        from llm_pruning.engine import prune_model  # the server prunes only here

        start = time.perf_counter()
        segments = self.pooled_segments()
        pruner = get_pruner(self.config.pruner)
        pattern = self.config.sparsity_pattern
        prune_model(self.model, segments, pruner, pattern, device=self.config.device)
        self.remaining = []
        return {
            "segments": int(segments.shape[0]),
            "seconds": round(time.perf_counter() - start, 3),
        }

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_train(
        self, server_round, replies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.remaining:
            return None, None
        return None, MetricRecord(self.prune())
