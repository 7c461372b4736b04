"""Calibration statistics: running float32 sums over a Linear layer's inputs.

Both data-driven pruners need only sums over token rows (SparseGPT ``Σ xᵀx``, Wanda ``Σ x²``
per column) plus the number of rows, so statistics from several batches, or several clients,
add up to those of the pooled data: the property that the ``exact`` strategy relies on.
"""

from __future__ import annotations

import torch
from torch import Tensor


class InputStats:
    """Base of the statistics accumulators; a subclass owns :attr:`sums` and how rows add to it.

    Parameters
    ----------
    num_inputs
        Input features of the layer (columns of its weight).
    """

    def __init__(self, num_inputs: int) -> None:
        self.num_inputs = num_inputs
        self.count = 0  # token rows seen

    @property
    def sums(self) -> Tensor:
        """The accumulated float32 sums, on the layer's device."""
        raise NotImplementedError

    def _accumulate(self, rows: Tensor) -> None:
        """Add ``rows`` ``(rows, num_inputs)`` float32, already on the device, to :attr:`sums`."""
        raise NotImplementedError

    def add(self, inputs: Tensor) -> None:
        """Accumulate a batch of layer inputs of shape ``(..., num_inputs)``."""
        if inputs.shape[-1] != self.num_inputs:
            raise ValueError(
                f"inputs have {inputs.shape[-1]} features; these stats expect {self.num_inputs}"
            )
        rows = inputs.reshape(-1, self.num_inputs).to(self.sums.device, torch.float32)
        self._accumulate(rows)
        self.count += rows.shape[0]

    def merge(self, other: InputStats) -> None:
        """Add another accumulator's sums (another batch set or another client) to this one."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.num_inputs != self.num_inputs:
            raise ValueError(
                f"cannot merge stats of {other.num_inputs} and {self.num_inputs} inputs"
            )
        self.sums.add_(other.sums.to(self.sums.device))
        self.count += other.count
