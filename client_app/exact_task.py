"""A client's side of the ``exact`` strategy, without Flower: advance, collect, encode.

Each round's message names the round's decoder layers and carries the pruned global matrices
of the previous round's layers. A SuperNode starts a new ClientApp process per message, so the
activations entering the current layer live on disk between rounds (safetensors, under the
node's cache dir, keyed by run id and node name); the layer keyword arguments (rotary
embeddings, causal mask) depend only on the segment length and are re-captured each round.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from client_app.task import PruneReply, load_shard, node_device
from fedspallm_strategy.config import NodeConfig, RunConfig
from fedspallm_strategy.payload import decode, validate_layer
from fedspallm_strategy.stats_payload import encode_statistics, same_statistics
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.models import cache_dir, family_of, load_model, num_layers, prunable_weights
from llm_pruning.pruners import Pruner, get_pruner

log = logging.getLogger(__name__)

STATE_FILE = "activations.safetensors"
STATE_FORMAT = "fedspallm-exact-activations"


def state_dir(node: NodeConfig, run_id: int) -> Path:
    """Where this node keeps its activations for run ``run_id`` (its name hashed: a path)."""
    root = Path(node.cache_dir).expanduser() if node.cache_dir else cache_dir()
    key = hashlib.sha256(node.name.encode()).hexdigest()[:16]
    return root / "exact" / f"run-{run_id}" / key


def save_activations(folder: Path, hidden: torch.Tensor, next_layer: int) -> None:
    """Write the activations entering ``next_layer`` atomically (a crash leaves the old file)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (STATE_FILE + ".partial")
    safetensors.torch.save_file(
        {"hidden": hidden.detach().cpu().contiguous()},
        str(partial),
        metadata={"format": STATE_FORMAT, "next-layer": str(next_layer)},
    )
    os.replace(partial, folder / STATE_FILE)


def load_activations(folder: Path) -> tuple[torch.Tensor, int]:
    """``(hidden (N, T, C), next_layer)`` saved by the previous round."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise RuntimeError(
            f"exact: this node has no activations from the previous round at {path} "
            "(was its cache-dir cleared, or did it miss a round?)"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != STATE_FORMAT:
            raise RuntimeError(f"exact: {path} is not an activations file of this app")
        return handle.get_tensor("hidden"), int(metadata["next-layer"])


def apply_global_layers(
    model: PreTrainedModel, data: bytes, layer_ids: Sequence[int], pruner: Pruner
) -> None:
    """Write the server's pruned matrices of ``layer_ids`` into ``model``."""
    tensors, masks = decode(data)
    expected = {
        name: tuple(linear.weight.shape)
        for layer in layer_ids
        for name, linear in prunable_weights(model, layer).items()
    }
    validate_layer(tensors, masks, expected, require_values=pruner.updates_weights)
    parameters = dict(model.named_parameters())
    for name, keep in masks.items():
        weight = parameters[name].data
        values = tensors[name].to(weight.dtype) if tensors else weight  # mask only: kept values
        weight.copy_(torch.where(keep, values, torch.zeros((), dtype=weight.dtype)))


def _resume(model, folder: Path, device: str, expected_layer: int) -> LayerwiseCalibrator:
    hidden, next_layer = load_activations(folder)
    if next_layer != expected_layer:
        raise RuntimeError(
            f"exact: this node's activations enter layer {next_layer}, the server's previous "
            f"round was layer {expected_layer}"
        )
    # The layer kwargs depend on the segment length only: capture them on one dummy segment.
    calibrator = LayerwiseCalibrator(
        model, torch.zeros(1, hidden.shape[1], dtype=torch.long), device
    )
    calibrator.hidden = hidden.to(calibrator.device)
    calibrator.next_layer = next_layer
    return calibrator


def _shared(stats: dict, prefix: str, shared: Sequence[Sequence[str]]) -> dict:
    """One entry per group of Linears reading the same input, checked to be identical."""
    entries = {}
    for group in shared:
        names = [f"{prefix}{name}.weight" for name in group]
        first = stats[names[0]]
        for other in names[1:]:
            if not same_statistics(first, stats[other]):
                raise RuntimeError(f"exact: {names[0]} and {other} do not share their inputs")
        entries[names[0]] = (first, names)
    return entries


def exact_statistics(config: RunConfig, node: NodeConfig, **request: Any) -> PruneReply:
    """:func:`collect_statistics` (same keyword arguments), encoded as one statistics payload."""
    entries, metrics = collect_statistics(config, node, **request)
    payload = encode_statistics(entries)
    log.info(
        "exact: statistics of layers %s over %d token rows: %d bytes",
        list(request["layer_ids"]),
        metrics["tokens"],
        len(payload),
    )
    return PruneReply(payload, {**metrics, "payload-bytes": len(payload)})


def collect_statistics(
    config: RunConfig,
    node: NodeConfig,
    *,
    run_id: int,
    layer_ids: Sequence[int],
    shared: Sequence[Sequence[str]],
    previous_layers: Sequence[int],
    previous: bytes | None,
) -> tuple[dict, dict]:
    """Advance through the previous round's pruned global layers, then collect statistics.

    Parameters
    ----------
    layer_ids
        This round's decoder layers, consecutive.
    shared
        Relative Linear names that read one input; one statistics copy is sent per group.
    previous_layers, previous
        The previous round's layers and their pruned global matrices (``payload.encode``);
        empty and ``None`` in the first round.

    Returns
    -------
    tuple
        ``({group key: (stats, covers)}, metrics)``.
    """
    start = time.perf_counter()
    cache = Path(node.cache_dir).expanduser() if node.cache_dir else None
    model, tokenizer = load_model(config.model, cache=cache)
    pruner = get_pruner(config.pruner)
    device = node_device(config, node)
    folder = state_dir(node, run_id)
    if not previous_layers:
        segments = load_shard(config, node, tokenizer)
        calibrator = LayerwiseCalibrator(model, segments, device)  # enters layer 0
    else:
        if previous is None:
            raise ValueError("exact: the message names previous layers but carries no matrices")
        calibrator = _resume(model, folder, device, previous_layers[0])
        apply_global_layers(model, previous, previous_layers, pruner)
        for index in previous_layers:
            calibrator.advance(index)  # through the pruned *global* layer
    if list(layer_ids) != list(
        range(calibrator.next_layer, calibrator.next_layer + len(layer_ids))
    ):
        raise ValueError(
            f"exact: layers {list(layer_ids)} do not follow layer {calibrator.next_layer - 1}"
        )
    last_round = layer_ids[-1] == num_layers(model) - 1
    if not last_round:
        save_activations(folder, calibrator.hidden, calibrator.next_layer)
    entries = {}
    family = family_of(model)
    for position, index in enumerate(layer_ids):
        stats = calibrator.statistics(index, pruner)
        entries.update(_shared(stats, family.layer_prefix(index), shared))
        if position + 1 < len(layer_ids):
            # The server has not pruned this layer yet: later layers of the round see it dense.
            calibrator.advance(index)
    if last_round:
        shutil.rmtree(folder, ignore_errors=True)
        try:  # the run's folder, once the last of this machine's nodes is done
            folder.parent.rmdir()
        except OSError:
            pass
    rows = next(iter(entries.values()))[0].count
    metrics = {
        "num-examples": int(calibrator.hidden.shape[0]),
        "tokens": int(rows),
        "layers": len(layer_ids),
        "seconds": round(time.perf_counter() - start, 3),
        **{f"seconds-{stage}": value for stage, value in calibrator.timings.as_dict().items()},
    }
    return entries, metrics
