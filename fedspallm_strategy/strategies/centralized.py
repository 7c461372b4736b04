"""The centralized upper bound: one pruner on every client's shard, pooled on the server.

Simulation only (the server reads the shards itself): what privacy forbids, and what
``exact`` must equal and ``fedspallm`` approaches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from transformers import PreTrainedModel

from fedspallm_strategy.config import NodeConfig, RunConfig, load_shard
from fedspallm_strategy.strategies.base import ServerEvaluated
from llm_pruning.families import num_layers
from llm_pruning.owl import profile_model
from llm_pruning.pruners import get_pruner

if TYPE_CHECKING:
    from fedspallm_strategy.strategies.setup import RunSetup

log = logging.getLogger(__name__)


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

    compares_to_centralized = False  # it is the centralized model

    @classmethod
    def for_run(cls, run: RunSetup) -> Centralized:
        return cls(run.model, run.config, pooled(run.config, run.tokenizer, run.node_configs))

    @classmethod
    def resume_refusal(cls, config: RunConfig) -> str | None:
        return "the centralized strategy has no rounds to resume"

    def needs_profile_round(self) -> bool:
        return False  # it profiles the pooled shards itself, in prune()

    def conclude(self, run: RunSetup) -> PreTrainedModel | None:
        self.report_profile(run)
        with run.clock("global-eval"):
            run.perplexities["centralized"] = run.evaluate(self.model, "global")
        return self.model

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
        if self.config.sparsity_profile == "owl":  # the pooled data's own profile
            self.set_profile(
                profile_model(
                    self.model,
                    segments,
                    target=self.config.sparsity,
                    lam=self.config.owl_lambda,
                    owl_m=self.config.owl_m,
                    device=self.config.device,
                )
            )
        prune_model(
            self.model,
            segments,
            pruner,
            pattern,
            device=self.config.device,
            patterns=self.patterns or None,
            reconstruction=self.config.reconstruction,
        )
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


def pooled(config: RunConfig, tokenizer, node_configs: Mapping[int, NodeConfig]):
    """Every node's shard, as the node itself would cut it, pooled (simulation only): a
    callable, so the shards are read only when the centralized pruning runs."""

    def segments() -> torch.Tensor:
        ordered = sorted(node_configs.values(), key=lambda nc: nc.name)
        return torch.cat([load_shard(config, nc, tokenizer) for nc in ordered])

    return segments
