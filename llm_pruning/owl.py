"""OWL: outlier-weighed layer-wise sparsity (Yin et al., 2023), tensors in, numbers out.

A decoder layer whose Wanda scores ``|W_ij| * ||X_j||`` hold many outliers (scores above
``owl_m`` times the layer's mean score, over all its prunable Linears together: the
layer-wise outlier distribution, LOD) loses more when pruned, so it gets a lower sparsity:

    s_l = target + lambda - 2 lambda (r_l - min r) / (max r - min r)

then shifted so that the parameter-weighted mean is the target, never leaving
``[target - lambda, target + lambda]`` (lambda is the largest deviation a layer may have; the
shift clamps and is found by bisection, since the clamped mean is monotone in it).

Rounding: the run must prune exactly as many weights as uniform sparsity does (the sum over
every prunable matrix of ``num_to_prune(numel, target)``, what a uniform run prunes, so an
owl run and a uniform one differ only in where the zeros are), so the layers' real prune
counts are scaled up to that total (it exceeds ``target x D`` by less than one weight per
matrix) and rounded to integers that add up to it by largest remainder (ties: lower layer
first); the lambda bound holds up to those few weights. A layer's count then spreads over
its matrices by cumulative ceil, in the family's Linear order, as ``prune_counts`` spreads a
matrix over its rows. So one float per layer, ``K_l / D_l``, fixes every matrix's integer
count on client and server alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import layer_tensors
from llm_pruning.pruners import PRUNERS, SparsityPattern, num_to_prune
from llm_pruning.pruners.masks import prune_counts
from llm_pruning.pruners.wanda import ColumnNormStats, wanda_score

_BISECTIONS = 200  # halvings of the shift interval: far below float resolution long before


# ----------------------------------------------------------------------------- outliers


def layer_outliers(
    weights: Mapping[str, Tensor], stats: Mapping[str, ColumnNormStats], owl_m: float
) -> tuple[int, int]:
    """``(outliers, total)`` of one decoder layer: how many of its Wanda scores, over all its
    prunable matrices together, exceed ``owl_m`` times their mean, and how many there are.

    Wanda's normalised column norm (``sqrt(Σx² / rows)``) differs from ``||X_j||_2`` by one
    factor shared by the whole layer, so the outlier fraction is the same.
    """
    scores = [wanda_score(weights[name], stats[name]) for name in weights]  # (out, in) each
    total = sum(score.numel() for score in scores)
    mean = sum(score.double().sum() for score in scores) / max(total, 1)
    threshold = owl_m * mean
    outliers = sum(int((score.double() > threshold).sum()) for score in scores)
    return outliers, total


def dense_statistics(calibrator, layers: Sequence[int] | None = None) -> Iterator[tuple]:
    """Walk the dense model once with a :class:`~llm_pruning.engine.LayerwiseCalibrator`:
    ``(layer, {weight name: ColumnNormStats}, {weight name: dense weight})`` per layer, the
    calibrator advanced through each (dense) layer after its statistics are taken."""
    total = num_layers(calibrator.model)
    for index in range(total) if layers is None else layers:
        stats = calibrator.statistics(index, PRUNERS["wanda"])
        weights = {name: t for name, t in layer_tensors(calibrator.model, index).items()}
        yield index, stats, {name: weights[name] for name in stats}
        if index + 1 < total:
            calibrator.advance(index)


def outlier_counts(calibrator, owl_m: float) -> tuple[list[int], list[int]]:
    """Per decoder layer, ``(outliers, totals)`` on the calibrator's segments (dense model)."""
    outliers, totals = [], []
    for _index, stats, weights in dense_statistics(calibrator):
        count, total = layer_outliers(weights, stats, owl_m)
        outliers.append(count)
        totals.append(total)
    return outliers, totals


# ------------------------------------------------------------------------------ profile


def uniform_prune_total(matrix_sizes: Sequence[Sequence[int]], target: float) -> int:
    """What uniform sparsity prunes over every prunable matrix (``num_to_prune`` each)."""
    return sum(num_to_prune(d, target) for sizes in matrix_sizes for d in sizes)


def owl_sparsities(
    ratios: Sequence[float], layer_sizes: Sequence[int], target: float, lam: float
) -> list[float]:
    """Real-valued layer sparsities: more outliers, lower sparsity; parameter-weighted mean
    ``target``; each within ``[target - lam, target + lam]``. Equal ratios: all ``target``."""
    if len(ratios) != len(layer_sizes) or not ratios:
        raise ValueError(f"{len(ratios)} ratios for {len(layer_sizes)} layers")
    low, high = min(ratios), max(ratios)
    if lam == 0 or high == low:
        return [float(target)] * len(ratios)
    raw = [target + lam - 2 * lam * (r - low) / (high - low) for r in ratios]
    weight = sum(layer_sizes)

    def mean(shift: float) -> float:
        clamped = (min(max(s + shift, target - lam), target + lam) for s in raw)
        return sum(d * s for d, s in zip(layer_sizes, clamped, strict=True)) / weight

    below, above = -2 * lam, 2 * lam  # mean(below) = target - lam, mean(above) = target + lam
    for _ in range(_BISECTIONS):
        middle = (below + above) / 2
        if mean(middle) < target:
            below = middle
        else:
            above = middle
    shift = (below + above) / 2
    return [min(max(s + shift, target - lam), target + lam) for s in raw]


def largest_remainder(real: Sequence[float], total: int) -> list[int]:
    """Integers, each the floor or ceil of ``real`` (rescaled to sum to ``total``), that add
    up to ``total``: the largest fractional parts round up, ties to the lower index."""
    scale = total / sum(real) if sum(real) > 0 else 0.0
    scaled = [x * scale for x in real]
    counts = [math.floor(x) for x in scaled]
    remainder = total - sum(counts)
    order = sorted(range(len(scaled)), key=lambda i: (-(scaled[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts


def layer_prune_counts(
    sparsities: Sequence[float], matrix_sizes: Sequence[Sequence[int]], target: float
) -> list[int]:
    """Integer prune counts per layer from real sparsities, summing to the uniform total."""
    real = [s * sum(sizes) for s, sizes in zip(sparsities, matrix_sizes, strict=True)]
    return largest_remainder(real, uniform_prune_total(matrix_sizes, target))


@dataclass(frozen=True)
class SparsityProfile:
    """Per-layer sparsities (``K_l / D_l``: integer-exact) and the outlier ratios behind them."""

    sparsities: tuple[float, ...]
    ratios: tuple[float, ...]

    def as_report(self) -> dict:
        return {
            "per-layer": [
                {"layer": i, "sparsity": round(s, 6), "outlier-ratio": round(r, 6)}
                for i, (s, r) in enumerate(zip(self.sparsities, self.ratios, strict=True))
            ]
        }


def owl_profile(
    ratios: Sequence[float],
    matrix_sizes: Sequence[Sequence[int]],
    target: float,
    lam: float,
) -> SparsityProfile:
    """The OWL profile of a model whose layer ``l`` holds matrices of ``matrix_sizes[l]``
    entries. Its layers together prune exactly :func:`uniform_prune_total` weights."""
    layer_sizes = [sum(sizes) for sizes in matrix_sizes]
    real = owl_sparsities(ratios, layer_sizes, target, lam)
    counts = layer_prune_counts(real, matrix_sizes, target)
    sparsities = tuple(k / d for k, d in zip(counts, layer_sizes, strict=True))
    return SparsityProfile(sparsities, tuple(float(r) for r in ratios))


def matrix_prune_counts(layer_sparsity: float, sizes: Sequence[int]) -> list[int]:
    """A layer's prune count ``num_to_prune(sum(sizes), s)`` spread over its matrices by
    cumulative ceil (each within one entry of ``s * d``)."""
    boundaries = torch.tensor([0, *sizes], dtype=torch.float64).cumsum(0)
    cumulative = [num_to_prune(int(b), layer_sparsity) for b in boundaries.tolist()]
    return [b - a for a, b in zip(cumulative[:-1], cumulative[1:], strict=True)]


def matrix_patterns(
    layer_sparsity: float, shapes: Mapping[str, tuple[int, int]]
) -> dict[str, SparsityPattern]:
    """The unstructured pattern of each matrix of a layer (name -> ``(out, in)``, in the
    family's Linear order) whose pruners then prune exactly its share of the layer's count."""
    sizes = [rows * cols for rows, cols in shapes.values()]
    patterns = {}
    for (name, (rows, cols)), k in zip(
        shapes.items(), matrix_prune_counts(layer_sparsity, sizes), strict=True
    ):
        pattern = SparsityPattern(k / (rows * cols))
        # k / d gives back k (num_to_prune's slack absorbs the float error); and the rows'
        # counts then add up to it too (prune_counts' last boundary is num_to_prune).
        assert num_to_prune(rows * cols, pattern.sparsity) == k
        assert int(prune_counts(rows, cols, pattern.sparsity).sum()) == k
        patterns[name] = pattern
    return patterns


def check_layer_sparsities(values: object, num_layers: int) -> list[float]:
    """The per-layer sparsities a message carries: ``num_layers`` finite numbers in [0, 1)."""
    if not isinstance(values, list) or len(values) != num_layers:
        raise ValueError(
            f"layer-sparsities must be a list of {num_layers} numbers, got {values!r}"[:300]
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"layer-sparsities: {value!r} is not a number")
        if not 0 <= value < 1:  # False for NaN
            raise ValueError(f"layer-sparsities: {value!r} is not in [0, 1)")
    return [float(v) for v in values]


# --------------------------------------------------------------------------- the model


def matrix_sizes(model) -> list[list[int]]:
    """Entries of every prunable matrix, per decoder layer, in the family's Linear order."""
    return [
        [linear.weight.numel() for linear in prunable_weights(model, layer).values()]
        for layer in range(num_layers(model))
    ]


def profile_patterns(
    model, sparsities: Sequence[float], layers: Sequence[int] | None = None
) -> dict[str, SparsityPattern]:
    """Weight name -> its pattern under per-layer ``sparsities`` (all layers by default)."""
    patterns = {}
    for layer in range(num_layers(model)) if layers is None else layers:
        shapes = {
            name: tuple(linear.weight.shape)
            for name, linear in prunable_weights(model, layer).items()
        }
        patterns.update(matrix_patterns(sparsities[layer], shapes))
    return patterns


def profile_from_counts(
    model, outliers: Sequence[int], totals: Sequence[int], target: float, lam: float
) -> SparsityProfile:
    """The profile of summed outlier counts over summed totals, per layer."""
    ratios = [o / t if t else 0.0 for o, t in zip(outliers, totals, strict=True)]
    return owl_profile(ratios, matrix_sizes(model), target, lam)


def profile_model(
    model, segments: Tensor, *, target: float, lam: float, owl_m: float, device="cpu"
) -> SparsityProfile:
    """The OWL profile of ``model`` (dense) on ``segments`` ``(N, T)``: one calibration pass."""
    from llm_pruning.engine import LayerwiseCalibrator  # the engine itself does not need OWL

    outliers, totals = outlier_counts(LayerwiseCalibrator(model, segments, device), owl_m)
    return profile_from_counts(model, outliers, totals, target, lam)
