"""Layer-wise FedSpaLLM: rounds over groups of layers, global calibration, the masked re-solve.

Beyond the paper (DESIGN §2). One-shot FedSpaLLM averages SparseGPT weights that each
compensate for their own client's mask, and the merged mask differs from every client's. Here,
once l0 aggregation and adaptive mask expansion have fixed a matrix's global keep-mask, the
next round sends that mask to the clients that pruned the layer; each re-runs SparseGPT's OBS
sweep with the mask given (not chosen) on its own calibration inputs and sends only the kept
values, which the server averages. With ``calibration='global'`` the rounds walk the layers
in groups, and every client advances its inputs through the merged layers below the group it
prunes. ``round_plan.py`` says what each round does; this class sends it and merges replies.

Layers are sampled once for the whole run (the nodes' budgets must cover the model); a node
prunes its layers as their group comes up. A node whose reply fails is left out of the later
rounds (its running inputs would be stale); its layers in later groups go to the live node
with the fewest layers there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from transformers import PreTrainedModel

from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.merge.merging import MatrixMerger, kept_nonzero
from fedspallm_strategy.merge.packed_masks import PackedMasks
from fedspallm_strategy.merge.resolve_average import ResolveAverage
from fedspallm_strategy.run.reply_store import store_reply
from fedspallm_strategy.strategies.memory_plan import planned_layers_per_round
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from fedspallm_strategy.wire.payload import encode
from fedspallm_strategy.wire.protocol import (
    GLOBAL_KEY,
    LAYERWISE_MESSAGE_TYPE,
    MASKS_KEY,
    RESOLVED_KEY,
    SPEC_KEY,
    STEP_KEY,
    bytes_record,
    request_record,
)
from fedspallm_strategy.wire.replies import reply_bytes, reply_metrics, screen
from fedspallm_strategy.wire.round_plan import RoundStep, plan_rounds
from fedspallm_strategy.wire.values_payload import Expected, decode_values, values_limit
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.layer_store import layer_store
from llm_pruning.lazy import layer_tensors, resident_layers

if TYPE_CHECKING:
    from fedspallm_strategy.strategies.setup import RunSetup

log = logging.getLogger(__name__)


class LayerwiseMerge(MergeStrategy):
    """FedSpaLLM with ``resolve``, ``calibration='global'`` or ``layers-per-round``.

    Takes :class:`MergeStrategy`'s arguments; ``checkpoint_dir`` is not used (no resume yet).
    """

    def __init__(self, model, config, **kwargs):
        kwargs.pop("checkpoint_dir", None)
        super().__init__(model, config, **kwargs)
        self.group = planned_layers_per_round(model, config, len(self.node_budgets) or 1)
        self.plan = plan_rounds(
            num_layers(model),
            calibration=config.calibration,
            resolve=config.resolves,
            layers_per_round=self.group,
            pipelined=config.resolve_pipelined,
        )
        self.rounds = len(self.plan)
        self.owned: dict[int, list[int]] | None = None  # node -> its sampled layers, whole run
        self.dropped: set[int] = set()
        self.steps: dict[int, RoundStep] = {}  # this round: node -> its part
        self.pruned_by: dict[int, list[int]] = {}  # layer -> nodes whose pruned copy was merged
        self.global_masks = PackedMasks()  # fixed masks awaiting re-solve or hand-down
        # The dense values under them, until re-solved: kept only where the merged layer is not
        # dense * mask (values travelled); else read back from the layer in its re-solve round.
        self.dense_kept: dict[str, torch.Tensor] = {}
        self.round_log: list[dict] = []

    @classmethod
    def resume_refusal(cls, config: RunConfig) -> str | None:
        return (
            "runs with resolve, calibration='global' or layers-per-round keep no checkpoint "
            "to resume from yet"
        )

    def check_rounds(self, nodes: list[int], budgets: Mapping[int, int | None]) -> None:
        total = num_layers(self.model)
        covered = sum(self.layer_shares(nodes, budgets))
        if covered < total:
            raise ConfigError(
                f"the nodes' layer budgets cover {covered} of {total} layers, and a "
                "run with resolve, calibration='global' or layers-per-round samples every layer "
                "once for the whole run: raise layer-fraction or the nodes' layer-budget"
            )
        super().check_rounds(nodes, budgets)

    def conclude(self, run: RunSetup) -> PreTrainedModel | None:
        model = super().conclude(run)
        run.report["layerwise"] = self.costs()
        return model

    def summary(self) -> None:
        log.info(
            "%s, layer-wise: calibration %s, resolve %s%s, %d layers in %d rounds of %d",
            self.rule,
            self.config.calibration,
            self.config.resolves,
            " (pipelined)" if self.config.resolve_pipelined and self.config.resolves else "",
            len(self.remaining),
            self.rounds,
            self.group,
        )
        if self.config.calibration == "global":
            log.info(
                "calibration='global': the clients prune on the federation's merged layers, so "
                "their replies are no standalone models; run strategy 'standalone' to compare"
            )

    # ----------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.assignments, self.steps, self.sent = {}, {}, []
        if server_round > self.rounds:
            return []
        step = self.plan[server_round - 1]
        self.accounting.start_round(server_round)
        connected = set(grid.get_node_ids())
        if self.owned is None:  # sample once: every node's layers for the whole run
            self.owned = self.assign_layers(sorted(connected))
        nodes = [n for n in self.owned if n in connected and n not in self.dropped]
        if not nodes:
            raise RuntimeError(f"no node that started the run is left for round {server_round}")
        self._cover(step.prune, nodes)
        down = self._global_payload(step.advance)
        messages = []
        for node in nodes:
            prune = tuple(layer for layer in step.prune if layer in self.owned[node])
            resolve = tuple(
                layer for layer in step.resolve if node in self.pruned_by.get(layer, [])
            )
            mine = step.for_node(prune, resolve)
            content = RecordDict(
                {
                    SPEC_KEY: request_record(
                        self.config, list(prune), self.layer_sparsities(prune)
                    ),
                    STEP_KEY: ConfigRecord(mine.as_dict()),
                }
            )
            # Deflating an ArrayRecord would pin a memoryview in it: count the configs only.
            sent = sum(len(record.deflate()) for record in content.values()) + len(down)
            if resolve:
                names = [n for layer in resolve for n in prunable_weights(self.model, layer)]
                masks = encode(None, {n: self.global_masks[n] for n in names})
                content[MASKS_KEY] = bytes_record(masks, MASKS_KEY)
                sent += len(masks)
            if down:
                content[GLOBAL_KEY] = bytes_record(down, GLOBAL_KEY)
            self.accounting.add_down(node, sent)
            self.assignments[node], self.steps[node] = list(prune), mine
            messages.append(
                Message(
                    content,
                    message_type=LAYERWISE_MESSAGE_TYPE,
                    dst_node_id=node,
                    group_id=str(server_round),
                )
            )
        self.accounting.assignments[server_round] = dict(self.assignments)
        log.info(
            "round %d/%d: prune %s, re-solve %s, hand down %s, %d nodes",
            server_round,
            self.rounds,
            list(step.prune),
            list(step.resolve),
            list(step.advance),
            len(messages),
        )
        self.sent = messages
        return messages

    def _cover(self, layers: Iterable[int], nodes: list[int]) -> None:
        """Give every layer of the group whose owners all dropped out to a live node."""
        for layer in layers:
            if not any(layer in self.owned[n] for n in nodes):
                load = {n: sum(1 for i in self.owned[n] if i in layers) for n in nodes}
                heir = min(nodes, key=lambda n: (load[n], self._name(n)))
                self.owned[heir] = sorted([*self.owned[heir], layer])
                log.warning("layer %d: its nodes dropped out; node %d prunes it", layer, heir)

    def _global_payload(self, layers: Iterable[int]) -> bytes:
        """The merged matrices of ``layers`` (their masks then leave the server's memory)."""
        names = [n for layer in layers for n in prunable_weights(self.model, layer)]
        if not names:
            return b""
        merged = {n: t for layer in layers for n, t in layer_tensors(self.model, layer).items()}
        masks = {n: self.global_masks.pop(n) for n in names}
        # Mask only where the clients rebuild the merged layer as dense * mask: a mask-only
        # pruner's l0 mean or fedprllm's pick is the dense values, fedavg's re-pruned mean is not.
        send = self.pruner.updates_weights or self.rule == "fedavg"
        values = {n: merged[n] for n in names} if send else None
        return encode(values, masks)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.steps:
            return None, None
        step = self.plan[server_round - 1]
        # Only the round's layers are in memory (a lazily loaded model): merged, then saved.
        with resident_layers(self.model, [*step.prune, *step.resolve]):
            return self._aggregate_step(server_round, step, replies)

    def _aggregate_step(
        self, server_round: int, step: RoundStep, replies: Iterable[Message]
    ) -> tuple[None, MetricRecord]:
        start = time.perf_counter()
        dense = {
            name: linear.weight.data
            for layer in step.prune
            for name, linear in prunable_weights(self.model, layer).items()
        }
        merger = MatrixMerger(
            self.rule,
            dense,
            self.pattern,
            self.generator,
            aggregation=self.config.aggregation,
            trim_fraction=self.config.trim_fraction,
            patterns=self.patterns,
        )
        resolve_names = self._resolve_names(step)
        for layer in step.resolve:
            self._read_dense_kept(layer)
        average = ResolveAverage(
            self.global_masks, resolve_names, self.config.aggregation, self.config.trim_fraction
        )
        answered: list[int] = []
        for node, (tensors, masks, values, norms) in self.accepted(
            server_round, replies, self._accept_round
        ):
            merger.add(tensors, masks, norms)
            average.add(*values)
            for layer in self.steps[node].prune:
                self.pruned_by.setdefault(layer, []).append(node)
            answered.append(node)
            del tensors, masks, values, norms  # streaming: one client's matrices at a time
        failed = set(self.steps) - set(answered)
        if failed:
            self.dropped |= failed
            log.warning("nodes %s left out of the later rounds", sorted(failed))
        self._merge_pruned(server_round, step, merger)
        self._merge_resolved(step, average)
        self.remaining = [layer for layer in self.remaining if not self._final(layer, server_round)]
        metrics = {
            "clients": len(answered),
            "rejected": len(failed),
            "layers-pruned": len(step.prune),
            "layers-resolved": len(step.resolve),
            "layers-pending": len(self.remaining),
            **self.accounting.round_bytes(server_round),
            "aggregation-seconds": round(time.perf_counter() - start, 3),
        }
        self.round_log.append({"round": server_round, **step.as_dict(), **metrics})
        return None, MetricRecord(metrics)

    def _final(self, layer: int, server_round: int) -> bool:
        """Whether ``layer`` holds its final values after ``server_round``."""
        done = self.plan[:server_round]
        if self.config.resolves:
            return any(layer in s.resolve for s in done)
        return any(layer in s.prune for s in done)

    def _accept_round(self, reply: Message, node: int, answered: list[int]):
        """Decode and validate one reply (pruned layers and re-solved values) completely."""
        screen(reply, node, self.steps, answered)
        tensors, masks, data = self._decode_pruned(reply, self.assignments[node])
        weighted = self.config.resolve_weighting == "hessian-diagonal"
        rows = self.global_masks.row_counts if self.config.int8_wire else lambda name: None
        expected = {
            name: Expected(
                self.global_masks.kept(name), linear.in_features if weighted else None, rows(name)
            )
            for layer in self.steps[node].resolve
            for name, linear in prunable_weights(self.model, layer).items()
        }
        pruned = {}  # with the values home: each pruned matrix's Σ x_j², no values
        if self.config.sends_column_norms:
            pruned = {
                name: Expected(0, linear.in_features)
                for layer in self.steps[node].prune
                for name, linear in prunable_weights(self.model, layer).items()
            }
        limit = self.config.reply_limit(values_limit({**expected, **pruned}))
        resolved = reply_bytes(reply, RESOLVED_KEY, max_bytes=limit)
        values = decode_values(resolved, {**expected, **pruned}, max_bytes=limit)
        norms = {name: values[1].pop(name) for name in pruned}
        for name in pruned:
            del values[0][name]
        for name, kept in values[0].items():
            self.check_plausible(name, kept, self.dense_kept[name])
        up = len(data) + len(resolved)
        self.accounting.add_up(node, up)
        metrics = reply_metrics(reply)
        self.accounting.add_metrics(node, metrics)
        if self.config.clients_score_standalone:  # its own values stayed on it, or went int8
            self.reported.take(node, self.config, metrics)
        if self._stores_replies and self.config.calibration == "local" and masks:
            # local: the pruned layers form the node's standalone model
            store_reply(self.reply_dir, self.reply_files, node, data)
        return tensors, masks, values, norms

    def _merge_pruned(self, server_round: int, step: RoundStep, merger: MatrixMerger) -> None:
        """l0 aggregation + expansion of the round's pruned group: the masks are now fixed."""
        missing = [layer for layer in step.prune if not self.pruned_by.get(layer)]
        if missing:
            reasons = sorted({f"node {r['node']}: {r['reason']}" for r in self.accounting.rejected})
            raise RuntimeError(
                f"layers {missing} were not pruned by any valid client in round {server_round}, "
                f"and the later rounds cannot go on without them; rejected replies: "
                f"{'; '.join(reasons) or 'none'}"
            )
        for layer in step.prune:
            for name, linear in prunable_weights(self.model, layer).items():
                merged, keep = merger.finish(name)
                if self._keeps_dense_values:  # the dense values, about to be overwritten
                    self.dense_kept[name] = linear.weight.data[keep].clone()  # bounds re-solves
                linear.weight.data.copy_(merged)
                if self.config.resolves or self.config.calibration == "global":
                    self.global_masks[name] = keep

    def _merge_resolved(self, step: RoundStep, average: ResolveAverage) -> None:
        """Each kept entry: the (weighted) mean of the clients' re-solved values."""
        for layer in step.resolve:
            for name, linear in prunable_weights(self.model, layer).items():
                keep = self.global_masks[name]
                mean = average.finish(name, self.dense_kept.pop(name))
                if mean is None:
                    log.warning("%s: no valid re-solve reply; it keeps its l0-merged values", name)
                else:
                    linear.weight.data.zero_()
                    linear.weight.data[keep] = kept_nonzero(mean.to(linear.weight.dtype))
                if self.config.calibration == "local":
                    del self.global_masks[name]  # nothing is handed down in local calibration

    @property
    def _stores_replies(self) -> bool:
        """Whether the pruned layers' replies go to disk: asked for (``keep-replies``), or the
        server scores the members' models (``standalone-eval`` where they score none); not
        otherwise, where they would be written only to be deleted (7.8 GB at 7B, 2 clients)."""
        if self.reply_dir is None:
            return False
        server_scores = self.config.standalone_eval and not self.config.clients_score_standalone
        return self.config.keep_replies or self.rule == "standalone" or server_scores

    @property
    def _keeps_dense_values(self) -> bool:
        """Whether a pruned layer's dense kept values are copied at its merge, to bound its
        re-solve replies later: only where nothing else has them. A lazily loaded model reads
        them back from its checkpoint at the re-solve, so the server's memory does not grow
        with every layer pruned and not yet re-solved (all of them, in local calibration)."""
        return (
            self.config.resolves
            and self.config.sends_pruned_values
            and layer_store(self.model) is None
        )

    def _read_dense_kept(self, layer: int) -> None:
        """``dense_kept`` of ``layer``'s matrices for its re-solve round, where its merge did not
        keep them: from the checkpoint (the layer now holds merged values), or from the layer,
        which holds dense * mask since its prune round when the replies carried no values."""
        store = layer_store(self.model)
        from_checkpoint = self.config.sends_pruned_values and store is not None
        dense = store.tensors(layer, original=True) if from_checkpoint else None
        for name, linear in prunable_weights(self.model, layer).items():
            if name not in self.dense_kept:
                values = dense[name] if dense is not None else linear.weight.data
                self.dense_kept[name] = values[self.global_masks[name]]

    def _resolve_names(self, step: RoundStep) -> list[str]:
        return list(self._resolve_linears(step))

    def _resolve_linears(self, step: RoundStep) -> dict:
        return {
            n: m for layer in step.resolve for n, m in prunable_weights(self.model, layer).items()
        }

    def costs(self) -> dict:
        """The ``layerwise`` section of the report: the plan and what each round did."""
        return {
            "calibration": self.config.calibration,
            "resolve": self.config.resolves,
            "resolve-pipelined": self.config.resolve_pipelined,
            "layers-per-round": self.group,
            "memory-budget-gb": self.config.memory_budget_gb,
            "rounds": self.rounds,
            "dropped": sorted(self.dropped),
            "per_round": self.round_log,
        }
