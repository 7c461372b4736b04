"""A node's part of a recovery round, without Flower: install the global sparse model,
fine-tune it on this node's shard keeping its zeros, encode the kept values' changes.

The server's side, and why the whole model comes down each round, is in
``fedspallm_strategy/strategies/recovery_rounds.py``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
from torch import Tensor

from client_app.running_inputs import apply_global_layers
from client_app.task import to_wire
from fedspallm_strategy.config import NodeConfig, RunConfig, load_recovery_shard, node_device
from fedspallm_strategy.wire.secure_encoding import delta_vectors
from fedspallm_strategy.wire.values_payload import encode_values
from llm_pruning.families import num_layers
from llm_pruning.models import load_model
from llm_pruning.recovery import RecoveryResult, recover, sparsity_masks, teacher_targets

log = logging.getLogger(__name__)


@dataclass
class RecoveryReply:
    deltas: bytes  # values payload: every kept value's change, in the mask's row-major order
    metrics: dict[str, float | int]


def recover_global(
    config: RunConfig, node: NodeConfig, global_layers: bytes, recovery_round: int
) -> RecoveryReply:
    """Fine-tune the server's pruned model (``global_layers``: every layer's matrices) on
    this node's recovery windows of ``recovery_round`` (from 1); encode the changes in the
    wire dtype."""
    start = time.perf_counter()
    result, masks = fine_tune_global(config, node, global_layers, recovery_round)
    deltas = encode_deltas(result.deltas, masks, config)
    metrics = {
        "tokens": result.tokens,
        "loss-first": result.losses[0],
        "loss-last": result.losses[-1],
        "payload-bytes": len(deltas),
        "seconds": round(time.perf_counter() - start, 3),
        "seconds-training": round(result.seconds, 3),
    }
    return RecoveryReply(deltas, metrics)


@dataclass(frozen=True)
class SecurePart:
    """Which part of a secure recovery round's changes a request asks for (from 0, of
    ``parts``), and its matrices."""

    index: int
    parts: int
    names: list[str]


def recover_global_secure(
    config: RunConfig,
    node: NodeConfig,
    global_layers: bytes | None,
    recovery_round: int,
    part: SecurePart,
    folder: Path,
    clip: float,
) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """:func:`recover_global` under secure aggregation, one part at a time: the part's
    changes as SecAgg+ vectors (``secaggplus_mod`` masks them), and the metrics that may
    travel in the clear (time, and tokens with the first part; the training loss says
    something of the text, so it stays here).

    The first part fine-tunes (``global_layers`` is the model) and, if more parts follow,
    keeps every change in ``folder`` (a new process answers each part); a later part reads
    them there, and the last removes them (or the next round's first part, for a node left
    out of a round before its last part).
    """
    start = time.perf_counter()
    path = folder / f"changes-round-{recovery_round}.safetensors"
    metrics: dict[str, float | int] = {}
    if part.index == 0:
        if global_layers is None:
            raise ValueError("the first part of a secure recovery round carries no global model")
        for stale in folder.glob("changes-round-*"):  # of a round this node left early
            stale.unlink(missing_ok=True)
        result, _ = fine_tune_global(config, node, global_layers, recovery_round)
        deltas, metrics["tokens"] = result.deltas, result.tokens
        if part.parts > 1:
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            safetensors.torch.save_file(deltas, str(partial))
            os.replace(partial, path)  # a crash leaves no half-written changes
    elif path.is_file():
        deltas = safetensors.torch.load_file(str(path))
    else:
        raise RuntimeError(
            f"part {part.index + 1}/{part.parts} of recovery round {recovery_round}: this node "
            f"kept no changes at {path} (was its cache-dir cleared, or did it miss part 1?)"
        )
    if part.index == part.parts - 1:
        path.unlink(missing_ok=True)
    missing = sorted(set(part.names) - set(deltas))
    if missing:
        raise ValueError(f"the part names matrices this model does not prune: {missing}")
    vectors = delta_vectors({name: deltas[name] for name in part.names}, clip)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return vectors, metrics


def fine_tune_global(
    config: RunConfig, node: NodeConfig, global_layers: bytes, recovery_round: int
) -> tuple[RecoveryResult, dict[str, Tensor]]:
    """The global model fine-tuned on this node's windows of ``recovery_round``: what changed,
    and the keep-masks that order the changes.

    The model is loaded whole (training runs every layer forward and back), in the run's dtype.
    """
    cache = Path(node.cache_dir).expanduser() if node.cache_dir else None
    model, tokenizer = load_model(
        config.model, dtype=config.torch_dtype, cache=cache, ignore=config.ignore
    )
    windows = load_recovery_shard(config, node, tokenizer, recovery_round)
    device = node_device(config, node)
    teacher = teacher_targets(model, windows, config.recovery_settings, device)  # still dense
    apply_global_layers(model, global_layers, range(num_layers(model)), require_values=True)
    log.info(
        "recovery round %d: %s, %d steps on %d windows of %d tokens",
        recovery_round,
        config.recovery_method,
        config.recovery_steps,
        windows.shape[0],
        windows.shape[1],
    )
    masks = sparsity_masks(model)  # the global model's: the deltas' order
    result = recover(model, windows, config.recovery_settings, device=device, teacher=teacher)
    return result, masks


def encode_deltas(deltas: dict, masks: dict, config: RunConfig) -> bytes:
    """The kept values' changes in the wire dtype: int8 codes and a scale per row of the
    mask, or a float dtype."""
    if config.int8_wire:
        return encode_values(deltas, int8_masks=masks)
    dtype = config.wire_dtype(config.torch_dtype)
    return encode_values({name: to_wire(delta, dtype) for name, delta in deltas.items()})
