"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with approximate OBS weight updates.

For a Linear layer with weight ``W`` (out, in) and calibration inputs ``X`` (rows, in), pruning
minimises the layer-wise reconstruction error ``||W X^T - W_hat X^T||^2``, whose Hessian is
``H = 2 X^T X`` (the factor 2 and any averaging do not matter: the dampening is relative). Columns
are processed left to right; when column ``j`` loses entries, the remaining columns absorb the
error through row ``j`` of the upper Cholesky factor of ``H^{-1}`` (paper, eq. 3 and Algorithm 1),
with updates applied lazily per block of columns.

The statistics are plain sums plus a row count, so they add across batches and across clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from llm_pruning.pruners.hessian import (
    MAX_DAMP_RETRIES,
    damping_attempts,
    log_damping_retries,
    prepared_hessian,
)
from llm_pruning.pruners.lsq import masked_least_squares
from llm_pruning.pruners.masks import SparsityPattern, lowest_k_mask, nm_group_pruned, prune_counts
from llm_pruning.pruners.panel_kernel import panel_sweep
from llm_pruning.pruners.stats import InputStats

logger = logging.getLogger(__name__)

# Columns whose OBS updates go one by one (rank-1, in cache); past a panel they go by matmul.
# 8-32 all measure alike on 576-2048 wide matrices; 16 is a multiple of every usual M.
_PANEL = 16
_SLAB = 512  # columns of L^{-1} per triangular solve, rows per transposed copy
# How the kept values are set once the mask is known: SparseGPT's own sweep, or the exact
# masked least squares (llm_pruning/pruners/lsq.py) started from the sweep's values.
RECONSTRUCTIONS = ("sparsegpt", "lsq")


class HessianStats(InputStats):
    """Running ``Σ xᵀx`` over the inputs of a Linear layer, in float32.

    Parameters
    ----------
    num_inputs
        Input features of the layer (columns of its weight).
    device
        Where the sum lives (the layer's device).
    """

    def __init__(self, num_inputs: int, device: torch.device | str = "cpu") -> None:
        super().__init__(num_inputs)
        self.xtx = torch.zeros(num_inputs, num_inputs, dtype=torch.float32, device=device)

    @property
    def sums(self) -> Tensor:
        return self.xtx

    def _accumulate(self, rows: Tensor) -> None:
        self.xtx.addmm_(rows.T, rows)


def inverse_hessian_factor(hessian: Tensor, damp_fraction: float = 0.01) -> Tensor:
    """Upper Cholesky factor of ``(H + λI)^{-1}`` with ``λ = damp_fraction · mean(diag H)``.

    If ``H + λI`` is not positive definite, ``λ`` grows tenfold up to five times; if it still
    fails (or ``H`` is not finite), a diagonal factor is returned, which reduces SparseGPT to
    Wanda-like scores ``w² · H_jj`` without error propagation (plain magnitude if the diagonal is
    not positive). Both cases log a warning; none raises.

    Parameters
    ----------
    hessian
        ``(in, in)`` float32 ``Σ xᵀx`` with dead inputs already given a unit diagonal.
    damp_fraction
        Relative dampening (the paper's 1 % of the mean diagonal).

    Returns
    -------
    Tensor
        ``(in, in)`` upper-triangular float32 factor ``U`` with ``UᵀU = (H + λI)^{-1}``.
    """
    base_damp = damp_fraction * hessian.diagonal().mean()
    if bool(torch.isfinite(base_damp)):
        # With J the order reversal, chol(J H J) = L gives H^{-1} = (J L^{-1} J)ᵀ (J L^{-1} J), and
        # J L^{-1} J is upper triangular with a positive diagonal: the factor itself. One
        # Cholesky and one triangular inverse, instead of the reference's Cholesky, inverse and
        # second Cholesky (a third less work, and no squaring of the condition number).
        damped = hessian.flip(0, 1)  # a copy: dampened in place, attempt by attempt
        identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
        for attempt, damp in damping_attempts(damped, base_damp):
            lower, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                upper = _lower_inverse(lower, identity).flip(0, 1)
                # A non-finite H (anywhere) leaves NaN or inf in the factor, hence in its sum:
                # one reduction instead of an elementwise check of H and of the factor.
                if bool(torch.isfinite(upper.sum())):
                    log_damping_retries(base_damp, damp, attempt)
                    return upper
    diagonal = hessian.diagonal() + base_damp  # (in,)
    if bool(torch.isfinite(diagonal).all()) and bool((diagonal > 0).all()):
        factor = torch.diag(diagonal.rsqrt())
        kind = "diag(H)"
    else:
        factor = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
        kind = "identity (magnitude pruning)"
    logger.warning(
        "Cholesky of the Hessian failed even with %d-fold more dampening; falling back to a "
        "diagonal inverse Hessian from %s, without error compensation",
        10**MAX_DAMP_RETRIES,
        kind,
    )
    return factor


def check_reconstruction(reconstruction: str) -> None:
    """Raise a ``ValueError`` naming ``reconstruction`` unless it is in :data:`RECONSTRUCTIONS`."""
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(
            f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}; got {reconstruction!r}"
        )


def _transposed(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous ``matrix.T`` in ``dtype``, copied a slab of rows at a time.

    One ``.t().contiguous()`` of a large matrix strides across all of memory; slabs of
    :data:`_SLAB` rows stay in cache, which halves the copy on the CPU (2048²: 6 ms
    instead of 13 ms).
    """
    rows = matrix.shape[0]
    out = torch.empty(matrix.shape[1], rows, dtype=dtype, device=matrix.device)
    for start in range(0, rows, _SLAB):
        out[:, start : start + _SLAB] = matrix[start : start + _SLAB].t()
    return out


def _lower_inverse(lower: Tensor, identity: Tensor) -> Tensor:
    """``L^{-1}`` of a lower-triangular ``L``, one slab of columns at a time.

    Column slab ``[s, e)`` of ``L^{-1}`` is zero above row ``s`` and solves ``L[s:, s:] X =
    I[s:, s:e]``. Solving only those rows takes a third of the arithmetic of one solve against
    the whole identity (LAPACK's triangular inverse is not exposed by torch): 34 ms instead of
    52 ms at 2048 columns on two cores.
    """
    size = lower.shape[0]
    inverse = torch.zeros_like(lower)
    for start in range(0, size, _SLAB):
        end = min(start + _SLAB, size)
        inverse[start:, start:end] = torch.linalg.solve_triangular(
            lower[start:, start:], identity[start:, start:end], upper=False
        )
    return inverse


def sparsegpt_prune(
    weight: Tensor,
    stats: HessianStats | None,
    pattern: SparsityPattern,
    *,
    block_size: int = 128,
    damp_fraction: float = 0.01,
    keep_mask: Tensor | None = None,
    reconstruction: str = "sparsegpt",
) -> tuple[Tensor, Tensor]:
    """Prune a weight matrix with SparseGPT, updating the kept weights to compensate.

    With ``keep_mask`` the mask is given instead of chosen: the same OBS sweep then only
    compensates for it (the masked re-solve of a federation's merged mask). Re-solving under
    the mask SparseGPT itself chose reproduces its weights, since every step is the same.

    Parameters
    ----------
    weight
        ``(out, in)`` weight of a Linear layer; not modified.
    stats
        ``Σ xᵀx`` of the layer's inputs on the calibration data.
    pattern
        Unstructured: each block of columns prunes its exact share (cumulative ceil over columns),
        so the matrix prunes exactly ``num_to_prune(out * in, s)``. N:M: each group of ``m``
        columns keeps, per row, the ``n`` entries of highest OBS saliency ``w² / [H^{-1}]_jj²``.
    block_size
        Columns per lazy-update block (a multiple of ``m`` for N:M).
    damp_fraction
        Dampening relative to the mean of ``diag H``.
    keep_mask
        ``(out, in)`` bool keep-mask to compensate for (``pattern`` then only names the
        pattern the mask is expected to follow); ``None`` lets SparseGPT choose.
    reconstruction
        ``"sparsegpt"``: the kept values are the sweep's. ``"lsq"``: SparseGPT still chooses
        the mask (or takes ``keep_mask``), then the kept values are replaced by the exact
        minimiser of the reconstruction error under that mask
        (:func:`llm_pruning.pruners.lsq.masked_least_squares`, started from the sweep's values;
        several times slower, see there).

    Returns
    -------
    tuple[Tensor, Tensor]
        The pruned, updated weight (same dtype, device, shape; pruned entries exactly 0) and the
        bool keep-mask.
    """
    if stats is None:
        raise ValueError("sparsegpt needs calibration statistics (HessianStats); got None")
    rows, cols = weight.shape
    if stats.num_inputs != cols:
        raise ValueError(f"stats cover {stats.num_inputs} inputs; the weight has {cols} columns")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive; got {block_size}")
    check_reconstruction(reconstruction)
    if pattern.is_nm and (cols % pattern.m or block_size % pattern.m):
        raise ValueError(
            f"N:M {pattern} needs columns ({cols}) and block_size ({block_size}) "
            f"to be multiples of {pattern.m}"
        )
    if keep_mask is not None and (keep_mask.dtype != torch.bool or keep_mask.shape != weight.shape):
        raise ValueError(
            f"keep_mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
            f"got {keep_mask.dtype} {tuple(keep_mask.shape)}"
        )
    given = None if keep_mask is None else keep_mask.t().to(weight.device)  # (in, out)

    # Work on Wᵀ: a column of W is then a contiguous row, which makes the per-column OBS
    # update below about 20x faster on CPU than updating a strided column view.
    work = _transposed(weight.detach(), torch.float32)  # (in, out)
    hessian, dead = prepared_hessian(stats.xtx, work.device)  # (in, in), (in,)
    work[dead, :] = 0.0
    hinv = inverse_hessian_factor(hessian, damp_fraction)  # (in, in), upper triangular

    column_counts = prune_counts(cols, rows, pattern.sparsity)  # (in,), used when unstructured
    chosen = torch.ones(cols, rows, dtype=torch.bool, device=work.device)  # (in, out)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = work[start:end]  # (B, out): the block's columns of W, as rows; updated in place
        block_hinv = hinv[start:end, start:end]  # (B, B)
        block_diag = block_hinv.diagonal().unsqueeze(1)  # (B, 1)
        if given is not None:
            block_keep = given[start:end].clone()
        elif pattern.is_nm:
            block_keep = torch.ones_like(block, dtype=torch.bool)  # chosen group by group
        else:
            # OBS saliency w² / [H^{-1}]_jj² (paper, eq. 3 with the Cholesky row scaling);
            # exact count per block instead of the reference's per-block threshold.
            saliency = block.square() / block_diag.square()
            block_keep = lowest_k_mask(saliency, int(column_counts[start:end].sum()))
        nm = (pattern.n, pattern.m) if given is None and pattern.is_nm else None
        block_err = _sweep_block(block, block_hinv, block_keep, nm)
        block.mul_(block_keep)  # pruned entries exactly 0 (their values went into the errors)
        chosen[start:end] = block_keep
        # Lazy batch update: the columns right of the block absorb its errors at once.
        work[end:].addmm_(hinv[start:end, end:].t(), block_err, alpha=-1.0)

    keep = chosen.t().contiguous()  # back to (out, in)
    if reconstruction == "lsq":
        swept = _transposed(work, torch.float32)
        return masked_least_squares(weight, keep, stats.xtx, damp_fraction, initial=swept), keep
    return _transposed(work, weight.dtype), keep


def _sweep_block(
    block: Tensor, block_hinv: Tensor, keep: Tensor, nm: tuple[int, int] | None
) -> Tensor:
    """The OBS sweep over one block's columns (Algorithm 1's inner loop), in place.

    Column ``j`` in turn loses its pruned entries, and its error ``e_j = (w_j − q_j) / d_j``
    moves into the columns after it through row ``j`` of the factor. Done one column at a time
    over the whole block, that is 128 dependent rank-1 updates of up to 128 × out entries: most
    of the time of a matrix, and memory-bound. Here the rank-1 updates stay inside a panel of
    :data:`_PANEL` columns (a few kB that stay in cache), and the rest of the block takes a
    panel's errors in one matrix product, as the lazy block update does one level up. The
    arithmetic is the same sum in another order: the result equals the column-by-column
    sweep's to float rounding (``tests/test_pruners.py``).

    Parameters
    ----------
    block
        ``(B, out)`` float32 columns of ``W`` as rows, already updated for every earlier block;
        on return each column holds its value when it was reached (pruned entries not yet 0).
    block_hinv
        ``(B, B)`` the block's diagonal block of the upper factor.
    keep
        ``(B, out)`` bool keep-mask; for N:M it is filled in here, group by group, from the
        values when the group is reached (a panel holds whole groups, so that is their final
        value).
    nm
        ``(n, m)`` to choose the N:M mask during the sweep; ``None`` when ``keep`` is fixed.

    Returns
    -------
    Tensor
        ``(B, out)`` the errors ``e_j`` (0 for kept entries), for the lazy update of later blocks.
    """
    size = block.shape[0]
    inverse_diag = block_hinv.diagonal().reciprocal().unsqueeze(1)  # (B, 1)
    err = torch.empty_like(block)
    # e_j = w_j · [pruned] / d_j: one multiply per column with this precomputed scale.
    scale = (~keep).to(block.dtype).contiguous().mul_(inverse_diag)  # (B, out), row-major
    panel = _PANEL if nm is None else (_PANEL - _PANEL % nm[1]) or nm[1]  # whole N:M groups
    sweep = _panel_sweeper(block, block_hinv, inverse_diag, scale, err, nm)
    for first in range(0, size, panel):
        last = min(first + panel, size)
        sweep(first, last)
        if last < size:
            block[last:].addmm_(block_hinv[first:last, last:].t(), err[first:last], alpha=-1.0)
    if nm is not None:
        torch.eq(scale, 0.0, out=keep)  # 1 / d_j is never 0
    return err


def _panel_sweeper(
    block: Tensor,
    factor: Tensor,
    inverse_diag: Tensor,
    scale: Tensor,
    err: Tensor,
    nm: tuple[int, int] | None,
) -> Callable[[int, int], None]:
    """``sweep(first, last)`` for one block's panels: the compiled loop on the CPU, where numba
    is available, else torch ops (see :mod:`llm_pruning.pruners.panel_kernel`)."""
    kernel = panel_sweep() if block.device.type == "cpu" else None
    if kernel is None:
        return _TorchPanel(block, factor, inverse_diag, scale, err, nm)
    arrays = (block, factor.contiguous(), inverse_diag.flatten(), scale, err)
    arrays = tuple(t.numpy() for t in arrays)  # views: the kernel writes the tensors
    n, m = nm or (0, 0)
    return lambda first, last: kernel(*arrays, first, last, n, m)


class _TorchPanel:
    """The in-panel sweep as torch ops: for CUDA tensors, and the CPU without numba.

    It computes what :func:`llm_pruning.pruners.panel_kernel._sweep_panel` does, entry for
    entry; see there for the arguments.
    """

    def __init__(
        self,
        block: Tensor,
        factor: Tensor,
        inverse_diag: Tensor,
        scale: Tensor,
        err: Tensor,
        nm: tuple[int, int] | None,
    ) -> None:
        self.block, self.inverse_diag, self.scale, self.nm = block, inverse_diag, scale, nm
        # Row views made once (one unbind each), not three slicing ops per column.
        self.rows, self.scales, self.errors, self.factor_rows = (
            t.unbind(0) for t in (block, scale, err, factor)
        )

    def __call__(self, first: int, last: int) -> None:
        block, nm = self.block, self.nm
        for j in range(first, last):
            if nm is not None and (j - first) % nm[1] == 0:
                # The scale alone records the choice (0 where kept); the mask follows at the end.
                group = slice(j, j + nm[1])
                saliency = block[group].mul(self.inverse_diag[group]).square_()  # (m, out)
                pruned = nm_group_pruned(saliency, nm[0])
                torch.mul(pruned, self.inverse_diag[group], out=self.scale[group])
            torch.mul(self.rows[j], self.scales[j], out=self.errors[j])
            if j + 1 < last:
                block[j + 1 : last].addr_(
                    self.factor_rows[j][j + 1 : last], self.errors[j], alpha=-1.0
                )
