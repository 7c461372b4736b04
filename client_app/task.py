"""What a client does, without Flower: load the model and its private shard, prune, encode.

Kept apart from ``app.py`` (the Flower wiring) so it can be called and tested directly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from client_app.own_model import own_model_scores
from fedspallm_strategy.config import NodeConfig, RunConfig, load_shard, node_device
from fedspallm_strategy.wire.payload import encode
from llm_pruning.engine import prune_model
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.models import load_model
from llm_pruning.owl import profile_model, profile_patterns
from llm_pruning.pruners import get_pruner

log = logging.getLogger(__name__)


@dataclass
class PruneReply:
    payload: bytes
    metrics: dict[str, float | int]
    sparsities: dict[int, float] | None = None  # owl: the layers' sparsities it pruned to


def wire_values(model, names, config: RunConfig) -> dict[str, torch.Tensor]:
    """The named matrices of ``model`` as the encoders take them (:func:`to_wire`)."""
    weights = dict(model.named_parameters())
    return {
        name: to_wire(weights[name].data, config.wire_dtype(weights[name].dtype)) for name in names
    }


def to_wire(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in wire ``dtype``, where a nonzero value stays nonzero: float16 flushes values
    under 2^-25 to 0, which the server would read as pruned. They go as float16's least value
    instead, off by under 6e-8. For int8, ``weight`` as it is: the encoder quantises it per row
    of its mask (``encode(..., int8=True)``, ``encode_values(..., int8_masks=...)``)."""
    if dtype == torch.int8:
        return weight
    cast = weight.to(dtype)
    if dtype == torch.float16:
        least = torch.tensor(2.0**-24, dtype=dtype, device=weight.device)
        flushed = (cast == 0) & (weight != 0)
        cast = torch.where(flushed, torch.copysign(least, weight.to(dtype)), cast)
    return cast


def encode_pruned(model, masks: dict[str, torch.Tensor], config: RunConfig) -> bytes:
    """The payload of pruned matrices: kept values and mask, or the mask alone when the values
    stay home (``RunConfig.sends_pruned_values``: a mask-only pruner's are the dense ones the
    server holds; the re-solve replaces the prune round's)."""
    values = wire_values(model, masks, config) if config.sends_pruned_values else None
    return encode(values, masks, int8=config.int8_wire)


def all_weights(model) -> list[str]:
    return [name for index in range(num_layers(model)) for name in prunable_weights(model, index)]


def prune_layers(
    config: RunConfig,
    node: NodeConfig,
    layer_ids: list[int],
    sparsities: dict[int, float] | None = None,
) -> PruneReply:
    """Prune ``layer_ids`` of the shared dense model on this node's shard; encode the result.

    ``sparsities`` (layer -> sparsity) is the federation's owl profile; an owl run without
    one (strategy ``standalone``) prunes to the profile of this node's own shard.

    The model loads lazily: one decoder layer in memory at a time, plus the pruned ones
    (pinned by the engine) until they are encoded.
    """
    start = time.perf_counter()
    cache = Path(node.cache_dir).expanduser() if node.cache_dir else None
    model, tokenizer = load_model(
        config.model, dtype=config.torch_dtype, cache=cache, lazy=True, ignore=config.ignore
    )
    pruner = get_pruner(config.pruner)
    segments = load_shard(config, node, tokenizer)
    log.info(
        "pruning %d of %d layers on %d segments of %d tokens",
        len(layer_ids),
        num_layers(model),
        segments.shape[0],
        segments.shape[1],
    )
    device = node_device(config, node)
    if sparsities is None and config.sparsity_profile == "owl":
        own = profile_model(
            model,
            segments,
            target=config.sparsity,
            lam=config.owl_lambda,
            owl_m=config.owl_m,
            device=device,
        )
        sparsities = {layer: own.sparsities[layer] for layer in layer_ids}
    patterns = None if sparsities is None else profile_patterns(model, sparsities, layer_ids)
    result = prune_model(
        model,
        segments,
        pruner,
        config.sparsity_pattern,
        layer_ids=layer_ids,
        device=device,
        patterns=patterns,
        reconstruction=config.reconstruction,
    )
    own = {}
    if config.clients_score_standalone and len(result.masks) == len(all_weights(model)):
        own = own_model_scores(model, tokenizer, config, node, device)
    payload = encode_pruned(model, result.masks, config)
    metrics = {
        "num-examples": int(segments.shape[0]),
        "tokens": int(segments.numel()),
        "layers": len(layer_ids),
        "payload-bytes": len(payload),
        "seconds": round(time.perf_counter() - start, 3),
        **{f"seconds-{stage}": value for stage, value in result.timings.as_dict().items()},
        **own,
    }
    return PruneReply(payload, metrics, sparsities)
