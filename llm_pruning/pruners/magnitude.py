"""Magnitude pruning: the data-free baseline that drops the smallest ``|W|``."""

from __future__ import annotations

from torch import Tensor

from llm_pruning.pruners.masks import SparsityPattern, lowest_k_mask, nm_keep_mask, num_to_prune


def magnitude_prune(
    weight: Tensor, stats: object | None, pattern: SparsityPattern
) -> tuple[Tensor, Tensor]:
    """Prune the lowest-magnitude entries of a weight matrix.

    Parameters
    ----------
    weight
        ``(out, in)`` weight of a Linear layer; not modified.
    stats
        Ignored: magnitude pruning needs no calibration data.
    pattern
        Unstructured: the ``num_to_prune(out * in, s)`` smallest ``|W|`` of the whole matrix.
        N:M: the ``n`` largest ``|W|`` of every group of ``m`` input columns are kept.

    Returns
    -------
    tuple[Tensor, Tensor]
        The pruned weight (same dtype, device, shape; kept values bit-identical) and the bool
        keep-mask.
    """
    del stats  # same signature as the data-driven pruners
    score = weight.abs().float()  # (out, in); float32 is exact for bf16/fp16 magnitudes
    if pattern.is_nm:
        keep_mask = nm_keep_mask(score, pattern.n, pattern.m)
    else:
        keep_mask = lowest_k_mask(score, num_to_prune(score.numel(), pattern.sparsity))
    return weight.masked_fill(~keep_mask, 0), keep_mask
