"""Streaming l0-norm aggregation of pruned weight matrices (FedSpaLLM, DESIGN §2).

For one matrix pruned by clients i = 1..N with keep-masks ``M_i`` (True = kept)::

    W_g[j] = sum_i M_i[j] * W_i[j] / sum_i M_i[j]      (0 where no client kept j)

A weight is the mean over the clients that *kept* it, never diluted by clients that
zeroed it. Nor by a client that kept it at 0 in an input column its calibration never reached
(SparseGPT's dead-input rule, :func:`dead_input_columns`): that keep still counts as a vote for
the mask, but its 0 is no value, so ``add`` takes a ``value_mask`` that leaves it out of the
mean (0 where every keeper's column was dead).

The server streams clients into an :class:`L0Accumulator`, which holds only
``sum M*W`` and ``sum M`` for the matrix, so memory does not grow with the number of
clients; the prune-vote count ``C_j = N - sum_i M_i[j]`` used by mask expansion is
derived from the kept count rather than stored a second time.

Precision: 16-bit weights (fp16/bf16) are summed in float32; float32 weights are summed
in float64. The wider accumulator for float32 is what makes the mean exact when every
client kept a value untouched (Wanda/magnitude clients send ``dense * M_i``): ``K`` equal
float32 values summed in float32 round, and dividing by ``K`` does not always give the
value back (it fails for about 15 % of random values at K = 3), whereas the float64 sum
of at most 2**29 float32 values is exact. The same argument makes float32 exact for
16-bit inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Kept counts are stored in int16 to halve their memory; no federation comes close.
MAX_CLIENTS = torch.iinfo(torch.int16).max

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accumulator_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Return the dtype in which ``sum M*W`` is exact for equal values (module docstring)."""
    if weight_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64


class L0Accumulator:
    """Running l0-norm aggregate of one matrix, fed one client at a time.

    Parameters
    ----------
    shape
        Shape of the matrix.
    device
        Device on which the running sums live; added tensors are moved there.

    Notes
    -----
    Memory is ``d * (4 or 8)`` bytes for the weighted sum plus ``2 * d`` bytes for the
    kept count, independent of the number of clients added. The weighted sum is
    allocated on the first :meth:`add`, once the weight dtype is known.
    """

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.shape = torch.Size(shape)
        self.device = torch.device(device)
        self._kept_count = torch.zeros(self.shape, dtype=torch.int16, device=self.device)
        # Keepers whose value counts; None while that is every keeper (no value_mask left any
        # out), so the common case costs no second count.
        self._value_count: Tensor | None = None
        self._weighted_sum: Tensor | None = None
        self._weight_dtype: torch.dtype | None = None
        self._num_clients = 0

    @property
    def num_clients(self) -> int:
        """Number of clients added so far."""
        return self._num_clients

    @property
    def prune_votes(self) -> Tensor:
        """``C_j``: how many of the added clients pruned each entry (int32, matrix shape)."""
        return self._num_clients - self._kept_count.to(torch.int32)

    @property
    def kept_count(self) -> Tensor:
        """``sum_i M_i[j]``: how many of the added clients kept each entry (int32)."""
        return self._kept_count.to(torch.int32)

    def add(self, weight: Tensor, keep_mask: Tensor, value_mask: Tensor | None = None) -> None:
        """Add one client's matrix and keep-mask.

        Parameters
        ----------
        weight
            The client's matrix; values at pruned positions are ignored.
        keep_mask
            Bool tensor of the same shape, True where the client kept the entry.
        value_mask
            Bool tensor of (or broadcastable to) that shape, False where a kept value is no
            evidence (a dead
            input's 0) and stays out of the mean; the keep vote counts all the same. None:
            every kept value counts.

        Raises
        ------
        ValueError
            On a shape or dtype mismatch, a non-bool mask, non-finite kept values, or
            more than :data:`MAX_CLIENTS` clients.
        """
        self._check_inputs(weight, keep_mask)
        if self._num_clients >= MAX_CLIENTS:
            raise ValueError(f"L0Accumulator holds at most {MAX_CLIENTS} clients")
        if self._weighted_sum is None:
            self._weight_dtype = weight.dtype
            acc_dtype = _accumulator_dtype(weight.dtype)
            self._weighted_sum = torch.zeros(self.shape, dtype=acc_dtype, device=self.device)
        keep_mask = keep_mask.to(self.device)
        counted = keep_mask
        if value_mask is not None:
            counted = keep_mask & value_mask.to(self.device)
            if self._value_count is None and not torch.equal(counted, keep_mask):
                self._value_count = self._kept_count.clone()  # every earlier keeper counted
        # where(), not multiplication: a pruned entry may hold anything (even inf).
        contribution = torch.where(counted, weight.to(self.device, self._weighted_sum.dtype), 0)
        if not bool(torch.isfinite(contribution).all()):
            raise ValueError("weight has non-finite values at kept positions")
        self._weighted_sum.add_(contribution)
        self._kept_count.add_(keep_mask)
        if self._value_count is not None:
            self._value_count.add_(counted)
        self._num_clients += 1

    def add_votes(self, keep_mask: Tensor) -> None:
        """Add a client that kept the dense values (a mask-only reply): its keep vote counts,
        and no value sum is kept, since the mean of dense values is the dense value."""
        if keep_mask.shape != self.shape or keep_mask.dtype != torch.bool:
            raise ValueError(f"keep_mask must be a bool tensor of shape {tuple(self.shape)}")
        if self._weighted_sum is not None:
            raise ValueError("L0Accumulator: a mask-only client after clients with values")
        if self._num_clients >= MAX_CLIENTS:
            raise ValueError(f"L0Accumulator holds at most {MAX_CLIENTS} clients")
        self._kept_count.add_(keep_mask.to(self.device))
        self._num_clients += 1

    @property
    def has_values(self) -> bool:
        """Whether clients added values (:meth:`add`), not only votes (:meth:`add_votes`)."""
        return self._weighted_sum is not None

    def finish(self) -> Tensor:
        """Return the aggregate ``W_g`` in the dtype of the added weights.

        Entries that no client kept, or whose every keeper's value was left out, are 0. The
        accumulator is left unchanged, so more clients can still be added afterwards.

        Raises
        ------
        ValueError
            If no client was added.
        """
        if self._weighted_sum is None or self._weight_dtype is None:
            raise ValueError("L0Accumulator.finish() called before any client was added")
        # Where nobody kept j the sum is 0 too, so dividing by max(count, 1) yields 0.
        counts = self._kept_count if self._value_count is None else self._value_count
        denominator = counts.clamp(min=1).to(self._weighted_sum.dtype)
        return (self._weighted_sum / denominator).to(self._weight_dtype)

    def _check_inputs(self, weight: Tensor, keep_mask: Tensor) -> None:
        if weight.shape != self.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != {tuple(self.shape)}")
        if keep_mask.shape != self.shape:
            raise ValueError(f"keep_mask shape {tuple(keep_mask.shape)} != {tuple(self.shape)}")
        if keep_mask.dtype != torch.bool:
            raise ValueError(f"keep_mask must be a bool tensor, got {keep_mask.dtype}")
        if weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight must be a floating tensor, got {weight.dtype}")
        if self._weight_dtype is not None and weight.dtype != self._weight_dtype:
            raise ValueError(
                f"weight dtype {weight.dtype} differs from earlier clients' {self._weight_dtype}"
            )


def dead_input_columns(weight: Tensor, keep_mask: Tensor, dense: Tensor) -> Tensor:
    """``(in,)`` bool: the input columns a client's pruned ``weight`` shows it never reached.

    SparseGPT zeroes the weights of an input whose ``diag H`` is 0 (no calibration input
    reached it) and prunes them first; only when they outnumber a block's prune budget does the
    client keep some, at 0. So: columns where the client kept an entry, every kept value is
    exactly 0, and the dense weights there are not all 0 (an honest value of a reached column
    is exactly 0 with probability 0; where the dense weights are 0, a 0 is a value).
    """
    kept_nonzero = (keep_mask & (weight != 0)).any(dim=0)
    dense_nonzero = (keep_mask & (dense.to(weight.device) != 0)).any(dim=0)
    return dense_nonzero & ~kept_nonzero


ROBUST_RULES = ("trimmed-mean", "median")


def robust_centre(values: Tensor, rule: str, trim_fraction: float = 0.25) -> Tensor:
    """Per entry, a robust centre of the clients' values; NaN marks a client without one.

    Parameters
    ----------
    values
        ``(K, ...)``: one row per client, NaN where that client did not keep the entry.
    rule
        ``median`` (the mean of the two middle values for an even count) or
        ``trimmed-mean``: with ``c`` values, ``t = min(ceil(trim_fraction * c), (c - 1) // 2)``
        are cut at each end, so three keepers already drop one at each end and one value
        always remains.

    Returns
    -------
    Tensor
        float64, shape ``values.shape[1:]``; 0 where no client has a value.

    A client's influence on an entry is then bounded by the spread of the others: with ``t``
    cut at each end, up to ``t`` arbitrary values cannot move the centre outside the range of
    the honest ones.
    """
    _check_rule(rule)
    present = ~torch.isnan(values)
    count = present.sum(dim=0)  # c per entry
    ordered = torch.sort(values, dim=0).values  # NaN sorts last
    if rule == "median":
        low, high = (
            (count - 1).div(2, rounding_mode="floor"),
            count.div(2, rounding_mode="floor") + 1,
        )
    else:
        cut = torch.minimum(
            torch.ceil(trim_fraction * count).to(count.dtype),
            (count - 1).div(2, rounding_mode="floor"),
        ).clamp_min(0)
        low, high = cut, count - cut
    rank = torch.arange(values.shape[0], device=values.device).reshape(
        -1, *[1] * (values.dim() - 1)
    )
    inside = (rank >= low) & (rank < high) & (rank < count)
    total = torch.where(inside, ordered.double(), 0.0).sum(dim=0)
    return total / inside.sum(dim=0).clamp_min(1)


def _check_rule(rule: str) -> None:
    if rule not in ROBUST_RULES:
        raise ValueError(f"unknown robust rule {rule!r}; choose one of {', '.join(ROBUST_RULES)}")


def clip_to_median_norm(values: Tensor, dense: Tensor) -> Tensor:
    """Each client's change from the dense weights, scaled down to the median norm.

    ``values`` is ``(K, ...)`` with NaN where a client has no value, ``dense`` the matrix.
    Client i's change ``δᵢ = wᵢ − d`` (over the entries it has) keeps its direction, and its
    norm becomes at most the (lower) median of ``‖δ‖`` over the clients: while honest clients
    are the majority, no client moves the matrix more than a typical honest one does, however
    large a change inside the plausibility bound it sends. Clients that keep the dense values
    (``δ = 0``) are unchanged.
    """
    delta = values.double() - dense.double()
    norms = torch.nan_to_num(delta, nan=0.0).flatten(1).norm(dim=1)  # (K,)
    limit = norms.median()
    scale = torch.where(norms > limit, limit / norms.clamp_min(1e-300), torch.ones_like(norms))
    scale = scale.reshape(-1, *[1] * (values.dim() - 1))
    return (dense.double() + delta * scale).to(values.dtype)


class RobustAccumulator(L0Accumulator):
    """An :class:`L0Accumulator` whose :meth:`finish` is a robust centre (median or trimmed
    mean) over the clients that kept each entry, not their mean.

    With ``dense`` given, each client's change from it is first clipped to the median norm
    over the clients (:func:`clip_to_median_norm`), so a poisoner inside the value bound
    cannot outweigh an honest member by the size of its change, only by its direction.

    A robust centre needs every value, so this keeps each client's matrix (in its own dtype,
    NaN where pruned): ``K * d`` values for the round's matrices instead of ``d``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        rule: str,
        trim_fraction: float = 0.25,
        dense: Tensor | None = None,
    ) -> None:
        super().__init__(shape)
        _check_rule(rule)
        self.rule, self.trim_fraction, self.dense = rule, trim_fraction, dense
        self._values: list[Tensor] = []

    def add(self, weight: Tensor, keep_mask: Tensor, value_mask: Tensor | None = None) -> None:
        super().add(weight, keep_mask, value_mask)
        counted = keep_mask if value_mask is None else keep_mask & value_mask
        kept = torch.where(counted.to(self.device), weight.to(self.device), float("nan"))
        self._values.append(kept)

    def finish(self) -> Tensor:
        if not self._values:
            raise ValueError("RobustAccumulator.finish() called before any client was added")
        values = torch.stack(self._values)
        if self.dense is not None:
            values = clip_to_median_norm(values, self.dense.to(self.device))
        centre = robust_centre(values, self.rule, self.trim_fraction)
        return centre.to(self._weight_dtype)


def make_accumulator(
    shape: Sequence[int],
    aggregation: str = "mean",
    trim_fraction: float = 0.25,
    dense: Tensor | None = None,
) -> L0Accumulator:
    """The accumulator of run config ``aggregation``: ``mean`` (the paper's l0 mean, streamed)
    or a robust rule (clipped against ``dense``, when given)."""
    if aggregation == "mean":
        return L0Accumulator(shape)
    return RobustAccumulator(shape, aggregation, trim_fraction, dense)


def l0_aggregate(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
    """l0-norm aggregate of same-shape client matrices.

    Parameters
    ----------
    weights
        One matrix per client, all the same shape and floating dtype.
    masks
        One bool keep-mask per client (True = kept), same shape as the weights.

    Returns
    -------
    Tensor
        ``W_g`` in the input dtype: the mean over the clients that kept each entry, 0
        where no client kept it.

    Raises
    ------
    ValueError
        On empty input, differing lengths, shapes or dtypes, or a non-bool mask.
    """
    if len(weights) == 0:
        raise ValueError("l0_aggregate needs at least one client's weight")
    if len(weights) != len(masks):
        raise ValueError(f"got {len(weights)} weights but {len(masks)} masks")
    accumulator = L0Accumulator(weights[0].shape, device=weights[0].device)
    for weight, keep_mask in zip(weights, masks, strict=True):
        accumulator.add(weight, keep_mask)
    return accumulator.finish()
