"""Statistics as SecAgg+ vectors: fixed-point digits that survive Flower's quantiser exactly.

Flower's ``secaggplus_mod`` clips each value to ``[-c, c]``, maps it to an integer in
``[0, Q]`` by stochastic rounding, masks it modulo ``2**32`` and the server unmasks the sum.
One such value carries about 30 bits, far fewer than the statistics need: on SmolLM2 the
per-token mean ``x²`` spans 4e4 (an outlier channel) down to 1e-3 within one layer, and any
perturbation of the summed Hessian — rounding to a 2**-39 grid included — moved perplexity by
about 3 %, as much as float32 sums taken in another order. So each value ``v`` goes as
``DIGITS`` numbers that already sit on Flower's grid (``step = 2c / Q``)::

    v = d₁ + d₂ / Q + d₃ / Q²      with every dᵢ a multiple of step in [-c, c]

On the grid the stochastic rounding has nothing to round, the server's sum of each digit is
exact, and three digits give a resolution of ``2c / Q³`` (2**-65 for c = 2**24, Q = 2**30):
every float32 sum above about 1e-10 arrives bit-exact, so with two clients the secure sum is
the plain float32 sum, bit for bit.

A client sends its sums ``S`` scaled by the power of two ``2**-ceil(log2 n)`` (``n`` its token
rows, the same on every client and known to the server): exact, and bounded by the per-token
mean of ``x²``, the quantity ``secure-clipping-range`` bounds. A value outside ``[-c, c]``
fails the client (Flower would clip it silently). Flower-free: tensors and arrays in and out.

A recovery round's changes go as they are, one value per kept weight (:func:`delta_vectors`):
the range is the most an honest ``masked`` client can move one entry (``4 x lr x steps``, the
bound the server checks plain replies against), and on it one step of Flower's grid,
``2c / Q`` with ``Q`` about ``2**32 / K`` for K clients, is ``2**-30`` of the largest possible
change for two clients (``2**-29`` for three or four): about as fine as float32 holds a change
of that size. The rounding is stochastic and unbiased, so the mean is off by at most one step
per entry, and no digits are needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedspallm_strategy.wire.stats_payload import SharedStats, flat_sums, statistics_from_sums
from llm_pruning.pruners import Stats

MODULUS = 2**32  # Flower's largest modulus_range: masks and sums live modulo 2**32
DIGITS = 3  # fixed-point digits per statistic
NPY_HEADER = 128  # Flower ships each masked vector as an .npy file of int64


def quantization_range(clients: int) -> int:
    """The largest power of two ``Q`` with ``clients × Q < 2**32``: no sum can wrap around."""
    if clients < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {clients}")
    return 2 ** math.floor(math.log2((MODULUS - 1) / clients))


def count_scale(count: int) -> float:
    """``2**-ceil(log2 count)``: scaling by it is exact and leaves at most a per-token mean."""
    return 2.0 ** -math.ceil(math.log2(max(count, 1)))


def to_digits(values: np.ndarray, clip: float, q: int) -> list[np.ndarray]:
    """``DIGITS`` float64 arrays on Flower's grid whose weighted sum is ``values``.

    Raises
    ------
    ValueError
        If a value is not finite or lies outside ``[-clip, clip]``.
    """
    values = np.asarray(values, dtype=np.float64)
    largest = float(np.max(np.abs(values), initial=0.0))
    if not largest <= clip:  # also catches NaN
        raise ValueError(
            f"statistics of magnitude {largest:.4g} exceed secure-clipping-range={clip:g}; "
            "raise secure-clipping-range"
        )
    step = 2 * clip / q
    digits, rest = [], values
    for _ in range(DIGITS):
        digit = np.round(rest / step) * step  # |digit| <= clip
        digits.append(digit)
        rest = (rest - digit) * q  # exact: Sterbenz, and q is a power of two; |rest| <= clip
    return digits


def from_digit_sums(sums: Sequence[np.ndarray], clip: float, q: int) -> np.ndarray:
    """The float64 sum over clients from the per-digit sums of :func:`to_digits`.

    Each digit's sum is a multiple of ``step``: snapping to it undoes the float rounding of
    Flower's dequantisation (it divides by the number of clients, then we multiply back).
    """
    if len(sums) != DIGITS:
        raise ValueError(f"expected {DIGITS} digit sums, got {len(sums)}")
    step = 2 * clip / q
    snapped = [np.round(np.asarray(s, dtype=np.float64) / step) * step for s in sums]
    total = snapped[-1]
    for digit in reversed(snapped[:-1]):  # Horner: the smallest digits first
        total = digit + total / q
    return total


def secure_vectors(entries: SharedStats, count: int, clip: float, q: int) -> list[np.ndarray]:
    """A client's statistics as SecAgg+ parameters: ``DIGITS`` arrays per group, by name."""
    vectors = []
    for name in sorted(entries):
        stats = entries[name][0]
        if stats.count != count:
            raise ValueError(f"{name}: statistics over {stats.count} token rows, not {count}")
        values = flat_sums(stats).double().numpy() * count_scale(count)
        vectors.extend(to_digits(values, clip, q))
    return vectors


def vector_lengths(kind: str, inputs: Sequence[int]) -> list[int]:
    """Length of each array :func:`secure_vectors` sends for groups of ``inputs`` features
    (in the groups' name order)."""
    return [d * (d + 1) // 2 if kind == "hessian" else d for d in inputs for _ in range(DIGITS)]


def masked_bytes(lengths: Sequence[int]) -> int:
    """What one client uploads in the masked-vector stage (int64 .npy arrays, plus the
    weight Flower puts in front)."""
    return sum(NPY_HEADER + 8 * length for length in [1, *lengths])


def statistics_from_secure_sum(
    arrays: Sequence[np.ndarray],
    *,
    expected: Mapping[str, tuple[int, Sequence[str]]],
    kind: str,
    clients: int,
    count: int,
    clip: float,
    q: int,
) -> dict[str, tuple[Stats, tuple[str, ...]]]:
    """Summed statistics from the unmasked SecAgg+ result.

    ``arrays`` is what Flower's workflow hands to ``aggregate_fit``: the *mean* over the
    ``clients`` contributions of each array (every client has weight 1), in
    :func:`secure_vectors` order. Returns the statistics over ``clients × count`` rows.

    Raises
    ------
    ValueError
        If the arrays do not have the lengths the round's groups need.
    """
    lengths = vector_lengths(kind, [expected[name][0] for name in sorted(expected)])
    got = [int(np.asarray(a).size) for a in arrays]
    if got != lengths:
        raise ValueError(f"secure sum has arrays of lengths {got}; expected {lengths}")
    entries = {}
    for index, name in enumerate(sorted(expected)):
        inputs, covers = expected[name]
        digit_means = arrays[index * DIGITS : (index + 1) * DIGITS]
        total = from_digit_sums([np.ravel(m) * clients for m in digit_means], clip, q)
        sums = torch.from_numpy(total / count_scale(count)).to(torch.float32)
        stats = statistics_from_sums(kind, inputs, clients * count, sums)
        entries[name] = (stats, tuple(covers))
    return entries


def delta_vectors(deltas: Mapping[str, Tensor], clip: float) -> list[np.ndarray]:
    """A client's recovery changes as SecAgg+ parameters: one float64 array per matrix, in
    name order, each in the mask's row-major order (what ``llm_pruning.recovery.recover``
    returns).

    Raises
    ------
    ValueError
        Naming the matrix, if a change is not finite or lies outside ``[-clip, clip]``.
    """
    vectors = []
    for name in sorted(deltas):
        values = deltas[name].detach().double().cpu().numpy().ravel()
        largest = float(np.max(np.abs(values), initial=0.0))
        if not largest <= clip:  # also catches NaN
            raise ValueError(
                f"{name}: a kept value moved by {largest:.4g}, more than recovery-steps AdamW "
                f"steps at recovery-lr can move one ({clip:.4g})"
            )
        vectors.append(values)
    return vectors


def deltas_from_secure_mean(
    arrays: Sequence[np.ndarray], counts: Mapping[str, int], clip: float, q: int
) -> dict[str, Tensor]:
    """The mean change of every matrix from the unmasked SecAgg+ result (the mean over the
    contributing clients of :func:`delta_vectors`), float32, by name.

    A mean of values in ``[-clip, clip]`` lies in that range too, up to one step of the grid
    (``2 clip / q``); a client that masked values off the grid (modular arithmetic lets it
    push the sum anywhere) can leave it, and the whole mean is refused: the server cannot tell
    whose values they were.

    Raises
    ------
    ValueError
        If the arrays do not have the lengths the masks keep, or a value is not finite or
        beyond the range.
    """
    names = sorted(counts)
    got = [int(np.asarray(a).size) for a in arrays]
    if got != [counts[name] for name in names]:
        raise ValueError(
            f"secure mean has arrays of lengths {got}; the masks keep {[counts[n] for n in names]}"
        )
    means = {}
    for name, array in zip(names, arrays, strict=True):
        mean = torch.from_numpy(np.ravel(np.asarray(array, dtype=np.float64))).float()
        largest = float(mean.abs().max()) if mean.numel() else 0.0
        if not largest <= clip + 2 * clip / q:  # also catches NaN
            raise ValueError(
                f"secure mean of {name}: a change of {largest:.4g}, beyond the range "
                f"{clip:.4g} that every client's changes lie in: a client sent values off it"
            )
        means[name] = mean
    return means
