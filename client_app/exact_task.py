"""A client's side of the ``exact`` strategy, without Flower: advance, collect, encode.

Each round's message names the round's decoder layers and carries the pruned global matrices
of the previous round's layers. Between rounds the node keeps the activations entering the
current layer in its cache dir (``running_inputs.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client_app.running_inputs import (
    apply_global_layers,
    remove_activations,
    resume,
    save_activations,
    state_dir,
)
from client_app.task import PruneReply
from fedspallm_strategy.config import NodeConfig, RunConfig, load_shard, node_device
from fedspallm_strategy.wire.stats_payload import encode_statistics, same_statistics
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.families import family_of, num_layers
from llm_pruning.models import load_model
from llm_pruning.pruners import get_pruner

log = logging.getLogger(__name__)


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
    # A layer at a time: decoder layers load lazily.
    model, tokenizer = load_model(
        config.model, dtype=config.torch_dtype, cache=cache, lazy=True, ignore=config.ignore
    )
    pruner = get_pruner(config.pruner)
    device = node_device(config, node)
    folder = state_dir(node, run_id)
    if not previous_layers:
        segments = load_shard(config, node, tokenizer)
        calibrator = LayerwiseCalibrator(model, segments, device)  # enters layer 0
    else:
        if previous is None:
            raise ValueError("exact: the message names previous layers but carries no matrices")
        calibrator = resume(model, folder, device, previous_layers[0])
        apply_global_layers(model, previous, previous_layers, require_values=pruner.updates_weights)
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
        remove_activations(folder)
    rows = next(iter(entries.values()))[0].count
    metrics = {
        "num-examples": int(calibrator.hidden.shape[0]),
        "tokens": int(rows),
        "layers": len(layer_ids),
        "seconds": round(time.perf_counter() - start, 3),
        **{f"seconds-{stage}": value for stage, value in calibrator.timings.as_dict().items()},
    }
    return entries, metrics
