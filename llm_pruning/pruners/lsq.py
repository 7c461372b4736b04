"""Exact masked least squares: the best kept values once a keep-mask is fixed.

With the mask fixed, each output row ``w`` of a Linear weight (dense row ``w₀``) should minimise
the layer's reconstruction error ``‖(w − w₀) Xᵀ‖² = (w − w₀) H (w − w₀)ᵀ``, ``H = Σ xᵀx``, with
its pruned entries ``P`` forced to 0. With ``S`` the kept entries the minimum is

    w_S = w₀_S + H_SS⁻¹ H_SP w₀_P,

one linear system per row, each with its own ``S``. SparseGPT's one-pass sweep only
approximates it (a kept weight absorbs the errors of pruned columns to its left, never those to
its right): on SmolLM2-135M's Hessians its error is 1.3-4.4x this optimum (below).

The problem is SparseGPT's exactly: ``H`` with the same dead-input rule (an input with
``diag H = 0`` gets ``H_dd = 1`` and its weights 0) and the same dampening ``λ = damp_fraction ·
mean(diag H)``, grown tenfold while ``H + λI`` does not factor
(:func:`llm_pruning.pruners.sparsegpt.damping_attempts`); ``H`` below means ``H + λI``.

Solver: preconditioned conjugate gradients on all rows at once
---------------------------------------------------------------
Every row's system ``H_SS x = b`` is solved by preconditioned conjugate gradients (PCG), all
rows in one batch: the rows' products ``H_SS p_S`` are one matrix product ``(P H) ⊙ M`` (``P``
is 0 off the mask), with a step length per row. The start is SparseGPT's solution when the
caller has it (feasible, and two or three iterations closer than ``W₀ ⊙ M``). A row stops once
``rᵀ M⁻¹ r ≤ tolerance · f``, its preconditioned squared residual against its current error
``f`` (tracked exactly: ``f`` drops by ``α rᵀM⁻¹r`` per step, at no product's cost), which
estimates the share by which ``f`` is still above the optimum. Converged rows leave the batch.
Rows with nothing to solve (all kept, none kept, or only zeros pruned) keep ``w₀ ⊙ mask``.

The preconditioner (:class:`_LowRankJacobi`) is Jacobi plus the top of the spectrum: ``H``
scaled to a unit diagonal is approximated as ``V Λ Vᵀ + diag(ρ)`` from its top eigenpairs (a
few subspace-iteration steps), and each row gets the exact inverse of that approximation on its
kept entries by Woodbury (a ``rank x rank`` matrix per row, built once by one product). Plain
Jacobi needed 8-48 iterations on SmolLM2-135M's layers 0 and 3, slowed by their large scaled
eigenvalues (25-200 against a median of 0.1-0.5), and stopped further from the optimum; this
needs 5-24, at about 10 % more per iteration. (Preconditioning with the full ``H⁻¹``
restricted to the mask halved the iterations, but costs a second product per iteration.)

The alternative, a batched direct solve (rows sorted by kept count, ``torch.linalg.cholesky`` on
the gathered ``H_SS`` blocks), costs ``|S|³/3`` per row, against ``2 · in²`` per row and
iteration for CG: for 2048 inputs at 50 % that is 40 iterations' worth, and batched Cholesky of
blocks this small runs far below the matrix-product rate. Measured by ``python
bench/lsq_speed.py`` (2 CPU cores, torch on 2 threads, load average 1 at the start; one run
each, so times are good to 10-30 %). ``lsq`` is the time added to SparseGPT's, ``its`` its
iterations, ``direct`` the float32 batched direct solve timed on 32 rows and scaled to all;
errors ``‖(W − W₀) X‖²`` relative to a float64 direct solve (sampled rows), ``lsq@4`` capped
at 4 iterations. Synthetic activations tuned to SmolLM2's scaled Hessians::

    shape      pattern  sgpt s   lsq s  its  total/sgpt  direct s   error: sgpt    lsq  lsq@4
    576x576     50 %    0.028   0.076    9       3.8x       0.9           1.86 1.0018  1.040
    576x576     70 %    0.040   0.089    7       3.2x       0.4           1.95 1.0019  1.016
    576x576      2:4    0.028   0.112    9       5.0x       1.0           1.75 1.0016  1.038
    1536x576    50 %    0.042   0.188    9       5.5x       3.1           1.88 1.0020  1.042
    1536x576    70 %    0.038   0.168    7       5.5x       1.1           2.03 1.0022  1.018
    1536x576     2:4    0.044   0.183    9       5.1x       1.9           1.85 1.0022  1.040
    576x1536    50 %    0.135   0.492    9       4.6x       8.6           2.06 1.0030  1.053
    576x1536    70 %    0.115   0.380    7       4.3x       3.1           2.25 1.0032  1.024
    576x1536     2:4    0.122   0.425    9       4.5x       7.7           1.93 1.0026  1.049
    2048x2048   50 %    0.353   1.885    7       6.3x      43.6           1.93 1.0040  1.029
    2048x2048   70 %    0.361   1.784    6       5.9x      14.7           1.92 1.0051  1.013
    2048x2048    2:4    0.428   2.062    7       5.8x      39.8           1.82 1.0032  1.026
    8192x2048   50 %    0.825   8.549    8      11.4x     162.3           1.96 1.0022  1.048
    8192x2048   70 %    0.754   8.036    7      11.7x      75.0           2.01 1.0028  1.020
    8192x2048    2:4    1.033  10.470    8      11.1x     224.4           1.90 1.0017  1.044

On SmolLM2-135M's own Hessians (``--model smollm2-135m --layers 0,3``, all 42 matrix and
pattern pairs): SparseGPT 1.26-4.4x the optimum, lsq 1.002-1.015, in 5-24 iterations, 2.5-6.8x
SparseGPT's time (``lsq@4``: 1.002-1.48). So CG beats the direct solve by 4-27x, but the target
of at most 2x SparseGPT's time is out of reach for an exact solve: SparseGPT's whole sweep is
about one matrix product's work, lsq's setup alone (the dampening's Cholesky, the eigenpairs,
the first residual, the per-row Woodbury matrices) costs about as much or more (1-1.5x
SparseGPT at 576 inputs, four to five products at 8192x2048), and then come 5-25 iterations of
a product each. ``max_iterations`` trades accuracy for time (``lsq@4``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from llm_pruning.pruners.hessian import damping_attempts, log_damping_retries, prepared_hessian

logger = logging.getLogger(__name__)

# rᵀM⁻¹r ≤ tolerance · f: the error ends 0.2-1.5 % above its optimum (bench/lsq_speed.py, on
# SmolLM2's and synthetic Hessians); 1e-3 gets 0.2-0.4 % for 2-6 more iterations, 1e-2 1-2 %.
TOLERANCE = 3e-3
MAX_ITERATIONS = 64
# Rows per batch: bounds the solver's six (rows, in) work tensors to 6 x 64 MiB in float32.
_BATCH_ELEMENTS = 1 << 24
# Converged rows leave the batch once they are this share of it: gathering the survivors costs
# a few passes over memory, worth it only for a sizeable cut of the next products.
_COMPACT_SHARE = 0.125
# Eigenpairs of the scaled Hessian taken into the preconditioner: one per _INPUTS_PER_RANK
# inputs, at most _RANK (18 at 576 inputs, 64 from 2048 on: wider Hessians have more large
# eigenvalues; at 2048 rank 16, 32, 64 took 23, 16, 9 iterations). Building the per-row
# Woodbury matrices costs rank²/2 multiply-adds per weight (one product's worth at 64 and
# 2048), applying them 2 · rank / in of a product per iteration. Then the subspace-iteration
# steps that find the pairs, and the least share of the unit diagonal left to the rest ρ
# (keeps the preconditioner away from singular).
_INPUTS_PER_RANK = 32
_RANK = 64
_SUBSPACE_STEPS = 4
_REST_FLOOR = 0.05


def masked_least_squares(
    weight: Tensor,
    keep_mask: Tensor,
    hessian: Tensor,
    damp_fraction: float = 0.01,
    *,
    initial: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    tolerance: float = TOLERANCE,
    max_iterations: int = MAX_ITERATIONS,
) -> Tensor:
    """The kept values that minimise ``‖(W − W₀) Xᵀ‖²`` under a fixed keep-mask.

    Parameters
    ----------
    weight
        ``(out, in)`` dense weight ``W₀``; not modified.
    keep_mask
        ``(out, in)`` bool keep-mask (``True`` = kept).
    hessian
        ``(in, in)`` float32 or float64 ``Σ xᵀx`` (one client's, or a federation's sum);
        not modified.
    damp_fraction
        Dampening relative to the mean of ``diag H``, as in SparseGPT.
    initial
        ``(out, in)`` start, e.g. SparseGPT's weight under the same mask; ``None`` starts from
        ``W₀ ⊙ mask``. Only its kept entries are read.
    dtype
        Precision of the solve: float32, or float64 for a reference.
    tolerance
        A row stops once ``rᵀM⁻¹r ≤ tolerance · f`` (module docstring).
    max_iterations
        Cap on the iterations (matrix products) per batch of rows.

    Returns
    -------
    Tensor
        The new weight, dtype and device of ``weight``, exactly 0 outside ``keep_mask``.
    """
    _check_arguments(weight, keep_mask, hessian, initial)
    device = weight.device
    hessian, dead = prepared_hessian(hessian, device, dtype)
    # A dead input's weight goes, kept or not (SparseGPT's rule): out of the mask, it is also
    # out of the solve, where the preconditioner's dense vectors could otherwise reach it.
    keep = keep_mask.to(device) & ~dead
    dense = weight.detach().to(dtype=dtype, copy=True)
    dense[:, dead] = 0.0  # nor do they count in the error that the solve tracks
    result = dense * keep
    damped = _damped(hessian, damp_fraction)
    if damped is None:
        logger.warning(
            "Hessian not positive definite even with 10^5-fold more dampening (or not "
            "finite): kept values left as they are, without error compensation"
        )
        return result.to(weight.dtype)
    start = result if initial is None else initial.detach().to(device=device, dtype=dtype) * keep
    _solve_rows(result, dense, keep, start, damped, tolerance, max_iterations)
    return result.mul_(keep).to(weight.dtype)  # 0 outside the mask even if a value went NaN


def _solve_rows(
    result: Tensor,
    dense: Tensor,
    keep: Tensor,
    start: Tensor,
    damped: Tensor,
    tolerance: float,
    max_iterations: int,
) -> None:
    """Write into ``result`` the solution of every row that has something to solve, in
    batches of rows that bound the solver's memory."""
    rows = _rows_to_solve(dense, keep)
    if not rows.numel():
        return
    inputs = dense.shape[1]
    preconditioner = _LowRankJacobi(damped, min(_RANK, inputs // _INPUTS_PER_RANK))
    per_batch = max(1, _BATCH_ELEMENTS // inputs)
    for first in range(0, rows.numel(), per_batch):
        batch = rows[first : first + per_batch]
        solver = _BatchedPCG(
            dense[batch], keep[batch], start[batch], damped, preconditioner, tolerance
        )
        result[batch] = solver.run(max_iterations)


def _check_arguments(
    weight: Tensor, keep_mask: Tensor, hessian: Tensor, initial: Tensor | None
) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be (out, in); got shape {tuple(weight.shape)}")
    if keep_mask.dtype != torch.bool or keep_mask.shape != weight.shape:
        raise ValueError(
            f"keep_mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
            f"got {keep_mask.dtype} {tuple(keep_mask.shape)}"
        )
    cols = weight.shape[1]
    if hessian.shape != (cols, cols) or not hessian.is_floating_point():
        raise ValueError(
            f"hessian must be a float ({cols}, {cols}) tensor for a weight with {cols} "
            f"columns; got {hessian.dtype} {tuple(hessian.shape)}"
        )
    if initial is not None and initial.shape != weight.shape:
        raise ValueError(
            f"initial must have the weight's shape {tuple(weight.shape)}; "
            f"got {tuple(initial.shape)}"
        )


def _damped(hessian: Tensor, damp_fraction: float) -> Tensor | None:
    """``H + λI`` with SparseGPT's dampening (the first ``λ`` at which it factors), in place;
    ``None`` when no ``λ`` makes it positive definite and finite."""
    base_damp = damp_fraction * hessian.diagonal().mean()
    if not bool(torch.isfinite(base_damp)):
        return None
    for attempt, damp in damping_attempts(hessian, base_damp):
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0 and bool(torch.isfinite(lower.sum())):
            log_damping_retries(base_damp, damp, attempt)
            return hessian
    return None


def _rows_to_solve(dense: Tensor, keep: Tensor) -> Tensor:
    """Indices of the rows that lose a nonzero weight and keep at least one entry; every
    other row's optimum is ``w₀ ⊙ mask`` itself."""
    loses = ((dense != 0) & ~keep).any(dim=1)
    return torch.nonzero(loses & keep.any(dim=1)).flatten()


def _top_eigenpairs(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Approximate top ``rank`` eigenpairs of a symmetric positive definite ``matrix``.

    A few steps of subspace iteration with oversampling, then Rayleigh-Ritz: ``rank · n²``
    work instead of a full ``eigh`` (12 matrix products' worth at 2048). Started from the
    heaviest columns, so the result is deterministic. The pairs need not be accurate: any
    ``V``, ``λ > 0`` give a valid preconditioner.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``(rank,)`` values, largest first, and ``(n, rank)`` orthonormal vectors.
    """
    if rank == 0:
        return matrix.new_zeros(0), matrix.new_zeros(matrix.shape[0], 0)
    width = min(matrix.shape[0], rank + max(8, rank // 2))
    heaviest = torch.argsort(matrix.square().sum(dim=0), descending=True)[:width]
    basis = torch.linalg.qr(matrix[:, heaviest]).Q
    for _ in range(_SUBSPACE_STEPS):
        basis = torch.linalg.qr(matrix @ basis).Q
    values, vectors = torch.linalg.eigh(basis.T @ matrix @ basis)  # ascending
    values, vectors = values.flip(0)[:rank], (basis @ vectors.flip(1)[:, :rank])
    return values.clamp_min(torch.finfo(values.dtype).tiny), vectors


class _LowRankJacobi:
    """The preconditioner's shared part: ``H + λI`` scaled to a unit diagonal, ``H̃ = s H s``
    with ``s = diag(H)^{-1/2}``, approximated as ``V Λ Vᵀ + diag(ρ)`` from its top eigenpairs
    (``ρ`` the rest of the unit diagonal). Row ``r`` is preconditioned with the exact inverse
    of that approximation restricted to its kept entries, ``s (diag(ρ_S) + V_S Λ V_Sᵀ)⁻¹ s``
    by Woodbury: ``rank × rank`` per row. With rank 0 it is plain Jacobi.

    The top of ``H̃``'s spectrum is what slows Jacobi-CG down (SmolLM2's scaled Hessians: top
    eigenvalues 25-200, median 0.1-0.5); taking it out cut the iterations 2-3x there.
    """

    def __init__(self, damped: Tensor, rank: int) -> None:
        scale = damped.diagonal().rsqrt()  # (in,)
        values, vectors = _top_eigenpairs(damped * scale.unsqueeze(1) * scale, rank)
        rest = (1.0 - (vectors.square() * values).sum(dim=1)).clamp_min(_REST_FLOOR)  # ρ
        self.rank = values.numel()
        self.diagonal = scale.square() / rest  # (in,): the Jacobi-like part, s² / ρ
        self.vectors = vectors * (scale / rest).unsqueeze(1)  # (in, k): V ρ⁻¹ s
        self.inverse_values = values.reciprocal()  # (k,)
        # K_r = Λ⁻¹ + Σ_{j ∈ S} v_j v_jᵀ / ρ_j for every row at once, as mask @ (pairs of V):
        # only the lower triangle's k(k+1)/2 pairs, all that the Cholesky reads.
        later, earlier = torch.tril_indices(self.rank, self.rank, device=damped.device)
        self.lower_entries = later * self.rank + earlier  # flat indices into a (k, k) matrix
        self.products = vectors[:, later] * vectors[:, earlier] / rest.unsqueeze(1)

    def row_inverses(self, mask: Tensor) -> Tensor:
        """``(rows, k, k)`` ``K_r⁻¹``; zero (plain scaled Jacobi) where ``K_r`` does not factor."""
        rows = mask.shape[0]
        if not self.rank:
            return mask.new_zeros(rows, 0, 0)
        gram = mask.new_zeros(rows, self.rank * self.rank)
        gram[:, self.lower_entries] = mask @ self.products  # the upper triangle stays 0
        gram = gram.view(rows, self.rank, self.rank)
        gram.diagonal(dim1=1, dim2=2).add_(self.inverse_values)
        lower, info = torch.linalg.cholesky_ex(gram)
        # A failed factor may hold NaN: replaced by the identity, then its inverse by zero.
        failed = (info != 0).view(-1, 1, 1)
        identity = torch.eye(self.rank, dtype=lower.dtype, device=lower.device)
        lower = torch.where(failed, identity, lower)
        return torch.cholesky_inverse(lower).masked_fill_(failed, 0.0)

    def apply(self, residual: Tensor, mask: Tensor, inverses: Tensor) -> Tensor:
        """``M_r⁻¹ r`` for every row (0 outside the mask, as ``residual``)."""
        result = residual * self.diagonal
        if self.rank:
            coefficients = torch.bmm(inverses, (residual @ self.vectors).unsqueeze(2))
            correction = (coefficients.squeeze(2) @ self.vectors.T).mul_(mask)
            result.sub_(correction)
        return result


class _BatchedPCG:
    """Preconditioned CG on ``H_SS x = H_S· w₀`` for a batch of rows at once.

    Parameters
    ----------
    dense
        ``(rows, in)`` dense rows ``w₀`` (dead inputs zeroed).
    keep
        ``(rows, in)`` bool keep-mask (no dead inputs).
    start
        ``(rows, in)`` initial guess, 0 outside the mask.
    damped
        ``(in, in)`` ``H + λI``.
    preconditioner
        Its shared part, built once per matrix.
    tolerance
        Stop a row once ``rᵀM⁻¹r ≤ tolerance · f``.
    """

    def __init__(
        self,
        dense: Tensor,
        keep: Tensor,
        start: Tensor,
        damped: Tensor,
        preconditioner: _LowRankJacobi,
        tolerance: float,
    ) -> None:
        self.damped, self.preconditioner, self.tolerance = damped, preconditioner, tolerance
        self.solution = start.clone()  # (rows, in): the output, rows written as they converge
        self.rows = torch.arange(start.shape[0], device=start.device)  # still iterating
        self.mask = keep.to(start.dtype)
        self.inverses = preconditioner.row_inverses(self.mask)
        self.x = start.clone()
        # One product gives both the residual r = −(gradient / 2) on the kept entries and the
        # row errors f = (x − w₀) H (x − w₀)ᵀ, which CG then tracks without products.
        delta = self.x - dense
        gradient = delta @ damped
        self.error = (gradient * delta).sum(dim=1)
        self.floor = 1e-6 * self.error  # f below it counts as 0 (rounding of the tracking)
        self.residual = gradient.mul_(self.mask).neg_()
        self.direction = preconditioner.apply(self.residual, self.mask, self.inverses)
        self.rz = (self.residual * self.direction).sum(dim=1)

    def run(self, max_iterations: int) -> Tensor:
        """Iterate until every row converges or ``max_iterations`` products; the solution."""
        iterations = 0
        while self._drop_converged() and iterations < max_iterations:
            self._step()
            iterations += 1
        self.solution[self.rows] = self.x
        if self.rows.numel():
            excess = float((self.rz / self.error.clamp_min(1e-30)).max())
            logger.debug(
                "masked least squares: %d rows stopped at %d iterations (rᵀM⁻¹r / f up to %.2g)",
                self.rows.numel(),
                iterations,
                excess,
            )
        return self.solution

    def _step(self) -> None:
        product = (self.direction @ self.damped).mul_(self.mask)  # H_SS p, every row at once
        curvature = (self.direction * product).sum(dim=1)
        # curvature ≤ 0 only for a zero direction (a row already solved): no step.
        alpha = torch.where(curvature > 0, self.rz / curvature, 0.0)
        self.x.addcmul_(alpha.unsqueeze(1), self.direction)
        self.residual.addcmul_(alpha.unsqueeze(1), product, value=-1.0)
        self.error.sub_(alpha * self.rz)  # exact decrease of f along the step
        preconditioned = self.preconditioner.apply(self.residual, self.mask, self.inverses)
        rz = (self.residual * preconditioned).sum(dim=1)
        beta = torch.where(self.rz > 0, rz / self.rz, 0.0)
        self.direction = preconditioned.addcmul_(beta.unsqueeze(1), self.direction)
        self.rz = rz

    def _drop_converged(self) -> bool:
        """Write converged rows out, and shrink the batch when enough have; whether any row
        still iterates."""
        done = self.rz <= self.tolerance * torch.maximum(self.error, self.floor)
        count = int(done.sum())
        if count == self.rows.numel():
            return False
        if count >= max(1.0, _COMPACT_SHARE * self.rows.numel()):
            self.solution[self.rows[done]] = self.x[done]
            live = ~done
            self.rows = self.rows[live]
            for name in ("mask", "inverses", "x", "error", "floor", "residual", "direction", "rz"):
                setattr(self, name, getattr(self, name)[live])
        return True
