"""Strategies by run-config name, as ``PRUNERS`` holds the pruners.

The run orchestration (``server_app/federation.py``) looks a strategy up here and asks it
everything that differs between strategies: whether a run can resume, whether its rounds can
cover the model, and, after the rounds, its part of the report and the model to save.
"""

from __future__ import annotations

from fedspallm_strategy.config import STRATEGIES as STRATEGY_NAMES
from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.strategies.base import ServerEvaluated
from fedspallm_strategy.strategies.centralized import Centralized
from fedspallm_strategy.strategies.exact import Exact
from fedspallm_strategy.strategies.layerwise import LayerwiseMerge
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from fedspallm_strategy.strategies.secure_exact import SecureExact

STRATEGIES: dict[str, type[ServerEvaluated]] = {
    "fedspallm": MergeStrategy,
    "fedavg": MergeStrategy,
    "fedprllm": MergeStrategy,
    "standalone": MergeStrategy,
    "centralized": Centralized,
    "exact": Exact,
}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "config.STRATEGIES and the registry must agree"


def strategy_class(config: RunConfig) -> type[ServerEvaluated]:
    """The class that runs ``config``: the registry's, or the variant its settings ask for
    (layer-wise rounds for a merge strategy, SecAgg+ for ``exact``)."""
    if config.layerwise:
        return LayerwiseMerge
    if config.strategy == "exact" and config.secure_aggregation:
        return SecureExact
    return STRATEGIES[config.strategy]
