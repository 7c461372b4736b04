"""The in-panel OBS sweep of SparseGPT as one compiled loop, for CPU tensors.

Inside a panel the sweep is a chain of tiny dependent steps: per column one multiply and one
rank-1 update of at most 15 rows; per N:M group one choice of mask. As torch ops each step
costs ~5-10 µs of dispatch, more than its arithmetic, so a 2048-wide matrix spends most of its
sweep in Python and dispatch. Compiled with numba, the same steps run as plain loops: 2-4x
faster per block on two cores (``bench/engine_speed.py``). The arithmetic is that of the torch
path in ``sparsegpt._sweep_panel`` (same products, same order per entry, same tie rule), and
both are tested against a column-by-column sweep.

numba is imported on first use; where it is missing or cannot compile, :func:`panel_sweep` is
``None`` and the torch path runs (a CUDA tensor always takes the torch path).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

_KERNEL: Callable | None = None
_LOADED = False


def panel_sweep() -> Callable | None:
    """The compiled kernel, or ``None`` where numba is not available (logged once)."""
    global _KERNEL, _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            import numba
        except ImportError:
            logger.info("numba is not installed: the SparseGPT sweep uses torch ops on the CPU")
            return None
        for cache in (True, False):  # no writable cache directory: compile per process
            try:
                # Compiled here, for the one signature the sweep passes, so that a numba that
                # cannot compile falls back now, not in the middle of a layer. With the cache,
                # later processes (Flower's client actors) load the compiled code instead.
                _KERNEL = numba.njit(_SIGNATURE, cache=cache, nogil=True)(_sweep_panel)
                break
            except Exception as error:  # noqa: BLE001 - any failure leaves the torch path
                failure = error
        else:
            logger.warning("numba could not compile the SparseGPT sweep (%s); using torch", failure)
    return _KERNEL


# block, factor, inverse_diag, scale, err (float32, C-contiguous), first, last, n, m
_SIGNATURE = "void(f4[:, ::1], f4[:, ::1], f4[::1], f4[:, ::1], f4[:, ::1], i8, i8, i8, i8)"


def _sweep_panel(
    block: np.ndarray,
    factor: np.ndarray,
    inverse_diag: np.ndarray,
    scale: np.ndarray,
    err: np.ndarray,
    first: int,
    last: int,
    n: int,
    m: int,
) -> None:
    """Rows ``first:last`` of ``block`` (one panel), in place.

    Parameters
    ----------
    block
        ``(B, out)`` float32, the block's columns of ``W`` as rows.
    factor
        ``(B, B)`` float32, the block's diagonal block of the upper inverse-Hessian factor.
    inverse_diag
        ``(B,)`` float32 ``1 / factor[j, j]``.
    scale
        ``(B, out)`` float32 ``[pruned] / d_j``; for N:M (``m > 0``) it is written here, group
        by group (0 where kept).
    err
        ``(B, out)`` float32, receives the errors ``e_j = w_j · scale_j``.
    first, last
        The panel's rows; for N:M a multiple of ``m`` apart.
    n, m
        N:M to choose the mask group by group, or ``0, 0`` when ``scale`` is fixed.
    """
    width = block.shape[1]
    saliency = np.empty(max(m, 1), dtype=np.float32)  # one group's, for one output row
    for j in range(first, last):
        if m > 0 and (j - first) % m == 0:
            for o in range(width):
                # Saliency w² / d² as the torch path computes it, (w · 1/d)².
                for i in range(m):
                    v = block[j + i, o] * inverse_diag[j + i]
                    saliency[i] = v * v
                # Pruned when n or more of the group beat it (higher, or equal at a lower index).
                for i in range(m):
                    beaten_by = 0
                    for a in range(m):
                        if saliency[a] > saliency[i] or (saliency[a] == saliency[i] and a < i):
                            beaten_by += 1
                    scale[j + i, o] = inverse_diag[j + i] if beaten_by >= n else np.float32(0.0)
        for o in range(width):
            err[j, o] = block[j, o] * scale[j, o]
        for k in range(j + 1, last):
            f = factor[j, k]
            for o in range(width):
                block[k, o] -= f * err[j, o]
