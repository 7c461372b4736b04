"""Strategies by run-config name, as ``PRUNERS`` holds the pruners, and what building one takes.

The run orchestration (``server_app/federation.py``) looks a strategy up here and asks it
everything that differs between strategies: whether a run can resume, whether its rounds can
cover the model, and, after the rounds, its part of the report and the model to save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedspallm_strategy.centralized import Centralized
from fedspallm_strategy.config import STRATEGIES as STRATEGY_NAMES
from fedspallm_strategy.config import NodeConfig, RunConfig
from fedspallm_strategy.exact import Exact
from fedspallm_strategy.strategy import MergeStrategy, ServerEvaluated


@dataclass
class RunSetup:
    """What a strategy is built from, and where it reports after the rounds."""

    config: RunConfig
    model: PreTrainedModel  # the server's model: dense now, the global model after the rounds
    tokenizer: PreTrainedTokenizerBase
    node_configs: dict[int, NodeConfig]  # the nodes that reported valid resources
    run_dir: Path
    evaluate: Callable[[PreTrainedModel, str], dict]  # (model, label) -> perplexity per set
    clock: Callable  # ``with clock("stage"):`` times a stage into the report
    report: dict = field(default_factory=dict)
    perplexities: dict = field(default_factory=dict)

    @property
    def budgets(self) -> dict[int, int | None]:
        return {node: nc.layer_budget for node, nc in self.node_configs.items()}

    @property
    def names(self) -> dict[int, str]:
        return {node: nc.name for node, nc in self.node_configs.items()}


STRATEGIES: dict[str, type[ServerEvaluated]] = {
    "fedspallm": MergeStrategy,
    "fedavg": MergeStrategy,
    "fedprllm": MergeStrategy,
    "standalone": MergeStrategy,
    "centralized": Centralized,
    "exact": Exact,
}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "config.STRATEGIES and the registry must agree"
