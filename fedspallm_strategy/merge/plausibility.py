"""How far an accepted reply's kept values may be from the dense weights the server holds.

A well-formed reply can still be poison: kept values scaled ×1000, random values at the right
sparsity, signs flipped. The server holds the dense model, so it can measure, per matrix, the
relative change on the kept entries, ``‖W − D‖ / ‖D‖`` over the entries the client kept. An
honest weight-updating pruner moves them only to compensate for what it pruned, and that grows
with the sparsity: measured with SparseGPT (8 segments, every matrix of the model), the worst
matrix moves 0.25 / 0.43 / 0.58 (SmolLM2-135M, 50 / 70 / 80 %) and 0.52 / 0.79 / 1.11
(tiny-llama, random weights), about ``0.3 to 0.56 × √(s / (1 − s))`` in every case. The bound is
``max-relative-change × √(s / (1 − s))``, so the default 1.0 leaves a margin of about 2× over
the worst honest matrix seen at every sparsity.
"""

from __future__ import annotations

import math

from torch import Tensor

from fedspallm_strategy.wire.safetensors_reader import PayloadError
from llm_pruning.pruners import SparsityPattern

# At sparsity 0 nothing is compensated, only rounded to the wire dtype (bf16: 2⁻⁸ relative).
_MIN_SCALE = 0.05


def change_bound(pattern: SparsityPattern, max_relative_change: float) -> float:
    """The largest relative change on kept entries a reply of ``pattern`` may show."""
    s = pattern.sparsity
    return max_relative_change * max(math.sqrt(s / (1 - s)), _MIN_SCALE)


def relative_change(kept: Tensor, dense_kept: Tensor) -> float:
    """``‖kept − dense‖ / ‖dense‖`` in float64 (inf if the dense entries are all 0 and the
    kept ones are not)."""
    dense = dense_kept.double()
    change = (kept.double() - dense).norm().item()
    scale = dense.norm().item()
    return change / scale if scale > 0 else (0.0 if change == 0 else math.inf)


def check_kept_values(name: str, kept: Tensor, dense_kept: Tensor, bound: float) -> None:
    """Refuse kept values that moved further from the dense weights than ``bound``."""
    change = relative_change(kept, dense_kept)
    if not change <= bound:
        raise PayloadError(
            f"{name}: kept values differ from the dense weights by {change:.3g} (relative), "
            f"over the bound {bound:.3g} (max-relative-change x sqrt(s/(1-s)))"
        )
