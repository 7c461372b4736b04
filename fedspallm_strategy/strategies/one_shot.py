"""The paper's one-shot round: every node prunes its layers, the server merges them by a rule.

Clients already hold the dense model, so no weights go down: a train message carries the
pruning spec and the node's layer ids, and a reply carries one safetensors payload of the
pruned layers. The rule is FedSpaLLM's (l0-norm aggregation and adaptive mask expansion), a
baseline's (``fedavg``, ``fedprllm``) or none (``standalone``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from transformers import PreTrainedModel

from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.merge.merging import MatrixMerger
from fedspallm_strategy.merge.plausibility import change_bound, check_kept_values, entry_factor
from fedspallm_strategy.merge.sampling import layer_budget, sample_layers
from fedspallm_strategy.run import checkpoint
from fedspallm_strategy.run.accounting import Accounting
from fedspallm_strategy.run.reply_store import drop_replies, store_reply
from fedspallm_strategy.strategies.base import ServerEvaluated
from fedspallm_strategy.strategies.profile_round import declared_patterns
from fedspallm_strategy.strategies.reply_specs import check_payload_cap, matrix_specs
from fedspallm_strategy.strategies.standalone import (
    Reported,
    best_standalone,
    standalone_perplexities,
)
from fedspallm_strategy.wire.payload import decode
from fedspallm_strategy.wire.payload_spec import payload_limit
from fedspallm_strategy.wire.protocol import PAYLOAD_KEY, SPEC_KEY, request_record
from fedspallm_strategy.wire.replies import reply_bytes, reply_metrics, screen
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import resident_layers, update_layer
from llm_pruning.owl import profile_patterns
from llm_pruning.pruners import get_pruner

if TYPE_CHECKING:
    from fedspallm_strategy.strategies.setup import RunSetup

log = logging.getLogger(__name__)


class MergeStrategy(ServerEvaluated):
    """Every node prunes its layers; the server merges each layer's pruned copies by a rule.

    The rule is FedSpaLLM's (l0-norm aggregation and adaptive mask expansion), a baseline's
    (``fedavg``, ``fedprllm``), or none (``standalone``: each client's own model is scored).

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
        self.group = num_layers(model)  # the most layers a round asks of a node
        self.assignments: dict[int, list[int]] = {}
        self.sent: list[Message] = []  # this round's train messages
        # Names of nodes with no valid reply last round: asked again only as a last resort.
        self.failed_names: set[str] = set()
        self.accounting = Accounting()
        self.reply_files: dict[int, list[Path]] = {}
        self.client_profiles: dict[int, dict[int, float]] = {}  # standalone + owl: their own
        self.reported = Reported()  # the clients' own models' perplexities

    @classmethod
    def for_run(cls, run: RunSetup) -> MergeStrategy:
        return cls(
            run.model,
            run.config,
            node_budgets=run.budgets,
            node_names=run.names,
            reply_dir=run.run_dir / "replies",
            checkpoint_dir=run.run_dir / "checkpoint",
            rule=run.config.strategy,
        )

    @classmethod
    def resume_refusal(cls, config: RunConfig) -> str | None:
        if config.sparsity_profile == "owl":
            return "sparsity-profile='owl' runs keep their profile in no checkpoint yet"
        return None

    def needs_profile_round(self) -> bool:
        # standalone: each client prunes to a profile of its own data (no federation)
        return self.rule != "standalone" and super().needs_profile_round()

    def layer_shares(self, nodes: list[int], budgets: Mapping[int, int | None]) -> list[int]:
        """How many layers each of ``nodes`` prunes a round (its budget or the fraction)."""
        total, fraction = num_layers(self.model), self.config.layer_fraction
        return [layer_budget(total, fraction, budgets.get(node)) for node in nodes]

    def check_rounds(self, nodes: list[int], budgets: Mapping[int, int | None]) -> None:
        total_layers = num_layers(self.model)
        shares = self.layer_shares(nodes, budgets)
        check_payload_cap(self.config, self.model, min(max(shares), self.group))
        needed = math.ceil(total_layers / sum(shares))
        if needed > self.config.num_rounds:
            raise ConfigError(
                f"the nodes' layer budgets cover {sum(shares)} of {total_layers} layers per "
                f"round, so num-rounds must be at least {needed} (got {self.config.num_rounds}); "
                "or raise layer-fraction"
            )

    def conclude(self, run: RunSetup) -> PreTrainedModel | None:
        run.report.update(self.client_report(run.budgets))
        self.report_profile(run)
        if self.client_profiles:  # standalone + owl: each client pruned to its own profile
            run.report["sparsity-profile"] = {
                "profile": "owl (each client its own)",
                "per-client": {
                    str(node): [round(own[layer], 6) for layer in sorted(own)]
                    for node, own in self.client_profiles.items()
                },
            }
        if (self.config.standalone_eval or self.rule == "standalone") and not self.reported:
            with run.clock("standalone-eval"):
                standalone = standalone_perplexities(self.config, run.evaluate, self.reply_files)
            if standalone:
                run.perplexities["standalone"] = standalone
        if self.reported:  # clients whose values stayed home or went int8 scored their own
            run.perplexities["standalone"] = self.reported.section()
            run.report["standalone-scored-by"] = "clients"
        if self.rule == "standalone":  # nothing merged: the best client's own model is saved
            standalone = run.perplexities.get("standalone")
            return best_standalone(self.config, self.reply_files, standalone)
        if not self.config.keep_replies:  # scored: the clients' models are theirs
            drop_replies(self.reply_dir, self.reply_files)
        return super().conclude(run)

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
        self.accounting.start_round(self._round(server_round))
        messages = []
        for node, layers in self.assignments.items():
            record = request_record(self.config, layers, self.layer_sparsities(layers))
            self.accounting.add_down(node, len(record.deflate()))
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
        # Only the round's layers are in memory (a lazily loaded model): merged, then saved.
        with resident_layers(self.model, set().union(*self.assignments.values())):
            return self._aggregate(self._round(server_round), server_round, replies)

    def _aggregate(
        self, this_round: int, server_round: int, replies: Iterable[Message]
    ) -> tuple[None, MetricRecord]:
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
            aggregation=self.config.aggregation,
            trim_fraction=self.config.trim_fraction,
            patterns=self.patterns,
        )
        delivered: dict[int, set[int]] = {}
        for node, (tensors, masks) in self.accepted(this_round, replies, self._accept):
            if self.rule != "standalone":
                merger.add(tensors, masks)
            for layer in self.assignments[node]:
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
        missing = sorted(set().union(*self.assignments.values()) - set(delivered))
        if missing:
            log.warning(
                "round %d: no valid reply for layers %s; they stay pending", server_round, missing
            )
        metrics = {
            "clients": len(answered),
            "rejected": len(self.accounting.rejected_in(this_round)),
            "layers-done": len(delivered),
            "layers-pending": len(self.remaining),
            **self.accounting.round_bytes(this_round),
            "aggregation-seconds": round(time.perf_counter() - start, 3),
        }
        if self.checkpoint_dir is not None:
            checkpoint.save_round(self.checkpoint_dir, this_round, finished, self.state())
        return None, MetricRecord(metrics)

    def _accept(self, reply: Message, node: int, answered: list[int]) -> tuple[dict, dict]:
        """Decode and validate one reply completely before anything is aggregated."""
        screen(reply, node, self.assignments, answered)
        patterns = None
        if self.rule == "standalone" and self.config.sparsity_profile == "owl":
            own = declared_patterns(self, reply, self.assignments[node])
            patterns = profile_patterns(self.model, own, self.assignments[node])
        tensors, masks, data = self._decode_pruned(reply, self.assignments[node], patterns)
        if patterns is not None:
            self.client_profiles[node] = own
        self.accounting.add_up(node, len(data))
        self.accounting.client_metrics[node] = metrics = reply_metrics(reply)
        if self.config.clients_score_standalone:  # its values went int8: it holds its model
            self.reported.take(node, self.config, metrics)
        if self.reply_dir is not None:
            store_reply(self.reply_dir, self.reply_files, node, data)
        return tensors, masks

    def _decode_pruned(
        self, reply: Message, layers: list[int], patterns: Mapping | None = None
    ) -> tuple[dict, dict, bytes]:
        """The reply's pruned matrices, checked to be exactly those of ``layers`` (pruned to
        ``patterns``, by default the run's)."""
        patterns = self.patterns if patterns is None else patterns
        expected = matrix_specs(self.model, layers, self.config, patterns)
        limit = self.config.reply_limit(payload_limit(expected))
        data = reply_bytes(reply, PAYLOAD_KEY, max_bytes=limit)
        tensors, masks = decode(data, max_bytes=limit, expected=expected)
        weights = dict(self.model.named_parameters())  # still dense: merged after the round
        for name, tensor in tensors.items():
            keep = masks[name]
            self.check_plausible(name, tensor[keep], weights[name].data[keep], patterns)
        return tensors, masks, data

    def check_plausible(
        self,
        name: str,
        kept: torch.Tensor,
        dense_kept: torch.Tensor,
        patterns: Mapping | None = None,
    ) -> None:
        """:func:`check_kept_values` at matrix ``name``'s own pattern (profile, else run)."""
        pattern = (self.patterns if patterns is None else patterns).get(name, self.pattern)
        bound = change_bound(pattern, self.config.max_relative_change)
        check_kept_values(name, kept, dense_kept, bound, entry_factor(pattern))

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
            "standalone-eval",
            "push-to-hub",
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
        """Continue from a checkpoint: finished layers, pending ones, generators, accounting.

        The checkpoint is checked whole first (``checkpoint.read``: the same config, and
        matrices the run could have written); a bad one raises ``ConfigError``
        ("resume-from: ...") and leaves this strategy and its model as they were.
        """
        saved = checkpoint.read(
            folder,
            model=self.model,
            pattern=self.pattern,
            config=self._resumable_config(),
            complete=self.rule != "standalone",  # standalone merges, so checkpoints, nothing
        )
        for layer in range(num_layers(self.model)):
            names = prunable_weights(self.model, layer)
            restored = {n: saved.matrices[n] for n in names if n in saved.matrices}
            if restored:
                update_layer(self.model, layer, restored)
        self.remaining = saved.remaining
        self.failed_names = saved.failed_names
        self.rng, self.generator = saved.rng, saved.generator
        self.accounting = saved.accounting
        self.reply_files = saved.reply_files
        self.completed_rounds = saved.completed_round
        log.info(
            "resumed after round %d: %d layers pending", self.completed_rounds, len(self.remaining)
        )
