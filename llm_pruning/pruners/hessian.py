"""The Hessian ``H = Σ xᵀx`` as SparseGPT and the masked least squares both prepare it.

The same dead-input rule and the same dampening, in one place, so that ``sparsegpt.py`` and
``lsq.py`` solve the same problem.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 5  # each retry multiplies the dampening by 10


def prepared_hessian(
    hessian: Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """A copy of ``Σ xᵀx`` in ``dtype`` on ``device`` whose dead inputs have a unit diagonal.

    An input that is always zero carries no information: its weights can go for free, and the
    unit diagonal keeps ``H`` invertible without touching the other inputs.

    Returns
    -------
    tuple[Tensor, Tensor]
        The ``(in, in)`` copy and the ``(in,)`` bool mask of dead inputs (``diag H == 0``).
    """
    hessian = hessian.to(device=device, dtype=dtype, copy=True)
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    return hessian, dead


def damping_attempts(matrix: Tensor, base_damp: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Dampen ``matrix`` in place, more on each step: yields ``(attempt, damp)`` once its
    diagonal holds ``+ damp``, ``damp = base_damp · 10^attempt`` for attempts 0 to 5.

    SparseGPT's factor and the masked least squares (:mod:`llm_pruning.pruners.lsq`) both take
    the first dampening at which ``H + λI`` factors, so they solve the same problem.
    """
    applied = 0.0
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damp = base_damp * 10**attempt
        matrix.diagonal().add_(damp - applied)
        applied = damp
        yield attempt, damp


def log_damping_retries(base_damp: Tensor, damp: Tensor, attempt: int) -> None:
    """Warn that the dampening had to grow (nothing when the first attempt succeeded)."""
    if attempt > 0:
        logger.warning(
            "Hessian not positive definite with dampening %.3g; "
            "succeeded with %.3g after %d retries",
            float(base_damp),
            float(damp),
            attempt,
        )
