"""What an ``exact`` run will send, known before any node works: its shared-input groups, its
rounds, and each client's statistics bytes against ``max-stats-mb``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.wire.secure_encoding import masked_bytes, vector_lengths
from fedspallm_strategy.wire.stats_payload import (
    kind_of,
    statistics_nbytes,
)
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.families import family_of, num_layers, prunable_weights
from llm_pruning.pruners import Pruner, get_pruner, num_to_prune

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
