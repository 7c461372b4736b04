"""The run folder: evaluation of the models a run produced, ``report.json`` and ``model/``.

Flower-free, so benchmarks and tests can evaluate and report without a federation.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedspallm_strategy.config import ConfigError, RunConfig
from llm_pruning.data import eval_tokens
from llm_pruning.evaluate import perplexity, sparsity_report
from llm_pruning.families import model_summary
from llm_pruning.layer_store import layer_store
from llm_pruning.zeroshot import TaskError, TaskSuite
from server_app.model_card import write_model_files

log = logging.getLogger(__name__)

ZERO_SHOT_BATCH_SIZE = 8  # lm-eval requests per forward pass


class Scores(dict):
    """What one :class:`Evaluator` call measured: perplexity per eval set (the dict itself,
    as the report's ``perplexity`` shows it) and zero-shot accuracy per task (``zero_shot``,
    empty without ``eval-tasks``), which :func:`zero_shot_report` gathers for the report."""

    def __init__(self, perplexities: dict[str, float], zero_shot: dict[str, dict]):
        super().__init__(perplexities)
        self.zero_shot = zero_shot


@dataclass
class Evaluator:
    """Perplexity of any model on every eval set of the run, on the same token windows, and
    its zero-shot accuracy on the run's ``eval-tasks``."""

    config: RunConfig
    tokenizer: PreTrainedTokenizerBase
    tokens: dict[str, torch.Tensor] = field(init=False)
    tasks: TaskSuite | None = field(init=False, default=None)

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
        if self.config.eval_tasks:  # resolved, and their documents loaded, once up front too
            try:
                self.tasks = TaskSuite(self.config.eval_tasks)
            except TaskError as error:
                raise ConfigError(f"eval-tasks: {error}") from error

    def __call__(self, model: PreTrainedModel, label: str) -> Scores:
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
        if self.tasks is None:
            return Scores(result, {})
        start = time.perf_counter()
        accuracy = self.tasks.evaluate(
            model, self.tokenizer, batch_size=ZERO_SHOT_BATCH_SIZE, device=self.config.device
        )
        log.info("zero-shot of %s: %s (%.1fs)", label, accuracy, time.perf_counter() - start)
        return Scores(result, accuracy)


def zero_shot_report(perplexities: dict) -> dict:
    """The report's ``zero-shot``, shaped as its ``perplexity``: ``{"dense": {task: {metric:
    value}}, "global": ..., "standalone": {"per_client": {node: ...}, "mean": ...}, ...}``.

    The standalone mean is over the clients, of ``acc`` and ``acc_norm`` only (a mean of
    standard errors is none). Empty without ``eval-tasks``.
    """
    section = {}
    for name, scores in perplexities.items():
        if name == "standalone":
            per_client = {
                node: client.zero_shot
                for node, client in scores["per_client"].items()
                if getattr(client, "zero_shot", None)
            }
            if per_client:
                section[name] = {"per_client": per_client, "mean": _mean_accuracy(per_client)}
        elif getattr(scores, "zero_shot", None):
            section[name] = scores.zero_shot
    return section


def zero_shot_summary(section: dict) -> list[str]:
    """One line per model of the report's ``zero-shot``: ``task acc (acc_norm)`` per task."""
    rows = {name: scores for name, scores in section.items() if name != "standalone"}
    if "standalone" in section:
        rows["standalone mean"] = section["standalone"]["mean"]
    lines = []
    for name, tasks in rows.items():
        cells = [
            f"{task} {metrics.get('acc', float('nan')):.4f} "
            f"({metrics.get('acc_norm', float('nan')):.4f})"
            for task, metrics in tasks.items()
        ]
        lines.append(f"zero-shot acc (acc_norm) of {name}: {', '.join(cells)}")
    return lines


def _mean_accuracy(per_client: dict[str, dict]) -> dict[str, dict[str, float]]:
    first = next(iter(per_client.values()))
    return {
        task: {
            metric: round(sum(c[task][metric] for c in per_client.values()) / len(per_client), 4)
            for metric in ("acc", "acc_norm")
            if all(metric in c.get(task, {}) for c in per_client.values())
        }
        for task in first
    }


def save_run(
    run_dir: Path,
    *,
    config: RunConfig,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    report: dict,
) -> Path:
    """Write ``model/`` (if any, with its model card and ``fedspallm.json``) and
    ``report.json``; returns the report's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if model is not None:
        store = layer_store(model)
        # Split into files of at most max-shard-size, as save_pretrained splits.
        shard_size = config.max_shard_size
        if store is not None:  # one layer at a time, from the run's layers on disk
            store.save_pretrained(run_dir / "model", tokenizer, max_shard_size=shard_size)
        else:
            model.save_pretrained(
                run_dir / "model", safe_serialization=True, max_shard_size=shard_size
            )
            tokenizer.save_pretrained(run_dir / "model")
        report["sparsity"] = {
            "target": config.sparsity,
            "pattern": config.pattern,
            **sparsity_report(model),
        }
        report["model"] = model_summary(model, config.model)
        described = {"config": config.as_dict(), **report}  # the report's own config wins
        write_model_files(run_dir / "model", described, date=f"{datetime.now(UTC):%Y-%m-%d}")
    path = run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False))
    return path
