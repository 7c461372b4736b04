"""What a pruned-layers payload must hold, known before it is read: per matrix its shape,
pattern and value dtype (:class:`MatrixSpec`), the most bytes it may take, and the check of a
decoded payload's names and shapes against the matrices asked for."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedspallm_strategy.wire.int8_values import nbytes, rows_of
from fedspallm_strategy.wire.safetensors_reader import (
    HEADER_ALLOWANCE,
    HEADER_ALLOWANCE_PER_MATRIX,
    PayloadError,
    check_names,
)
from llm_pruning.pruners import SparsityPattern, num_to_prune


@dataclass(frozen=True)
class MatrixSpec:
    """What the server's assignment implies one matrix of a reply holds, known before the
    reply is read: its shape, the pattern it was pruned to, and the wire dtype of its kept
    values (a float dtype, or int8 with a scale per row; ``None``: the pruner keeps the dense
    values, so the payload is mask-only)."""

    shape: tuple[int, int]
    pattern: SparsityPattern
    dtype: torch.dtype | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def kept(self) -> int:
        """Entries the pattern keeps: every pruner prunes exactly this many of the others."""
        if self.pattern.is_nm:
            return self.numel // self.pattern.m * self.pattern.n
        return self.numel - num_to_prune(self.numel, self.pattern.sparsity)

    @property
    def rows(self) -> int:
        """Rows: an int8 payload's scales, one each."""
        return rows_of(self.shape)

    @property
    def mask_bytes(self) -> int:
        return (self.numel + 7) // 8

    @property
    def nbytes(self) -> int:
        """Tensor bytes of this matrix in a payload (values and int8 scales, if any, plus the
        packed mask)."""
        values = 0 if self.dtype is None else nbytes(self.dtype, self.kept, self.rows)
        return values + self.mask_bytes


def payload_limit(expected: Mapping[str, MatrixSpec]) -> int:
    """The most bytes a valid payload of ``expected`` can take: its exact tensor data plus a
    generous header allowance."""
    data = sum(spec.nbytes for spec in expected.values())
    return data + 8 + HEADER_ALLOWANCE + HEADER_ALLOWANCE_PER_MATRIX * len(expected)


def _check_names_and_shapes(
    kind: str, found: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> None:
    check_names(kind, found, expected)
    for name, shape in expected.items():
        if tuple(found[name].shape) != tuple(shape):
            raise PayloadError(
                f"{name}: {kind} shape {tuple(found[name].shape)} != expected {tuple(shape)}"
            )


def validate_layer(
    tensors: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    require_values: bool,
) -> None:
    """Check a decoded payload against the matrices the server asked for.

    Parameters
    ----------
    tensors, masks
        What :func:`decode` returned.
    expected
        Name -> shape of every matrix the payload must hold, and nothing else.
    require_values
        Whether values must be present (pruners that update weights). Values sent when
        not required are still checked.

    Raises
    ------
    PayloadError
        If a name is missing or unexpected, or a shape differs.
    """
    _check_names_and_shapes("masks", masks, expected)
    if require_values or tensors:
        _check_names_and_shapes("values", tensors, expected)
