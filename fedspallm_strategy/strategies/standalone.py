"""Each client's own pruned model: rebuilt on the server from its replies, or scored by it.

The ``standalone`` comparison of the report (and the model the ``standalone`` strategy
saves): a client that pruned every layer has a model of its own; its stored replies, written
into a fresh copy of the dense model, rebuild it exactly. When its values stay home (the
re-solve's prune round sends masks only) or travel as int8 (the server's copy is within half a
step of each), the client scores its model itself and reports the perplexity
(:func:`reported_perplexities`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.wire.payload import decode
from fedspallm_strategy.wire.protocol import STANDALONE_METRIC, STANDALONE_RECOVERED_METRIC
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import layer_tensors, update_layer
from llm_pruning.models import load_model

log = logging.getLogger(__name__)

Evaluate = Callable[[PreTrainedModel, str], dict]  # (model, label) -> perplexity per eval set


def apply_payload(model: PreTrainedModel, data: bytes) -> int:
    """Write a client's pruned matrices into ``model``; returns how many it held."""
    tensors, masks = decode(data)
    for layer in range(num_layers(model)):
        names = [name for name in prunable_weights(model, layer) if name in masks]
        if not names:
            continue
        current = layer_tensors(model, layer)
        update_layer(
            model,
            layer,
            {
                name: torch.where(
                    masks[name],
                    (tensors[name] if tensors else current[name]).to(current[name].dtype),
                    torch.zeros((), dtype=current[name].dtype),
                )
                for name in names
            },
        )
    return len(masks)


def standalone_perplexities(
    config: RunConfig, evaluate: Evaluate, reply_files: dict[int, list[Path]]
) -> dict:
    """Each client's own pruned model (dense where it pruned nothing), if it pruned every layer.

    A client that pruned only some layers has no standalone model to compare with.
    """
    per_client = {}
    for node, files in sorted(reply_files.items()):
        model, _ = load_model(
            config.model, dtype=config.torch_dtype, lazy=True, ignore=config.ignore
        )
        pruned = sum(apply_payload(model, path.read_bytes()) for path in files)
        total_matrices = sum(len(prunable_weights(model, i)) for i in range(num_layers(model)))
        if pruned < total_matrices:
            log.info(
                "node %d pruned %d of %d matrices: no standalone model",
                node,
                pruned,
                total_matrices,
            )
            continue
        per_client[str(node)] = evaluate(model, f"standalone node {node}")
    return standalone_section(per_client)


def standalone_section(per_client: dict[str, dict[str, float]]) -> dict:
    """The report's ``standalone``: each client's perplexities and their mean per eval set
    (over the clients scored on it); empty when no client was scored."""
    if not per_client:
        return {}
    sources = dict.fromkeys(source for scores in per_client.values() for source in scores)
    mean = {}
    for source in sources:
        values = [scores[source] for scores in per_client.values() if source in scores]
        mean[source] = round(sum(values) / len(values), 4)
    return {"per_client": per_client, "mean": mean}


def reported_perplexities(
    config: RunConfig, metrics: dict[str, float | int], template: str = STANDALONE_METRIC
) -> dict[str, float]:
    """Eval set -> the perplexity a client reported for its own pruned model (the values stayed
    on the client, so the server cannot score it), or with ``STANDALONE_RECOVERED_METRIC``
    for that model after its own recovery. A claim, not a measurement: only a finite number
    >= 1 (a perplexity's least) is taken; the merged model never depends on it."""
    scores = {}
    for index, source in enumerate(config.eval_data):
        value = metrics.get(template.format(index))
        if isinstance(value, int | float) and math.isfinite(value) and value >= 1:
            scores[source] = round(float(value), 4)
    return scores


class Reported:
    """What the clients reported of their own models: pruned, and after their own recovery."""

    def __init__(self) -> None:
        self.pruned: dict[int, dict[str, float]] = {}
        self.recovered: dict[int, dict[str, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.pruned)

    def take(self, node: int, config: RunConfig, metrics: dict) -> None:
        """Keep what ``node`` reported, where it is a perplexity."""
        if scores := reported_perplexities(config, metrics):
            self.pruned[node] = scores
        if config.clients_recover_standalone and (
            scores := reported_perplexities(config, metrics, STANDALONE_RECOVERED_METRIC)
        ):
            self.recovered[node] = scores

    def section(self) -> dict:
        """The report's ``standalone``, with ``after-recovery`` where clients recovered."""
        section = standalone_section({str(n): s for n, s in sorted(self.pruned.items())})
        if self.recovered:
            recovered = {str(n): s for n, s in sorted(self.recovered.items())}
            section["after-recovery"] = standalone_section(recovered)
        return section


def best_standalone(
    config: RunConfig, reply_files: dict[int, list[Path]], standalone: dict | None
) -> PreTrainedModel:
    """For the ``standalone`` strategy: the client model with the lowest perplexity."""
    if not standalone:
        raise RuntimeError("standalone: no client pruned every layer, so there is no model to save")
    first = config.eval_data[0]
    best = min(standalone["per_client"], key=lambda node: standalone["per_client"][node][first])
    model, _ = load_model(config.model, dtype=config.torch_dtype, lazy=True, ignore=config.ignore)
    for path in reply_files[int(best)]:
        apply_payload(model, path.read_bytes())
    log.info("standalone: saving node %s's model (lowest perplexity on %s)", best, first)
    return model
