"""Run and node configuration: read and validated in one place, before any client works.

:class:`RunConfig` is built from Flower's ``run_config`` (the ``[tool.flwr.app.config]`` keys),
:class:`NodeConfig` from a SuperNode's ``node_config``; a bad value raises :class:`ConfigError`
naming the key and what it allows.
"""

from fedspallm_strategy.config.node_config import (
    NodeConfig,
    load_recovery_shard,
    load_shard,
    node_device,
    private_data_path,
)
from fedspallm_strategy.config.run_config import (
    CALIBRATIONS,
    HUB_REPO_ID,
    STRATEGIES,
    RunConfig,
)
from fedspallm_strategy.config.values import ConfigError

__all__ = [
    "CALIBRATIONS",
    "HUB_REPO_ID",
    "STRATEGIES",
    "ConfigError",
    "NodeConfig",
    "RunConfig",
    "load_recovery_shard",
    "load_shard",
    "node_device",
    "private_data_path",
]
