"""Sparsity patterns, exact prune counts and keep-mask selection shared by every pruner.

All masks are boolean *keep*-masks: ``True`` means the entry survives. Every selection here is
deterministic: de-quantised 4-bit weights have many exactly equal magnitudes, so ties are broken
by index with stable sorts rather than left to the sort implementation.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Slack that keeps ``ceil`` from rounding a product such as 0.7 * 10 = 7.000000000000001 up to 8.
_CEIL_SLACK = 1e-9
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_ALLOWED_PATTERNS = "'unstructured' or 'N:M' with integers 0 < N < M (e.g. '2:4', '4:8')"


@dataclass(frozen=True)
class SparsityPattern:
    """Target sparsity of one prunable matrix.

    Parameters
    ----------
    sparsity
        Fraction of entries pruned, in ``[0, 1)``.
    n
        N of N:M: entries kept in every group of ``m``; 0 means unstructured.
    m
        M of N:M: group size along the input (column) dimension; 0 means unstructured.
    """

    sparsity: float
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if not _is_valid_sparsity(self.sparsity):
            raise ValueError(f"sparsity must be a number in [0, 1); got {self.sparsity!r}")
        if (self.n, self.m) == (0, 0):
            return
        if not (0 < self.n < self.m):
            raise ValueError(f"pattern must be {_ALLOWED_PATTERNS}; got '{self.n}:{self.m}'")
        implied = 1.0 - self.n / self.m
        if abs(self.sparsity - implied) > 1e-6:
            raise ValueError(
                f"pattern '{self.n}:{self.m}' implies sparsity {implied:g}, but sparsity is "
                f"{self.sparsity:g}; set sparsity = {implied:g} or pattern = 'unstructured'"
            )

    @classmethod
    def parse(cls, pattern: str, sparsity: float) -> SparsityPattern:
        """Build a pattern from the run-config values ``pattern`` and ``sparsity``.

        Parameters
        ----------
        pattern
            ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        sparsity
            Fraction pruned; for N:M it must equal ``1 - N/M``.

        Raises
        ------
        ValueError
            Naming the offending key(s) and the allowed values.
        """
        if not _is_valid_sparsity(sparsity):
            raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}")
        sparsity = float(sparsity)
        if not isinstance(pattern, str):
            raise ValueError(f"pattern must be {_ALLOWED_PATTERNS}; got {pattern!r}")
        if pattern.strip().lower() == "unstructured":
            return cls(sparsity)
        match = _NM_RE.match(pattern)
        if match is None:
            raise ValueError(f"pattern must be {_ALLOWED_PATTERNS}; got {pattern!r}")
        return cls(sparsity, int(match.group(1)), int(match.group(2)))

    @property
    def is_nm(self) -> bool:
        """Whether this is an N:M (semi-structured) pattern."""
        return self.m > 0

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"unstructured {self.sparsity * 100:g}%"


def _is_valid_sparsity(sparsity: object) -> bool:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        return False
    return 0.0 <= float(sparsity) < 1.0  # False for NaN


def num_to_prune(numel: int, sparsity: float) -> int:
    """Exact number of entries a matrix of ``numel`` entries prunes at ``sparsity``.

    ``ceil(sparsity * numel)``, with a slack so that floating-point noise in the product never
    adds an entry (0.7 * 10 is 7, not 8). The slack grows with the product (``0.55 * 1e8`` is
    ``55000000.00000001``) yet stays far below the fractional part of ``s * d`` for any
    sparsity written with a few decimals. Clients and server share this one count.
    """
    exact = sparsity * numel
    return max(0, math.ceil(exact - _slack(exact)))


def _slack(exact):
    """Float-noise tolerance of ``ceil``: ``1e-9`` plus ``1e-12`` of the value (float or tensor)."""
    return _CEIL_SLACK + 1e-12 * exact


def prune_counts(num_units: int, unit_size: int, sparsity: float) -> Tensor:
    """Spread a matrix's exact prune count over equal units (rows or columns).

    Unit ``u`` prunes ``ceil(s*(u+1)*size) - ceil(s*u*size)`` entries (cumulative ceil): every unit
    is within one entry of ``s * size`` and the total is exactly
    ``num_to_prune(num_units * unit_size, s)``.

    Returns
    -------
    Tensor
        ``(num_units,)`` int64 counts, on the CPU.
    """
    # float64 products equal Python's float products, so the last boundary equals num_to_prune.
    boundaries = torch.arange(num_units + 1, dtype=torch.float64) * unit_size
    products = sparsity * boundaries
    cumulative = torch.ceil(products - _slack(products)).clamp_min(0).to(torch.int64)
    return cumulative[1:] - cumulative[:-1]


def lowest_k_mask(score: Tensor, k: int) -> Tensor:
    """Keep-mask that prunes exactly the ``k`` lowest scores of a 1-D or 2-D tensor.

    Among equal scores the one with the lower flat (row-major) index is pruned first; the sort is
    stable, so the result does not depend on the device or the sort implementation.
    """
    if score.dim() not in (1, 2):
        raise ValueError(f"score must be 1-D or 2-D; got shape {tuple(score.shape)}")
    flat = score.reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must be in [0, {flat.numel()}]; got {k}")
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        # What a stable sort's first k are, without the sort (a selection is linear; sorting a
        # 8192 x 2048 matrix took 1.5 s): every score below the k-th smallest, then the
        # lowest-index ties of it until there are k.
        threshold = _kth_smallest(flat, k)
        below = flat < threshold
        ties = (flat == threshold).nonzero().reshape(-1)[: k - int(below.sum())]
        keep[below] = False
        keep[ties] = False
    return keep.reshape(score.shape)


def _kth_smallest(flat: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor, as a 0-d tensor on its device.

    On the CPU, numpy's introselect is 20-40x faster than ``torch.kthvalue`` on the 262k
    saliencies of a SparseGPT block (0.5 ms against 10-25 ms); both return the exact value.
    """
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        values = flat.detach().contiguous().numpy()
        return torch.tensor(np.partition(values, k - 1)[k - 1], dtype=flat.dtype)
    return torch.kthvalue(flat, k).values


def row_lowest_mask(score: Tensor, counts: Tensor) -> Tensor:
    """Keep-mask that prunes, in each row ``r``, the ``counts[r]`` lowest scores of that row.

    Ties are pruned in order of lower column index (stable sort).
    """
    rows, cols = score.shape
    order = torch.sort(score, dim=1, stable=True).indices  # (rows, cols)
    counts = counts.to(score.device).reshape(rows, 1)
    prune_sorted = torch.arange(cols, device=score.device).unsqueeze(0) < counts  # (rows, cols)
    prune = torch.zeros_like(prune_sorted).scatter_(1, order, prune_sorted)
    return ~prune


def nm_keep_mask(score: Tensor, n: int, m: int) -> Tensor:
    """N:M keep-mask: in every row, each group of ``m`` consecutive columns keeps its ``n`` highest.

    Among equal scores in a group the lower column index is kept.

    Raises
    ------
    ValueError
        If the number of columns is not a multiple of ``m``, or not ``0 < n < m``.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M; got {n}:{m}")
    rows, cols = score.shape
    if cols % m != 0:
        raise ValueError(
            f"N:M {n}:{m} needs the number of columns ({cols}) to be a multiple of {m}"
        )
    groups = score.reshape(rows, cols // m, m)  # (rows, groups, m)
    # Stable descending sort keeps equal scores in index order, so the lower index ranks higher.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep_sorted = torch.arange(m, device=score.device) < n  # (m,)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order, keep_sorted.expand_as(order).contiguous())
    return keep.reshape(rows, cols)


def nm_group_pruned(score: Tensor, n: int) -> Tensor:
    """Which entries one N:M group prunes, the group held as rows: ``score`` is ``(m, rows)``
    (the group's ``m`` columns, transposed); returns a ``(m, rows)`` bool mask, True where
    pruned. Each column keeps its ``n`` highest scores, ties to the lower index.

    The choice of :func:`nm_keep_mask`, made for the small groups SparseGPT chooses one at a
    time in a few elementwise ops instead of a sort and a scatter (on the CPU a 2:4 sweep of
    2048 columns spent 210 ms with ``topk``, 165 ms with this). Scores must be non-negative
    floats, whose bit patterns order as the floats do, so the keys ``bits * m + (m - 1 -
    index)`` are distinct and break ties by index exactly; an entry is pruned when ``n`` or
    more keys of its column beat it.
    """
    m = score.shape[0]
    order = torch.arange(m - 1, -1, -1, device=score.device).unsqueeze(1)  # (m, 1)
    keys = score.contiguous().view(torch.int32).to(torch.int64).mul_(m).add_(order)  # (m, rows)
    beaten_by = torch.gt(keys.unsqueeze(1), keys.unsqueeze(0)).sum(0, dtype=torch.uint8)
    return beaten_by >= n


def nm_group_counts(keep: Tensor, m: int) -> Tensor:
    """Kept entries of every group of ``m`` consecutive columns of each row of a 2-D mask,
    ``(rows, cols // m)``: what an N:M pattern fixes at N."""
    rows, cols = keep.shape
    return keep.reshape(rows, cols // m, m).sum(dim=-1)
