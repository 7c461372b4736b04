"""Federated recovery: rounds after pruning in which the clients fine-tune the global sparse
model on their own shards, keeping its zeros, and the server averages what they changed.

Each recovery round (``recovery-rounds`` of them, numbered after the strategy's own rounds):

1. Down: the global model's pruned matrices, mask and kept values in the model's dtype, to
   every node (``GLOBAL_KEY``). The whole model each round, not the change since the last:
   a node that missed a round, or a fresh ClientApp process, starts from the same model, and
   every node's copy is bit-identical to the server's.
2. On the node (``client_app/recovery_task.py``): ``recovery-steps`` AdamW steps on
   ``recovery-samples`` windows of its private shard: the round's own with
   ``recovery-windows=fresh`` (``RECOVERY_KEY`` says which round), the same every round with
   ``same``. ``llm_pruning/recovery.py`` trains: ``masked`` the kept weights, ``lora``
   adapters merged under the mask. Up: the change of every kept value, in the mask's
   row-major order, as a values payload (``DELTAS_KEY``) in the wire dtype: no mask bits,
   the server knows the masks.
3. The server checks every reply like any other (the funnel of :meth:`accepted`: error,
   unasked or duplicate reply, size, declared counts, finite values, then plausibility) and
   adds the mean change to its model. Every client trained on as many tokens as the others
   (``steps x batch x seqlen``, set by the run config, not claimed by the client), so the
   token-weighted mean is the plain mean; ``aggregation='median' | 'trimmed-mean'`` takes the
   per-entry robust centre instead, holding every reply's changes at once.

Plausibility. ``masked``: AdamW (no weight decay, betas 0.9/0.999) moves an entry by at most
``lr x (1 - beta1) / sqrt(1 - beta2) ~ 3.16 lr`` a step (Kingma & Ba, section 2.1), so a change
over ``ADAM_STEP_BOUND x lr x steps`` is not an honest client's. ``lora``: the merged update
has no such bound; the matrix and per-entry bounds of :mod:`merge.plausibility` apply with
``max-relative-change`` as the matrix bound (a change as large as the matrix itself).

The model keeps exactly its sparsity: only kept entries change, and a kept entry that would
average to exactly 0 stays the dtype's least normal number (``merging.kept_nonzero``).

``centralized`` has no clients: the server fine-tunes its pruned model on the pooled windows
of every shard with the same settings (:func:`recover_centrally`), the upper bound.

Memory: the server holds the pruned model's matrices, and one float32 sum per kept weight
(the robust rules: one per kept weight per reply), whatever ``memory-budget-gb`` says.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedspallm_strategy.config import RunConfig, load_recovery_shard
from fedspallm_strategy.config.run_config import RECOVERY_BATCH
from fedspallm_strategy.merge.aggregation import robust_centre
from fedspallm_strategy.merge.merging import kept_nonzero
from fedspallm_strategy.merge.plausibility import check_kept_values
from fedspallm_strategy.wire.int8_values import row_counts
from fedspallm_strategy.wire.payload import encode
from fedspallm_strategy.wire.protocol import (
    DELTAS_KEY,
    GLOBAL_KEY,
    RECOVERY_KEY,
    RECOVERY_MESSAGE_TYPE,
    SPEC_KEY,
    bytes_record,
    request_record,
)
from fedspallm_strategy.wire.replies import RejectedReply, reply_bytes, reply_metrics, screen
from fedspallm_strategy.wire.values_payload import Expected, decode_values, values_limit
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import layer_tensors, update_layer
from llm_pruning.recovery import recover, sparsity_masks, teacher_targets

log = logging.getLogger(__name__)

# A masked-recovery entry may move this x lr a step: AdamW's own bound is 3.16 (see above).
ADAM_STEP_BOUND = 4.0


def global_matrices(model) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every pruned matrix of the server's model and its keep-mask (``weight != 0``)."""
    values, masks = {}, {}
    for layer in range(num_layers(model)):
        tensors = layer_tensors(model, layer)
        for name in prunable_weights(model, layer):
            values[name] = tensors[name]
            masks[name] = tensors[name] != 0
    return values, masks


def change_limit(config: RunConfig) -> float:
    """The most a ``masked`` client may move one entry in a round (see the module)."""
    return ADAM_STEP_BOUND * config.recovery_learning_rate * config.recovery_steps


def check_deltas(
    config: RunConfig, deltas: Mapping[str, Tensor], kept: Mapping[str, Tensor]
) -> None:
    """Refuse changes no honest client makes (see the module docstring)."""
    for name, delta in deltas.items():
        if config.recovery_method == "masked":
            moved = float(delta.abs().max()) if delta.numel() else 0.0
            if not moved <= change_limit(config):
                raise RejectedReply(
                    f"{name}: a kept value moved by {moved:.3g}; {config.recovery_steps} AdamW "
                    f"steps at lr {config.recovery_learning_rate:g} move one by at most "
                    f"{change_limit(config):.3g}"
                )
        else:
            before = kept[name].float()
            # The unstructured per-entry factor even under N:M: the wider N:M factor is for
            # SparseGPT's compensation piling onto the few kept entries of a group, and
            # fine-tuning compensates for nothing.
            check_kept_values(name, before + delta.float(), before, config.max_relative_change)


class DeltaMean:
    """The clients' changes of each matrix's kept values, combined by the run's rule."""

    def __init__(self, config: RunConfig):
        self.rule, self.trim = config.aggregation, config.trim_fraction
        self.sums: dict[str, Tensor] = {}
        self.stacks: dict[str, list[Tensor]] = {}
        self.count = 0

    def add(self, deltas: Mapping[str, Tensor]) -> None:
        for name, delta in deltas.items():
            if self.rule == "mean":
                total = self.sums.get(name)
                self.sums[name] = delta.float() if total is None else total.add_(delta.float())
            else:
                self.stacks.setdefault(name, []).append(delta.float())
        self.count += 1

    def result(self) -> dict[str, Tensor]:
        if self.rule == "mean":
            return {name: total / self.count for name, total in self.sums.items()}
        return {
            name: robust_centre(torch.stack(stack), self.rule, self.trim).float()
            for name, stack in self.stacks.items()
        }


def apply_mean(model, mean: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> float:
    """Add the combined changes to the server's model, layer by layer; returns the largest
    relative change of a matrix (for the report)."""
    largest = 0.0
    for layer in range(num_layers(model)):
        tensors = layer_tensors(model, layer)
        updated = {}
        for name in prunable_weights(model, layer):
            weight, keep = tensors[name], masks[name]
            before = weight[keep].float()
            after = kept_nonzero((before + mean[name]).to(weight.dtype))
            scale = before.norm().item()
            largest = max(largest, (after.float() - before).norm().item() / max(scale, 1e-30))
            updated[name] = torch.zeros_like(weight).masked_scatter_(keep, after)
        update_layer(model, layer, updated)
    return largest


def run_recovery_rounds(
    strategy,
    grid: Grid,
    timeout: float,
    evaluate: Callable[[], dict] | None = None,
    play: Callable[..., dict] | None = None,
) -> list[dict]:
    """The recovery rounds of ``strategy``'s run; returns each round's report entry, with
    ``evaluate()`` (the model's perplexities) after each round that changed the model.

    ``play(strategy, grid, timeout, server_round)`` runs one round (default: plain replies;
    ``secure_recovery.py`` passes its SecAgg+ round). A round with no valid reply leaves the
    model as it was (logged and reported); the run goes on.
    """
    play = play or _recovery_round
    first = strategy.rounds + 1
    rounds = []
    for server_round in range(first, first + strategy.config.recovery_rounds):
        entry = play(strategy, grid, timeout, server_round)
        if evaluate is not None and entry["clients"]:
            entry["perplexity"] = evaluate()
        rounds.append(entry)
    return rounds


def recovery_requests(
    strategy,
    server_round: int,
    nodes: list[int],
    values: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
) -> list[Message]:
    """The round's request to each of ``nodes``: the whole global model (``values`` and
    ``masks`` of :func:`global_matrices`) and the recovery round's number; bytes down are
    accounted."""
    config, accounting = strategy.config, strategy.accounting
    down = encode(values, masks)
    messages = []
    for node in nodes:
        content = RecordDict(
            {
                SPEC_KEY: request_record(config, []),
                # which of its recovery windows a node trains on (recovery-windows=fresh)
                RECOVERY_KEY: ConfigRecord({"round": server_round - strategy.rounds}),
                GLOBAL_KEY: bytes_record(down, GLOBAL_KEY),
            }
        )
        accounting.add_down(node, len(down) + len(content[SPEC_KEY].deflate()))
        messages.append(
            Message(
                content,
                message_type=RECOVERY_MESSAGE_TYPE,
                dst_node_id=node,
                group_id=str(server_round),
            )
        )
    strategy.assignments = {node: [] for node in nodes}
    accounting.assignments[server_round] = dict(strategy.assignments)
    strategy.sent = messages
    return messages


def _recovery_round(strategy, grid: Grid, timeout: float, server_round: int) -> dict:
    config, model, accounting = strategy.config, strategy.model, strategy.accounting
    accounting.start_round(server_round)
    values, masks = global_matrices(model)
    messages = recovery_requests(strategy, server_round, sorted(grid.get_node_ids()), values, masks)
    kept = {name: values[name][masks[name]] for name in masks}
    del values
    expected = {
        name: Expected(int(mask.sum()), row_counts=row_counts(mask) if config.int8_wire else None)
        for name, mask in masks.items()
    }
    limit = values_limit(expected)
    log.info("recovery round %d: fine-tuning on %d nodes", server_round, len(messages))
    replies = grid.send_and_receive(messages, timeout=timeout)
    mean, metrics = DeltaMean(config), []

    def accept(reply: Message, node: int, answered: list[int]) -> None:
        screen(reply, node, strategy.assignments, answered)
        data = reply_bytes(reply, DELTAS_KEY, max_bytes=limit)
        deltas, _ = decode_values(data, expected, max_bytes=limit)
        check_deltas(config, deltas, kept)
        mean.add(deltas)
        accounting.add_up(node, len(data))
        metrics.append(reply_metrics(reply))
        accounting.add_metrics(node, metrics[-1])

    for _ in strategy.accepted(server_round, replies, accept):
        pass
    entry = {"round": server_round, "clients": mean.count}
    if mean.count:
        entry["largest-relative-change"] = round(apply_mean(model, mean.result(), masks), 6)
        entry.update(_loss_summary(metrics))
    else:
        log.warning("recovery round %d: no valid reply; the model is unchanged", server_round)
    return entry


def _loss_summary(metrics: list[dict]) -> dict:
    """The clients' mean training loss at their first and last step."""
    summary = {}
    for key in ("loss-first", "loss-last"):
        seen = [m[key] for m in metrics if key in m]
        if seen:
            summary[key] = round(sum(seen) / len(seen), 4)
    return summary


def recover_centrally(model, config: RunConfig, tokenizer, node_configs) -> dict:
    """``centralized`` + recovery: the server fine-tunes its pruned model on every shard's
    recovery windows pooled, every round's (simulation only, like the pruning); returns the
    report entry."""
    from llm_pruning.models import load_model  # an eager copy: recovery trains a whole model

    ordered = sorted(node_configs.values(), key=lambda nc: nc.name)
    windows = torch.cat([load_recovery_shard(config, nc, tokenizer) for nc in ordered])
    # As many steps as the federation's rounds take, each on every shard's share of a batch:
    # the federated mean of K clients' steps is close to one step on a K-times larger batch.
    settings = dataclasses.replace(
        config.recovery_settings,
        steps=config.recovery_steps * config.recovery_rounds,
        batch_size=min(RECOVERY_BATCH * len(ordered), int(windows.shape[0])),
    )
    eager, _ = load_model(config.model, dtype=config.torch_dtype, ignore=config.ignore)
    teacher = teacher_targets(eager, windows, settings, config.device)  # still dense
    values, masks = global_matrices(model)
    for layer in range(num_layers(eager)):
        update_layer(eager, layer, {n: values[n] for n in prunable_weights(eager, layer)})
    del values
    result = recover(eager, windows, settings, device=config.device, teacher=teacher)
    if sparsity_masks(eager).keys() != masks.keys():
        raise RuntimeError("centralized recovery: the eager copy names other matrices")
    largest = apply_mean(model, result.deltas, masks)
    losses = result.losses
    return {
        "steps": settings.steps,
        "windows": int(windows.shape[0]),
        "largest-relative-change": round(largest, 6),
        "loss-first": round(losses[0], 4),
        "loss-last": round(losses[-1], 4),
        "seconds": round(result.seconds, 3),
    }
