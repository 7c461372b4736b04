"""Wanda (Sun et al., 2023): prune by ``|W| * ||x||``, compared within each output row.

The input norms are collected as additive sums (Σ x² per input column and a row count) so that
statistics from several batches, or several clients, add up to the pooled statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm_pruning.pruners.masks import SparsityPattern, nm_keep_mask, prune_counts, row_lowest_mask
from llm_pruning.pruners.stats import InputStats


class ColumnNormStats(InputStats):
    """Running Σ x² per input column of a Linear layer, in float32.

    Parameters
    ----------
    num_inputs
        Input features of the layer (columns of its weight).
    device
        Where the sums live (the layer's device).
    """

    def __init__(self, num_inputs: int, device: torch.device | str = "cpu") -> None:
        super().__init__(num_inputs)
        self.sq_norm = torch.zeros(num_inputs, dtype=torch.float32, device=device)  # (in,)

    @property
    def sums(self) -> Tensor:
        return self.sq_norm

    def _accumulate(self, rows: Tensor) -> None:
        self.sq_norm += rows.square().sum(dim=0)


def wanda_score(weight: Tensor, stats: ColumnNormStats) -> Tensor:
    """The Wanda metric ``|W_ij| * ||X_j||`` (eq. 1 of the Wanda paper), ``(out, in)`` float32."""
    # Dividing by the count does not change any row's order; it keeps the score scale-free.
    column_norm = torch.sqrt(stats.sq_norm / max(stats.count, 1)).to(weight.device)  # (in,)
    return weight.abs().float() * column_norm.unsqueeze(0)


def wanda_prune(
    weight: Tensor, stats: ColumnNormStats | None, pattern: SparsityPattern
) -> tuple[Tensor, Tensor]:
    """Prune a weight matrix with the Wanda metric.

    Parameters
    ----------
    weight
        ``(out, in)`` weight of a Linear layer; not modified.
    stats
        Column norms of the layer's inputs on the calibration data.
    pattern
        Unstructured: output row ``r`` prunes ``prune_counts(out, in, s)[r]`` lowest scores, so the
        matrix total is exactly ``num_to_prune(out * in, s)``. N:M: per group of ``m`` columns.

    Returns
    -------
    tuple[Tensor, Tensor]
        The pruned weight (kept values bit-identical to the input) and the bool keep-mask.
    """
    if stats is None:
        raise ValueError("wanda needs calibration statistics (ColumnNormStats); got None")
    rows, cols = weight.shape
    if stats.num_inputs != cols:
        raise ValueError(f"stats cover {stats.num_inputs} inputs; the weight has {cols} columns")
    score = wanda_score(weight, stats)  # (out, in)
    if pattern.is_nm:
        keep_mask = nm_keep_mask(score, pattern.n, pattern.m)
    else:
        keep_mask = row_lowest_mask(score, prune_counts(rows, cols, pattern.sparsity))
    return weight.masked_fill(~keep_mask, 0), keep_mask
