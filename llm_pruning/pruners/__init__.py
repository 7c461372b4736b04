"""One-shot pruners: tensors in, tensors out.

Each pruner takes a Linear weight ``(out, in)``, its calibration statistics (or ``None`` for
magnitude) and a :class:`SparsityPattern`, and returns the pruned weight and its bool keep-mask.
The engine creates statistics with ``make_stats(num_inputs, device)``, feeds them every
calibration batch with ``stats.add(inputs)``, and calls ``prune``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llm_pruning.pruners.lsq import masked_least_squares
from llm_pruning.pruners.magnitude import magnitude_prune
from llm_pruning.pruners.masks import (
    SparsityPattern,
    lowest_k_mask,
    nm_keep_mask,
    num_to_prune,
    prune_counts,
)
from llm_pruning.pruners.sparsegpt import RECONSTRUCTIONS, HessianStats, sparsegpt_prune
from llm_pruning.pruners.wanda import ColumnNormStats, wanda_prune

Stats = HessianStats | ColumnNormStats


@dataclass(frozen=True)
class Pruner:
    """A pruning method as the engine sees it.

    Attributes
    ----------
    name
        Run-config name (``pruner`` key).
    updates_weights
        Whether kept values change (SparseGPT); if not, a client need only send its mask.
    make_stats
        ``(num_inputs, device) -> stats`` accumulator, or ``None`` when no data is needed.
    prune
        ``(weight, stats, pattern) -> (new_weight, keep_mask)``; never modifies ``weight``.
        A pruner that updates weights also takes ``keep_mask=`` (the masked re-solve) and
        ``reconstruction=`` (one of :data:`RECONSTRUCTIONS`; the engine passes it only when
        it is not the default ``"sparsegpt"``).
    """

    name: str
    updates_weights: bool
    make_stats: Callable[[int, torch.device], Stats] | None
    prune: Callable[[Tensor, Stats | None, SparsityPattern], tuple[Tensor, Tensor]]


PRUNERS: dict[str, Pruner] = {
    "magnitude": Pruner("magnitude", False, None, magnitude_prune),
    "sparsegpt": Pruner("sparsegpt", True, HessianStats, sparsegpt_prune),
    "wanda": Pruner("wanda", False, ColumnNormStats, wanda_prune),
}


def get_pruner(name: str) -> Pruner:
    """Look up a pruner by its run-config name.

    Raises
    ------
    ValueError
        Listing the known names if ``name`` is not one of them.
    """
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; choose one of: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name]


__all__ = [
    "PRUNERS",
    "RECONSTRUCTIONS",
    "ColumnNormStats",
    "HessianStats",
    "Pruner",
    "SparsityPattern",
    "Stats",
    "get_pruner",
    "lowest_k_mask",
    "magnitude_prune",
    "masked_least_squares",
    "nm_keep_mask",
    "num_to_prune",
    "prune_counts",
    "sparsegpt_prune",
    "wanda_prune",
]
