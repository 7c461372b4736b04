"""How many decoder layers a layer-wise round takes: as many as fit ``memory-budget-gb``.

With ``layers-per-round=0`` and local calibration, the server sizes each round's group of
consecutive layers from the model's shapes, so a run of any model size is bounded without a
setting (global calibration walks one layer a round already). What a round holds, per layer of
its group (``d`` weights in its prunable matrices, ``k`` of them kept):

- the layer itself, pinned while its replies are merged (every parameter, the model's dtype);
- a prune round: the keep votes (int16, ``2d``) and one client's decoded reply at a time (a
  bool mask, ``d``); when values travel, also their running l0 sum (float32 for 16-bit models,
  float64 else) and the reply's values, or under a robust rule every client's matrix (K x d
  values in the model's dtype);
- a re-solve round: the dense values under the global masks that replies are checked against
  (``k`` in the model's dtype), one reply's values (``k`` as decoded, and its int8 codes), one
  matrix's mask unpacked at a time, and the re-solve merger's own state
  (:func:`resolve_state_bytes`; a buffered rule's K replies, and the largest of its
  one-matrix-at-a-time finishes).

A reply's values are decoded in their wire dtype, or from int8 codes (a byte each, with a scale
per row) to float32: 4 bytes a value, as the merger holds them.

Fixed, whatever the group: the parameters outside the decoder layers (resident on a lazy
model) and every layer's global masks between its prune and re-solve rounds, bit-packed (``d/8``).
It is an estimate of tensors, not a measured peak: the process itself (Python, torch, Flower)
comes on top, which is why the default budget leaves room under the 8 GB a role may take.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import PreTrainedModel

from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.merge.resolve_average import resolve_state_bytes
from llm_pruning.families import family_of, num_layers, prunable_weights

log = logging.getLogger(__name__)

_GIB = 2**30


def _layer(model: PreTrainedModel, index: int):
    return family_of(model).layers_of(model)[index]


def _kept_fraction(config: RunConfig) -> float:
    """The largest share of a matrix kept (owl: a layer keeps up to target - lambda more)."""
    lowest = config.sparsity - (config.owl_lambda if config.sparsity_profile == "owl" else 0.0)
    return 1.0 - max(0.0, lowest)


def layer_bytes(model: PreTrainedModel, layer: int, config: RunConfig, clients: int) -> int:
    """The server's bytes for ``layer`` while its round is merged (module docstring)."""
    weights = prunable_weights(model, layer)
    model_size = next(iter(weights.values())).weight.element_size()
    resident = sum(p.numel() for p in _layer(model, layer).parameters()) * model_size
    d = sum(linear.weight.numel() for linear in weights.values())
    wire = _decoded_bytes(config, next(iter(weights.values())).weight.dtype)
    prune = 2 * d + d
    if config.sends_pruned_values:
        if config.aggregation == "mean":
            prune += d * (4 if model_size == 2 else 8) + d * wire
        else:
            prune += clients * d * model_size
    resolve = _resolve_bytes(weights, config, clients, model_size, wire) if config.resolves else 0
    return resident + max(prune, resolve)


def _decoded_bytes(config: RunConfig, model_dtype: torch.dtype) -> int:
    """Bytes a reply's value takes once decoded: its wire dtype's, or float32's for int8."""
    return 4 if config.int8_wire else config.wire_dtype(model_dtype).itemsize


def _resolve_bytes(weights: dict, config: RunConfig, clients: int, model_size: int, wire: int):
    """A re-solve round's bytes for one layer's matrices: per kept weight the dense value the
    replies are checked against and one reply's value; one matrix's mask unpacked at a time;
    the merger's state. A buffered rule holds every matrix's K replies but finishes (stacks
    them) one matrix at a time, so only the largest finish counts."""
    weighted = config.resolve_weighting == "hessian-diagonal"
    shares = {
        name: (math.ceil(linear.weight.numel() * _kept_fraction(config)), linear.in_features)
        for name, linear in weights.items()
    }
    total = max(linear.weight.numel() for linear in weights.values())  # one unpacked mask
    finishes = [0]
    for kept, columns in shares.values():
        codes = 1 if config.int8_wire else 0  # one reply's codes, while they are decoded
        total += kept * (model_size + wire + codes)
        state = resolve_state_bytes(
            kept, columns, clients, config.aggregation, weighted, value_bytes=wire
        )
        if config.aggregation == "mean" and not weighted:
            total += state
            continue
        held = clients * (wire * kept + (4 * columns if weighted else 0))
        total += held
        finishes.append(state - held)
    return total + max(finishes)


def fixed_bytes(model: PreTrainedModel) -> int:
    """Bytes held whatever the group: parameters outside the layers, every packed mask."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = range(num_layers(model))
    inside = sum(
        p.numel() * p.element_size() for i in layers for p in _layer(model, i).parameters()
    )
    masks = sum(
        math.ceil(linear.weight.numel() / 8)
        for i in layers
        for linear in prunable_weights(model, i).values()
    )
    return total - inside + masks


def planned_layers_per_round(model: PreTrainedModel, config: RunConfig, clients: int) -> int:
    """``layers-per-round`` when set; else (local calibration) the most layers whose round
    fits ``memory-budget-gb``, at least one; global calibration walks one layer a round."""
    if config.layers_per_round or config.calibration == "global":
        return config.layers_per_round or 1
    total = num_layers(model)
    per_layer = max(layer_bytes(model, i, config, clients) for i in range(total))
    room = config.memory_budget_gb * _GIB - fixed_bytes(model)
    group = max(1, min(total, int(room // per_layer)))
    if room < per_layer:
        log.warning(
            "memory-budget-gb=%g holds no layer's round (%.2f GiB fixed, %.2f GiB a layer): "
            "one layer a round",
            config.memory_budget_gb,
            fixed_bytes(model) / _GIB,
            per_layer / _GIB,
        )
    return group
