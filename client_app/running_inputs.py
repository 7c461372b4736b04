"""A node's calibration inputs between rounds: kept on disk, since every message is a new process.

A SuperNode starts a new ClientApp process per message, so the activations entering the
current decoder layer live in the node's cache dir between rounds (safetensors, keyed by the
strategy, the run id and the node's name). The layer keyword arguments (rotary embeddings,
causal mask) depend only on the segment length and are re-captured each round.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from fedspallm_strategy.config import NodeConfig
from fedspallm_strategy.wire.payload import decode
from fedspallm_strategy.wire.payload_spec import validate_layer
from llm_pruning.cache import cache_dir
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.families import family_of, prunable_weights
from llm_pruning.lazy import layer_tensors, update_layer

STATE_FILE = "activations.safetensors"
STATE_FORMAT = "fedspallm-exact-activations"


def state_dir(node: NodeConfig, run_id: int, strategy: str = "exact") -> Path:
    """Where this node keeps its activations for run ``run_id`` (its name hashed: a path)."""
    root = Path(node.cache_dir).expanduser() if node.cache_dir else cache_dir()
    key = hashlib.sha256(node.name.encode()).hexdigest()[:16]
    return root / strategy / f"run-{run_id}" / key


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
            f"this node has no activations from the previous round at {path} "
            "(was its cache-dir cleared, or did it miss a round?)"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != STATE_FORMAT:
            raise RuntimeError(f"{path} is not an activations file of this app")
        return handle.get_tensor("hidden"), int(metadata["next-layer"])


def remove_activations(folder: Path) -> None:
    """The run is over for this node: drop its activations (and the run's folder, once empty)."""
    shutil.rmtree(folder, ignore_errors=True)
    try:  # the run's folder, once the last of this machine's nodes is done
        folder.parent.rmdir()
    except OSError:
        pass


def resume(model, folder: Path, device: str, expected_layer: int) -> LayerwiseCalibrator:
    """A calibrator holding the saved activations, which must enter ``expected_layer``."""
    hidden, next_layer = load_activations(folder)
    if next_layer != expected_layer:
        raise RuntimeError(
            f"this node's activations enter layer {next_layer}, but the server's round "
            f"continues from layer {expected_layer}"
        )
    # The layer kwargs depend on the segment length only: capture them on one dummy segment.
    calibrator = LayerwiseCalibrator(
        model, torch.zeros(1, hidden.shape[1], dtype=torch.long), device
    )
    calibrator.hidden = hidden.to(calibrator.device)
    calibrator.next_layer = next_layer
    return calibrator


def apply_global_layers(
    model: PreTrainedModel, data: bytes, layer_ids: Sequence[int], *, require_values: bool
) -> None:
    """Write the server's pruned matrices of ``layer_ids`` into ``model``.

    A lazy model's layers are written to its store's files (``lazy.update_layer``), so they
    take no memory until the calibrator loads them.
    """
    tensors, masks = decode(data)
    expected = {
        name: tuple(linear.weight.shape)
        for layer in layer_ids
        for name, linear in prunable_weights(model, layer).items()
    }
    validate_layer(tensors, masks, expected, require_values=require_values)
    family = family_of(model)
    for layer in layer_ids:
        current = layer_tensors(model, layer)
        names = [name for name in masks if name.startswith(family.layer_prefix(layer))]
        updated = {}
        for name in names:
            weight, keep = current[name], masks[name]
            values = tensors[name].to(weight.dtype) if tensors else weight  # mask only: kept
            updated[name] = torch.where(keep, values, torch.zeros((), dtype=weight.dtype))
        update_layer(model, layer, updated)
