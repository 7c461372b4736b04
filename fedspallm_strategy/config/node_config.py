"""A SuperNode's own settings (``node_config``): its shard, its resources, its device."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fedspallm_strategy.config.run_config import RunConfig
from fedspallm_strategy.config.values import ConfigError, check_device, coerce
from llm_pruning.data import calibration_segments


@dataclass(frozen=True)
class NodeConfig:
    """What one SuperNode says about itself (``--node-config``): its data and its resources."""

    partition_id: int = 0  # this node's shard of the run's calib-data (simulation: Flower sets it)
    num_partitions: int = 1  # how many shards calib-data is cut into (simulation: Flower sets it)
    data_path: str | None = None  # private text; replaces the run's calib-data partition
    layer_budget: int | None = None  # decoder layers this node can prune per round
    device: str | None = None  # overrides the run's device on this node
    cache_dir: str | None = None  # where this node keeps converted models (survives restarts)

    def as_dict(self) -> dict[str, object]:
        """Kebab-case keys, as in ``--node-config``."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}

    @property
    def name(self) -> str:
        """What identifies this node's data across restarts (its node id may change)."""
        return self.data_path or f"partition {self.partition_id} of {self.num_partitions}"

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> NodeConfig:
        """Build from a node's ``node_config``; validates everything.

        Flower adds only ``partition-id`` and ``num-partitions`` (simulation) to what the
        operator passed with ``--node-config``; both are fields here. So an unknown key is a
        typo (``layer_budget``) that would silently be lost: it fails, naming the key.
        """
        known = {f.name.replace("_", "-") for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown node-config key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        config = cls(
            partition_id=coerce("partition-id", values.get("partition-id", 0), "int"),
            num_partitions=coerce("num-partitions", values.get("num-partitions", 1), "int"),
            data_path=_optional(values, "data-path", "str"),
            layer_budget=_optional(values, "layer-budget", "int"),
            device=_optional(values, "device", "str"),
            cache_dir=_optional(values, "cache-dir", "str"),
        )
        if not 0 <= config.partition_id < config.num_partitions:
            raise ConfigError(
                f"node config partition-id must be in [0, num-partitions), got "
                f"{config.partition_id} of {config.num_partitions}"
            )
        if config.layer_budget is not None and config.layer_budget < 1:
            raise ConfigError(
                f"node config layer-budget must be at least 1, got {config.layer_budget}"
            )
        if config.device is not None:
            check_device("node config device", config.device)
        return config


# Helpers both sides use: the server cuts the shards itself to check them (and to pool them
# for `centralized`); each node cuts its own.


def node_device(config: RunConfig, node: NodeConfig) -> str:
    device = node.device or config.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this node")
    return device


def private_data_path(data_path: str) -> Path:
    """A node's ``data-path``, checked: a missing or unreadable one fails this node's reply.

    Always a local path (never a dataset name), so a typo cannot turn into a hub download.
    """
    path = Path(data_path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"node config data-path '{data_path}' does not exist on this node")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PermissionError(f"node config data-path '{data_path}' is not readable on this node")
    return path


def load_shard(config: RunConfig, node: NodeConfig, tokenizer) -> torch.Tensor:
    """This node's calibration segments ``(N, T)``: its own ``data-path``, or its partition."""
    common = dict(seqlen=config.seqlen, num_segments=config.calib_samples, seed=config.seed)
    if node.data_path is not None:
        path = private_data_path(node.data_path)
        return calibration_segments(str(path), tokenizer, partition="by-document", **common)
    try:
        return calibration_segments(
            config.calib_data,
            tokenizer,
            partition=config.partition,
            partition_id=node.partition_id,
            num_partitions=node.num_partitions,
            **common,
        )
    except (OSError, ValueError, ImportError) as error:  # the run's setting: name the key
        message = f"calib-data: {error}"
        raise (ValueError if isinstance(error, ValueError) else OSError)(message) from error


def load_recovery_shard(
    config: RunConfig, node: NodeConfig, tokenizer, recovery_round: int | None = None
) -> torch.Tensor:
    """This node's recovery windows ``(N, seqlen)``, drawn from its shard as its calibration
    segments are.

    ``recovery-windows`` ``same``: ``recovery-samples`` windows, every round's. ``fresh``: one
    draw of ``recovery-rounds`` x ``recovery-samples`` windows, of which recovery round
    ``recovery_round`` (from 1) trains on the ``recovery_round``-th block; None gives them all,
    for training every round's steps at once (centralized and a member's own recovery).
    """
    per_round = config.recovery_samples
    blocks = max(config.recovery_rounds, 1) if config.recovery_windows == "fresh" else 1
    own = dataclasses.replace(config, calib_samples=per_round * blocks)
    windows = load_shard(own, node, tokenizer)
    if recovery_round is None or blocks == 1:
        return windows
    if not 1 <= recovery_round <= blocks:
        raise ValueError(f"recovery round {recovery_round} is not in 1..{blocks}")
    return windows[(recovery_round - 1) * per_round : recovery_round * per_round]


def _optional(values: Mapping[str, object], key: str, annotation: str):
    value = values.get(key)
    if value is None or value == "":
        return None
    return coerce(f"node config {key}", value, annotation)
