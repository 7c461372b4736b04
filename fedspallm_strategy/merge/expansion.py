"""Adaptive mask expansion (FedSpaLLM, DESIGN §2).

After l0-norm aggregation a matrix is zero only where *every* client pruned, so it is
denser than the target. Expansion prunes more, per matrix:

- ``C_j`` = number of the ``N`` aggregated clients that pruned entry ``j``;
- entries with ``C_j = N`` stay pruned;
- ``k = ceil(s * d) - #{C_j = N}`` more entries are pruned, largest ``C_j`` first, ties
  broken by smaller ``|W_g[j]|``, then by smaller flat index (deterministic).

Exactly ``ceil(s * d)`` entries end up pruned. If the all-``N`` entries alone already
exceed ``ceil(s * d)`` (only possible when clients pruned more than the target, e.g. a
higher sparsity of their own), they all stay pruned: the server never revives a weight
that no client kept, since its aggregate value is 0 anyway.

For N:M patterns expansion works inside each group of ``m`` consecutive input columns:
the ``n`` entries with the fewest prune votes are kept (ties by larger ``|W_g|``, then
smaller index), so the global model stays valid N:M.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from llm_pruning.pruners.masks import num_to_prune as client_num_to_prune

logger = logging.getLogger(__name__)


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def num_to_prune(numel: int, sparsity: float) -> int:
    """Number of entries a matrix of ``numel`` entries has pruned at ``sparsity``: ``ceil(s*d)``.

    The clients' count (:func:`llm_pruning.pruners.masks.num_to_prune`), after checking the
    arguments, so server and clients always agree on a matrix's target.

    Raises
    ------
    ValueError
        If ``sparsity`` is not in [0, 1) or ``numel`` is negative.
    """
    sparsity = _check_sparsity(sparsity)
    if numel < 0:
        raise ValueError(f"numel must be non-negative, got {numel}")
    return client_num_to_prune(numel, sparsity)


def _check_votes(weight: Tensor, prune_votes: Tensor, num_clients: int | None) -> None:
    if prune_votes.shape != weight.shape:
        raise ValueError(
            f"prune_votes shape {tuple(prune_votes.shape)} != weight shape {tuple(weight.shape)}"
        )
    if prune_votes.dtype.is_floating_point or prune_votes.dtype in (torch.bool, torch.uint8):
        raise ValueError(f"prune_votes must be a signed integer tensor, got {prune_votes.dtype}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite values")
    if prune_votes.numel() and int(prune_votes.min()) < 0:
        raise ValueError("prune_votes must be non-negative")
    if num_clients is not None and prune_votes.numel() and int(prune_votes.max()) > num_clients:
        raise ValueError(f"prune_votes exceed num_clients={num_clients}")


def _magnitude_key(weight: Tensor) -> Tensor:
    """``|W|`` in a dtype kthvalue/sort handle on every device, without losing order."""
    magnitude = weight.abs()
    # fp16/bf16 -> float32 is exact; float32/float64 stay as they are.
    return magnitude.float() if magnitude.dtype in (torch.float16, torch.bfloat16) else magnitude


def _vote_threshold(votes: Tensor, num_clients: int, k: int) -> tuple[int, int]:
    """Find the vote level ``v`` at which the ``k`` extra prunes run out.

    Returns ``(v, r)``: prune every entry with ``v < C_j < N`` and ``r`` entries with
    ``C_j = v``. Requires ``1 <= k <= #{C_j < N}``.
    """
    counts = torch.bincount(votes, minlength=num_clients + 1).tolist()
    remaining = k
    for level in range(num_clients - 1, -1, -1):
        if counts[level] >= remaining:
            return level, remaining
        remaining -= counts[level]
    raise AssertionError("k exceeds the number of entries not pruned by every client")


def _smallest_by_magnitude(flat_weight: Tensor, candidates: Tensor, r: int) -> Tensor:
    """Pick the ``r`` candidates (sorted flat indices) with smallest ``|W|``, then index.

    Uses selection (kthvalue) for the threshold and resolves ties at the threshold by
    index, instead of sorting all candidates. Magnitudes are taken for the candidates
    only, not the whole matrix.
    """
    if r >= candidates.numel():
        return candidates
    values = _magnitude_key(flat_weight[candidates])
    threshold = torch.kthvalue(values, r).values  # r-th smallest, 1-based
    below = candidates[values < threshold]
    # candidates are in increasing index order, so the first ties are the smallest indices.
    at_threshold = candidates[values == threshold][: r - below.numel()]
    return torch.cat([below, at_threshold])


def expand_mask(weight: Tensor, prune_votes: Tensor, num_clients: int, sparsity: float) -> Tensor:
    """Adaptive mask expansion of one matrix to exactly ``ceil(s*d)`` pruned entries.

    Parameters
    ----------
    weight
        Aggregated matrix ``W_g`` (any shape).
    prune_votes
        Integer tensor, same shape: ``C_j``, how many of the ``num_clients`` pruned ``j``.
    num_clients
        ``N``, the number of clients aggregated into ``weight``.
    sparsity
        Target sparsity ``s`` in [0, 1).

    Returns
    -------
    Tensor
        Bool keep-mask of ``weight``'s shape (True = kept).

    Raises
    ------
    ValueError
        On a bad sparsity, ``num_clients < 1``, mismatched shapes, votes outside
        ``[0, num_clients]`` or non-finite weights.
    """
    target = num_to_prune(weight.numel(), sparsity)
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    _check_votes(weight, prune_votes, num_clients)
    votes = prune_votes.reshape(-1)  # no int64 copy: bincount and comparisons take int32
    prune = votes == num_clients  # (d,) already zero in W_g: always stays pruned
    num_all_pruned = int(prune.sum())
    extra = target - num_all_pruned
    if extra > 0:
        level, r = _vote_threshold(votes, num_clients, extra)
        prune |= votes > level
        candidates = torch.nonzero(votes == level).squeeze(1)  # ascending flat indices
        prune[_smallest_by_magnitude(weight.reshape(-1), candidates, r)] = True
    elif extra < 0:
        logger.debug(
            "%d entries pruned by all clients exceed the target %d; keeping them pruned",
            num_all_pruned,
            target,
        )
    return ~prune.reshape(weight.shape)


def expand_mask_nm(weight: Tensor, prune_votes: Tensor, n: int, m: int) -> Tensor:
    """N:M mask expansion: keep ``n`` of every ``m`` consecutive entries along the last dim.

    Within each group the ``n`` entries with the fewest prune votes are kept, ties broken
    by larger ``|W_g|``, then by smaller index.

    Parameters
    ----------
    weight
        Aggregated matrix ``W_g`` of shape ``(..., in_features)``.
    prune_votes
        Integer tensor of the same shape: clients that pruned each entry.
    n, m
        Keep ``n`` out of every ``m`` entries, ``0 < n < m``.

    Returns
    -------
    Tensor
        Bool keep-mask of ``weight``'s shape with exactly ``n`` True per group.

    Raises
    ------
    ValueError
        If not ``0 < n < m``, the last dim is not divisible by ``m``, or the shapes or
        dtypes do not fit.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < n < m, got {n}:{m}")
    if weight.dim() < 1 or weight.shape[-1] % m != 0:
        raise ValueError(f"last dim of shape {tuple(weight.shape)} is not divisible by m={m}")
    _check_votes(weight, prune_votes, None)
    magnitude = _magnitude_key(weight).reshape(-1, m)  # (groups, m)
    votes = prune_votes.reshape(-1, m)
    # Lexicographic order by two stable sorts, least significant key first: index order is
    # the initial order, then larger |W| first, then fewer votes first.
    by_magnitude = torch.sort(magnitude, dim=1, descending=True, stable=True).indices
    votes_in_order = torch.gather(votes, 1, by_magnitude)
    by_votes = torch.sort(votes_in_order, dim=1, stable=True).indices
    ranked = torch.gather(by_magnitude, 1, by_votes)  # (groups, m) columns, best first
    keep = torch.zeros_like(votes, dtype=torch.bool)
    keep.scatter_(1, ranked[:, :n], True)
    return keep.reshape(weight.shape)
