"""What building a strategy takes, and where it reports after the rounds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedspallm_strategy.config import NodeConfig, RunConfig


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
