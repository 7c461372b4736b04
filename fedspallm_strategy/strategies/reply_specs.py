"""What a pruned-layers reply must hold, known before it is read: the server checks every reply
against it, and refuses before any work a run whose replies could not fit ``max-payload-mb``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from transformers import PreTrainedModel

from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.wire.payload_spec import MatrixSpec, payload_limit
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.pruners import SparsityPattern


def matrix_specs(
    model,
    layers: Iterable[int],
    config: RunConfig,
    patterns: Mapping[str, SparsityPattern] | None = None,
) -> dict[str, MatrixSpec]:
    """What a reply that prunes ``layers`` holds: the exact names, shapes, counts and value
    dtype (``RunConfig.wire_dtype``; none when the values stay home, see
    ``RunConfig.sends_pruned_values``), known before it is read. ``patterns`` (weight name ->
    pattern) overrides the run's per matrix (owl)."""
    patterns = patterns or {}
    values = config.sends_pruned_values
    return {
        name: MatrixSpec(
            tuple(linear.weight.shape),
            patterns.get(name, config.sparsity_pattern),
            config.wire_dtype(linear.weight.dtype) if values else None,
        )
        for layer in layers
        for name, linear in prunable_weights(model, layer).items()
    }


def check_payload_cap(config: RunConfig, model: PreTrainedModel, budget: int) -> None:
    """Refuse a run whose largest reply would exceed ``max-payload-mb`` before any work: the
    server would reject it only after the client pruned. A node prunes at most ``budget``
    layers in a round (its share, at most a round's group of layers)."""
    total = num_layers(model)
    layers = min(budget, total)
    densest = None  # owl: no layer keeps more than at target - lambda (and its rounding)
    if config.sparsity_profile == "owl":
        lowest = SparsityPattern(max(0.0, config.sparsity - config.owl_lambda - 0.01))
        densest = {name: lowest for i in range(total) for name in prunable_weights(model, i)}
    per_layer = max(payload_limit(matrix_specs(model, [i], config, densest)) for i in range(total))
    largest = per_layer * layers
    if largest > config.max_payload_mb * 2**20:
        raise ConfigError(
            f"max-payload-mb={config.max_payload_mb:g}: a node's reply of {layers} layer(s) would "
            f"be up to {largest / 2**20:.1f} MiB ({per_layer / 2**20:.2f} MiB per layer); raise "
            f"max-payload-mb, or set layers-per-round (a reply then carries one group of layers)"
        )
