"""A client's round of a layer-wise FedSpaLLM run, without Flower (see ``round_plan.py``).

The message names this node's part of one :class:`RoundStep`: where to start (its shard, or
the inputs it kept last round), the merged global layers to advance through, the layers to
re-solve under the global masks it carries, and the layers to prune. The node runs its
calibration inputs through the layers in order, doing each layer's part, and replies with the
pruned layers (values and masks, as in one-shot FedSpaLLM; masks only when the re-solve
replaces the values, with each pruned matrix's input energy per column for the server's
tie-break) and the re-solved values (values only: the server knows the masks).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from client_app.own_model import own_model_scores
from client_app.running_inputs import (
    apply_global_layers,
    remove_activations,
    resume,
    save_activations,
    state_dir,
)
from client_app.task import all_weights, encode_pruned, wire_values
from fedspallm_strategy.config import NodeConfig, RunConfig, load_shard, node_device
from fedspallm_strategy.wire.payload import decode
from fedspallm_strategy.wire.payload_spec import validate_layer
from fedspallm_strategy.wire.round_plan import RoundStep
from fedspallm_strategy.wire.values_payload import encode_values, kept_values
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import release_layer
from llm_pruning.models import load_model
from llm_pruning.owl import profile_patterns
from llm_pruning.pruners import get_pruner

log = logging.getLogger(__name__)

STATE_KIND = "layerwise"  # the cache-dir folder this strategy's running inputs live in


@dataclass
class LayerwiseReply:
    payload: bytes  # the pruned layers (payload.encode)
    resolved: bytes  # the re-solved values (values_payload.encode_values)
    metrics: dict[str, float | int]


def given_masks(model, data: bytes | None, layers: list[int]) -> dict[str, torch.Tensor]:
    """The server's global keep-masks for the layers this node re-solves, checked."""
    if not layers:
        return {}
    if data is None:
        raise ValueError(f"the message asks to re-solve layers {layers} but carries no masks")
    _, masks = decode(data)
    expected = {
        name: tuple(linear.weight.shape)
        for layer in layers
        for name, linear in prunable_weights(model, layer).items()
    }
    validate_layer({}, masks, expected, require_values=False)
    return masks


def run_round(
    config: RunConfig,
    node: NodeConfig,
    step: RoundStep,
    *,
    run_id: int,
    masks: bytes | None = None,
    global_layers: bytes | None = None,
    sparsities: dict[int, float] | None = None,
) -> LayerwiseReply:
    """Do this node's part of ``step`` (its prune and re-solve layers only) and encode it.

    Parameters
    ----------
    step
        This node's share of the round: ``prune`` and ``resolve`` hold its own layers.
    masks
        Mask-only payload of the global keep-masks of ``step.resolve``.
    global_layers
        Payload of the merged global matrices of ``step.advance``.
    sparsities
        Layer -> sparsity of ``step.prune`` under the run's owl profile (None: uniform).
    """
    start_time = time.perf_counter()
    cache = Path(node.cache_dir).expanduser() if node.cache_dir else None
    # Lazy: one decoder layer in memory at a time, plus the pruned ones until encoded.
    model, tokenizer = load_model(
        config.model, dtype=config.torch_dtype, cache=cache, lazy=True, ignore=config.ignore
    )
    pruner, pattern = get_pruner(config.pruner), config.sparsity_pattern
    rebuild = config.reconstruction
    device = node_device(config, node)
    folder = state_dir(node, run_id, STATE_KIND)
    if step.start == 0:  # the inputs entering layer 0 come from the shard itself
        calibrator = LayerwiseCalibrator(model, load_shard(config, node, tokenizer), device)
    else:
        calibrator = resume(model, folder, device, step.start)
    if step.advance:
        if global_layers is None:
            raise ValueError(
                f"the message names global layers {list(step.advance)} but no matrices"
            )
        apply_global_layers(
            model, global_layers, step.advance, require_values=pruner.updates_weights
        )
    fixed = given_masks(model, masks, list(step.resolve))
    patterns = None if sparsities is None else profile_patterns(model, sparsities, step.prune)
    total = num_layers(model)
    end = min(step.end, total)
    pruned_masks: dict[str, torch.Tensor] = {}
    resolved: dict[str, torch.Tensor] = {}
    column_weights: dict[str, torch.Tensor] = {}  # diag H: re-solved (weighted) or pruned
    int8_masks: dict[str, torch.Tensor] = {}  # payload-dtype int8: re-solved values' masks
    for index in range(step.start, end):
        if index == step.keep_from and index > 0:
            save_activations(folder, calibrator.hidden, index)
        if index in step.resolve:
            layer_masks = {name: fixed[name] for name in prunable_weights(model, index)}
            stats = calibrator.statistics(index, pruner)
            calibrator.prune_layer(
                index, pruner, pattern, stats, keep_masks=layer_masks, reconstruction=rebuild
            )
            resolved.update(kept_values(wire_values(model, layer_masks, config), layer_masks))
            if config.int8_wire:  # the encoder quantises them per row of their mask
                int8_masks.update(layer_masks)
            if config.resolve_weighting == "hessian-diagonal":
                column_weights.update({n: stats[n].xtx.diagonal() for n in layer_masks})
            log.info("layer %d/%d re-solved under the global mask", index + 1, total)
        elif index in step.prune:
            stats = calibrator.statistics(index, pruner)
            layer_masks = calibrator.prune_layer(
                index, pruner, pattern, stats, patterns=patterns, reconstruction=rebuild
            )
            pruned_masks.update(layer_masks)
            if config.sends_column_norms:  # the server's tie-break, in place of the values
                empty = torch.zeros(0, dtype=torch.float16)
                resolved.update({name: empty for name in layer_masks})
                column_weights.update({name: stats[name].xtx.diagonal() for name in layer_masks})
            log.info("layer %d/%d pruned (%s, %s)", index + 1, total, pruner.name, pattern)
        if index + 1 < end or step.keep_from == end:
            calibrator.advance(index)
        if index in step.resolve:
            release_layer(model, index)  # its values are in `resolved` (and advanced through)
    if step.keep_from is None:
        remove_activations(folder)
    elif step.keep_from == end and end > 0:
        save_activations(folder, calibrator.hidden, end)
    own = {}
    if config.clients_score_standalone and len(pruned_masks) == len(all_weights(model)):
        own = own_model_scores(model, tokenizer, config, node, device)
    payload = encode_pruned(model, pruned_masks, config)
    resolved_payload = encode_values(resolved, column_weights, int8_masks=int8_masks)
    metrics = {
        "num-examples": int(calibrator.hidden.shape[0]),
        "layers": len(step.prune),
        "layers-resolved": len(step.resolve),
        "payload-bytes": len(payload) + len(resolved_payload),
        "seconds": round(time.perf_counter() - start_time, 3),
        **{f"seconds-{stage}": value for stage, value in calibrator.timings.as_dict().items()},
        **own,
    }
    return LayerwiseReply(payload, resolved_payload, metrics)
