"""Keep-masks held between rounds at one bit a weight.

A layer-wise run fixes each matrix's global keep-mask in its prune round and needs it again in
its re-solve round (and, under global calibration, when it is handed down); with local
calibration every layer's mask waits there at once. As bool tensors that is a byte a weight,
the size of an int8 model; packed, an eighth of it.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import numpy as np
import torch
from torch import Tensor

from fedspallm_strategy.wire.int8_values import row_counts


class PackedMasks(MutableMapping[str, Tensor]):
    """A ``name -> bool mask`` mapping that stores each mask bit-packed and unpacks on read."""

    def __init__(self) -> None:
        self._packed: dict[str, tuple[np.ndarray, torch.Size]] = {}
        self._kept: dict[str, int] = {}
        self._row_counts: dict[str, Tensor] = {}  # int8 replies are decoded by them

    def __setitem__(self, name: str, mask: Tensor) -> None:
        if mask.dtype != torch.bool:
            raise ValueError(f"{name}: a keep-mask must be bool, got {mask.dtype}")
        bits = np.packbits(mask.detach().cpu().numpy().reshape(-1))
        self._packed[name] = (bits, mask.shape)
        self._row_counts[name] = row_counts(mask.detach().cpu())
        self._kept[name] = int(self._row_counts[name].sum())

    def __getitem__(self, name: str) -> Tensor:
        bits, shape = self._packed[name]
        flat = np.unpackbits(bits, count=shape.numel()).astype(bool)
        return torch.from_numpy(flat).reshape(shape)

    def __delitem__(self, name: str) -> None:
        del self._packed[name]
        del self._kept[name]
        del self._row_counts[name]

    def kept(self, name: str) -> int:
        """How many entries mask ``name`` keeps, without unpacking it."""
        return self._kept[name]

    def row_counts(self, name: str) -> Tensor:
        """``(rows,)`` int64: the entries each row of mask ``name`` keeps, without unpacking."""
        return self._row_counts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def nbytes(self) -> int:
        """The bytes the packed masks take."""
        return sum(bits.nbytes for bits, _ in self._packed.values())
