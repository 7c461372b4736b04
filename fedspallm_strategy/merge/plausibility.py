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

A matrix bound leaves room for one entry to go far: one flipped exponent bit (−0.050 → −0.796
in a SmolLM2 matrix whose largest |value| is 0.077) hardly moves the matrix. So each entry's
change is bounded too, in units of the dense kept values' RMS: ``|w − d| ≤ ENTRY_FACTOR ×
bound × rms(D)``. In those units honest SparseGPT changes look alike on real and random
weights; the worst entry, over ``√(s / (1 − s))``, measured (SmolLM2-135M: 8 × 256 tokens of
python-docs, layers 0, 15 and 29, all 7 Linears; its own mask, then another shard re-solving
under that mask as the layer-wise re-solve does):

=========================  =====  =====  =====  =====
worst |w − d| / rms(D) / √  50 %   70 %   80 %   2:4
=========================  =====  =====  =====  =====
SmolLM2, own mask           2.03   2.32   2.80   6.93
SmolLM2, re-solve           3.27   3.59   4.17   8.54
SmolLM2, global, all layers                       30.2
tiny-llama (2 × 64 tokens)  3.16   4.11   3.19   4.26
tiny-opt (2 × 64 tokens)    2.35   4.98   2.53   3.21
=========================  =====  =====  =====  =====

The "global" line is a whole federated run (``calibration='global'``, two python-docs shards,
every matrix of the 30 layers, the prune and re-solve replies): one matrix, layer 24's
``o_proj``, needs 27.8 to 30.2 at 2:4; the next worst needs 10.7. ``ENTRY_FACTOR`` 20 leaves
3× or more over every unstructured case; under N:M, ``ENTRY_FACTOR_NM`` 40 leaves 1.3× over
that matrix. The bit flip above is 32 to 316 RMS (by matrix: the RMS of SmolLM2's kept weights
is 1/4 to 1/26 of their largest |value|), refused at 50 % in every matrix and, at 2:4, where it
is over 40 (in units of the largest |value| honest changes differed 4× between SmolLM2 and the
random models: a worse common scale).

Zeroed kept values have a relative change of exactly 1, inside the bound at 50 %, and move
the model as far again from the honest one. Honest compensation adds to the kept weights:
their norm was 1.005 to 1.6 × the dense kept norm in every matrix measured. SparseGPT zeroes
kept weights only of inputs that are always 0, and prunes those first, so a norm under
``VANISH_FLOOR`` (0.5) of the dense one is refused.
"""

from __future__ import annotations

import math

from torch import Tensor

from fedspallm_strategy.wire.safetensors_reader import PayloadError
from llm_pruning.pruners import SparsityPattern

# At sparsity 0 nothing is compensated, only rounded to the wire dtype (bf16: 2⁻⁸ relative;
# int8: half a step of a row's absmax / 127, a few % of a matrix's norm at most).
_MIN_SCALE = 0.05
# One entry may move ENTRY_FACTOR x the matrix bound x the RMS of the dense kept values
# (ENTRY_FACTOR_NM under an N:M pattern, whose compensation concentrates more: see above).
ENTRY_FACTOR = 20.0
ENTRY_FACTOR_NM = 40.0
# The kept values' norm may not fall under this share of the dense kept values' norm.
VANISH_FLOOR = 0.5


def change_bound(pattern: SparsityPattern, max_relative_change: float) -> float:
    """The largest relative change on kept entries a reply of ``pattern`` may show."""
    s = pattern.sparsity
    return max_relative_change * max(math.sqrt(s / (1 - s)), _MIN_SCALE)


def entry_factor(pattern: SparsityPattern) -> float:
    """How many matrix bounds (in dense kept RMS) one entry of a ``pattern`` reply may move."""
    return ENTRY_FACTOR_NM if pattern.m else ENTRY_FACTOR


def relative_change(kept: Tensor, dense_kept: Tensor) -> float:
    """``‖kept − dense‖ / ‖dense‖`` in float64 (inf if the dense entries are all 0 and the
    kept ones are not)."""
    dense = dense_kept.double()
    change = (kept.double() - dense).norm().item()
    scale = dense.norm().item()
    return change / scale if scale > 0 else (0.0 if change == 0 else math.inf)


def check_kept_values(
    name: str,
    kept: Tensor,
    dense_kept: Tensor,
    bound: float,
    factor: float = ENTRY_FACTOR,
) -> None:
    """Refuse kept values that moved further from the dense weights than ``bound`` (the
    matrix) or ``factor × bound × rms`` (any one entry; :func:`entry_factor` of the reply's
    pattern), or whose norm vanishes."""
    change = relative_change(kept, dense_kept)
    if not change <= bound:
        raise PayloadError(
            f"{name}: kept values differ from the dense weights by {change:.3g} (relative), "
            f"over the bound {bound:.3g} (max-relative-change x sqrt(s/(1-s)))"
        )
    dense = dense_kept.double()
    norm = dense.norm().item()
    if norm == 0:
        return  # nothing kept, or all dense kept values 0 and unchanged (checked above)
    values = kept.double()
    ratio = values.norm().item() / norm
    if not ratio >= VANISH_FLOOR:
        raise PayloadError(
            f"{name}: kept values vanish: their norm is {ratio:.3g} x the dense weights' "
            f"(at least {VANISH_FLOOR:g}); an honest pruner zeroes kept weights only of "
            "inputs that are always 0"
        )
    rms = norm / math.sqrt(dense.numel())
    moved = (values - dense).abs()
    index = int(moved.argmax())
    limit = factor * bound
    if not moved[index].item() <= limit * rms:
        raise PayloadError(
            f"{name}: kept entry {index} moved from {dense[index].item():.4g} to "
            f"{values[index].item():.4g}, {moved[index].item() / rms:.3g} x the dense kept "
            f"values' RMS; the per-entry bound is {limit:.3g} ({factor:g} x the matrix "
            "bound)"
        )
