"""The run folder: evaluation of the models a run produced, ``report.json`` and ``model/``.

Flower-free, so benchmarks and tests can evaluate and report without a federation.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedspallm_strategy.config import ConfigError, RunConfig
from llm_pruning.data import eval_tokens
from llm_pruning.evaluate import perplexity, sparsity_report
from llm_pruning.lazy import layer_store
from llm_pruning.models import model_summary

log = logging.getLogger(__name__)


@dataclass
class Evaluator:
    """Perplexity of any model on every eval set of the run, on the same token windows."""

    config: RunConfig
    tokenizer: PreTrainedTokenizerBase
    tokens: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        # Tokenized once, up front: a text that is missing, unreadable or too short for one
        # window fails before any pruning, naming the key.
        self.tokens = {}
        for source in self.config.eval_data:
            try:
                self.tokens[source] = eval_tokens(source, self.tokenizer)
            except (OSError, ValueError) as error:
                raise ConfigError(f"eval-data '{source}': {error}") from error
        for source, tokens in self.tokens.items():
            if tokens.numel() < self.config.seqlen:
                raise ConfigError(
                    f"eval-data '{source}' has {tokens.numel()} tokens, fewer than one "
                    f"window of seqlen={self.config.seqlen}"
                )

    def __call__(self, model: PreTrainedModel, label: str) -> dict[str, float]:
        start = time.perf_counter()
        windows = self.config.eval_windows or None
        result = {
            source: round(
                perplexity(
                    model,
                    tokens,
                    seqlen=self.config.seqlen,
                    max_windows=windows,
                    device=self.config.device,
                ),
                4,
            )
            for source, tokens in self.tokens.items()
        }
        log.info("perplexity of %s: %s (%.1fs)", label, result, time.perf_counter() - start)
        return result


def save_run(
    run_dir: Path,
    *,
    config: RunConfig,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    report: dict,
) -> Path:
    """Write ``model/`` (if any) and ``report.json``; returns the report's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if model is not None:
        store = layer_store(model)
        if store is not None:  # one layer at a time, from the run's layers on disk
            store.save_pretrained(run_dir / "model", tokenizer)
        else:
            model.save_pretrained(run_dir / "model", safe_serialization=True)
            tokenizer.save_pretrained(run_dir / "model")
        report["sparsity"] = {
            "target": config.sparsity,
            "pattern": config.pattern,
            **sparsity_report(model),
        }
        report["model"] = model_summary(model, config.model)
    path = run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False))
    return path
