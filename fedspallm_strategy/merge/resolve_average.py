"""The masked re-solve's merge: each kept entry from the clients' re-solved values (DESIGN §2).

Once the global keep-mask of a matrix is fixed, every client that pruned it re-solves its kept
weights under that mask and sends them in the mask's row-major order; the server merges them
entry by entry (:class:`ResolveAverage`).

Dead inputs. SparseGPT sets the weights of an input column whose ``diag H`` is 0 to 0 (the
client's calibration never reached that input, so it carries no information there). Averaged in,
that 0 would shrink a weight the merged mask keeps by ``(K - 1) / K``. The server sees which
columns a client did not reach without being told: in such a column every kept value is exactly
0, which an honest re-solve of a reached column gives with probability 0 (each value is the
dense weight plus a continuous compensation). Those entries are left out of that client's
contribution (:func:`columns_reached`). Where the dense weights under the mask are themselves all
0, a 0 is a value, not a sign of a dead input, and counts.

Memory. The server holds the merger's state for every matrix of a round's layers at once, so the
uniform mean keeps only what it needs: a float32 running sum per kept entry and, since whether a
client reached an entry depends only on the entry's input column, an int32 count per input
column: ``4 * kept + 4 * in_features`` bytes per matrix (it was 20 bytes per kept entry: a
float64 sum, an int32 per-entry count and the int64 input column of every entry). No per-entry
column index is kept, nor a mask: the caller's mapping of masks (referenced, not copied; it may
store them packed and unpack on each read) is read when a reply arrives and when the matrix is
finished, and gives the columns of one block of rows at a time (:data:`BLOCK_ENTRIES`).
:func:`resolve_state_bytes` gives the peak for one matrix under each rule.

Precision of the uniform mean. The float32 sum of K values is within ``(K - 1) * 2^-24 * Σ|v|`` of
their exact sum, so the mean is within about ``K * 2^-24 * max|v|`` of the float64 one. Values
travel as int8 by default (``payload-dtype`` auto), decoded to float32 per row scale; with
``payload-dtype`` float16 or bfloat16 their float32 sums are exact or nearly: float16 values give
the float64 mean itself; bfloat16 values differ from it by at most 3e-10, which rounding the mean to
the bfloat16 weight removes. For float32 values, measured on a 2048 x 2048 matrix at 50 % with
re-solve-like values (dense weights of std 0.02, |w| <= 0.1, plus 10 % per-client noise), the
largest difference from the float64 mean is 3.7e-9, 7.5e-9, 1.0e-8 and 1.6e-8 at K = 2, 4, 8, 16:
one or two float32 ulps of the largest weights (7.5e-9), against re-solve changes of about 10 %.
What is lost is exactness for float32 clients that agree: the float32 mean of K equal float32 values
is not always that value, as the float64 sum made it (exact at K = 2; at K = 3, 14 % of entries 1
ulp off; K = 7: 51 %, up to 2 ulps).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from fedspallm_strategy.merge.aggregation import clip_to_median_norm, robust_centre

# With resolve-weighting='hessian-diagonal' a client's weight for column j (its Σ x_j², which
# only it can measure) is clipped to this multiple of the median client's weight for j, so a
# client inflating its weights gets at most 4m / (4m + the others' weights) of an entry, not all
# of it. Honest clients run the same number of calibration tokens, so theirs differ by how
# strongly their data drive input j: measured on tiny-llama with 2-4 by-document shards of
# python-docs, the largest client's weight exceeds 4x the (lower) median in 0.05-1 % of columns
# with 8 segments of 128 tokens (1-5 % with 4 of 64). Clipping such an honest column only moves
# its entries toward the uniform mean, the default rule.
MAX_WEIGHT_OVER_MEDIAN = 4.0

# The input columns of kept entries are found one block of mask rows at a time, each block at
# most this many matrix entries. One block's working set (nonzero's int64 index and what is
# picked with it) is the uniform merge's only transient beyond ``in_features`` bytes: measured
# (peak RSS) at 16.4 MiB with a 50 % mask and 33 MiB with a full one, whatever the matrix size.
BLOCK_ENTRIES = 1 << 20

# Bytes per kept entry of the buffered rules' finish (float64 stacks over the K clients, the
# column index, one block's working set), on top of the K buffered replies: `a * K + b`, above
# the peak resident memory that ResolveAverage.finish added (torch 2.13 on CPU, one thread,
# MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave RSS; /proc/self/clear_refs reset the
# high-water mark) with K = 1, 2, 3, 8, 16 on 1024 x 2048 and 16 x 65536 matrices at 50 %:
# hessian-diagonal 61, 77, 101, 221, 413 bytes per kept entry (24 K + 40 bounds them), median
# and trimmed-mean 80, 98, 124, 269, 525 (32 K + 48); both with a margin here.
_WEIGHTED_FINISH_PER_CLIENT, _WEIGHTED_FINISH_FIXED = 26, 48
_ROBUST_FINISH_PER_CLIENT, _ROBUST_FINISH_FIXED = 34, 56


def resolve_state_bytes(
    kept: int,
    in_features: int,
    clients: int,
    aggregation: str,
    weighted: bool,
    *,
    value_bytes: int = 4,
) -> int:
    """Peak bytes :class:`ResolveAverage` allocates for one matrix of a round.

    ``kept`` entries under the mask, ``in_features`` input columns, ``clients`` replies;
    ``aggregation`` as in :class:`ResolveAverage`, ``weighted`` for column weights
    (``resolve-weighting='hessian-diagonal'``); ``value_bytes`` is the reply values' itemsize
    (4, the widest wire dtype, unless known to be 16-bit).

    Uniform mean: what it holds (:meth:`ResolveAverage.state_bytes`), a float32 sum per kept
    entry and an int32 count per column; its finish divides that sum in place. Besides, adding or
    finishing a matrix briefly takes ``in_features`` bytes and one row block's working set
    (:data:`BLOCK_ENTRIES`: at most about 33 MiB), for one matrix at a time, whatever the round
    holds; neither is counted here.

    Weighted or robust rules: the K buffered replies (values, and column weights when sent) plus
    the float64 stacks their finish builds over the clients (measured, with a margin). A
    round's matrices are finished one after the other, so a round needs the sum of their held
    bytes plus the largest finish; counting every matrix's finish here errs on the safe side.
    """
    if aggregation == "mean" and not weighted:
        return 4 * kept + 4 * in_features
    held = clients * (value_bytes * kept + (4 * in_features if weighted else 0))
    if aggregation == "mean":
        per_client, fixed = _WEIGHTED_FINISH_PER_CLIENT, _WEIGHTED_FINISH_FIXED
    else:
        per_client, fixed = _ROBUST_FINISH_PER_CLIENT, _ROBUST_FINISH_FIXED
    return held + (per_client * clients + fixed) * kept + 64 * clients * in_features


def kept_column_blocks(mask: Tensor) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, columns)`` for each block of rows of the 2-D bool ``mask``: the block's
    kept entries are ``[start, stop)`` of the row-major kept order and ``columns`` (int64) their
    input columns."""
    rows, width = mask.shape
    step = max(1, BLOCK_ENTRIES // max(width, 1))
    start = 0
    for row in range(0, rows, step):
        columns = mask[row : row + step].nonzero()[:, 1]
        stop = start + columns.numel()
        yield start, stop, columns
        start = stop


def kept_columns(mask: Tensor) -> Tensor:
    """The int64 input column of every kept entry of ``mask``, in row-major order."""
    columns = torch.empty(int(torch.count_nonzero(mask)), dtype=torch.int64, device=mask.device)
    for start, stop, block in kept_column_blocks(mask):
        columns[start:stop] = block
    return columns


def columns_reached(kept: Tensor, mask: Tensor) -> Tensor:
    """``(in_features,)`` bool: the columns of ``mask`` in which ``kept`` (its flat values, in
    the mask's row-major order) holds a value other than 0. Builds no per-entry column index
    beyond one block of rows."""
    reached = torch.zeros(mask.shape[1], dtype=torch.bool, device=mask.device)
    for start, stop, columns in kept_column_blocks(mask):
        reached[columns[kept[start:stop] != 0]] = True
    return reached


def reached_columns(kept: Tensor, columns: Tensor, in_features: int) -> Tensor:
    """``(in_features,)`` bool: the columns in which ``kept`` (flat values, entry ``k`` in input
    column ``columns[k]``) holds a value other than 0."""
    return torch.bincount(columns[kept != 0], minlength=in_features) > 0


def clip_column_weights(weights: Tensor, multiple: float = MAX_WEIGHT_OVER_MEDIAN) -> Tensor:
    """``(K, in)`` column weights, each at most ``multiple`` x the (lower) median over the
    clients with a positive weight for that column (0 stays 0)."""
    positive = torch.where(weights > 0, weights, torch.nan)
    median = torch.nanmedian(positive, dim=0).values  # NaN where no client has a weight
    limit = torch.nan_to_num(median * multiple, nan=0.0)
    return torch.minimum(weights, limit)


def _nbytes(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class ResolveAverage:
    """Merges the clients' re-solved values of a round into each kept entry.

    Every rule is over the clients that reached the entry's input column (module docstring):
    a client's kept values in a column it never saw are left out, not averaged in as 0. Where no
    client reached a column its entries are 0, as SparseGPT on the pooled calibration inputs
    (whose ``diag H`` is 0 there too) and a lone client would set them.

    Uniform: the plain mean, streamed (a float32 running sum per kept entry and an int32 count
    per input column of the clients that reached it; module docstring). With column weights
    (each client's ``diag H``), entry (r, j) is
    ``Σ_i h_ij w_i,rj / Σ_i h_ij``: the diagonal of the pooled-Hessian solution
    ``(Σ H_i)^-1 Σ H_i ŵ_i``, which is what centralized pruning would give if each ŵ_i solved its
    client's least squares exactly. The weights are the clients' own report, so each ``h_ij`` is
    first clipped to :data:`MAX_WEIGHT_OVER_MEDIAN` x the median of the positive ``h_·j`` over
    the clients: one client inflating its weights takes at most ``4m / (4m + Σ_others h)`` of an
    entry. Entries whose column has no weight left fall back to the plain mean. The bound needs
    every client's weights before any is used, so this rule holds each client's kept values until
    :meth:`finish` (as the robust rules do). With ``aggregation`` = ``trimmed-mean`` or
    ``median`` each client's change is clipped to the median norm and each entry is that robust
    centre of the clients' values.

    ``masks`` (name -> 2-D bool mask, e.g. the server's packed global masks) is referenced, not
    copied, and read on each :meth:`add` and :meth:`finish`: it must hold each named matrix's
    mask, unchanged, until that matrix is finished.
    """

    def __init__(
        self,
        masks: Mapping[str, Tensor],
        names,
        aggregation: str = "mean",
        trim_fraction: float = 0.25,
    ) -> None:
        # The caller's mapping, referenced (no mask is held): it gives each entry's input column.
        self.masks = masks
        self.kept = {n: int(torch.count_nonzero(masks[n])) for n in names or []}
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        # Uniform: Σ values per kept entry, float32 (a dead entry is 0: it adds nothing) ...
        self.plain: dict[str, Tensor] = {}
        self.reached: dict[str, Tensor] = {}  # ... and per input column the clients reaching it
        self.clients: dict[str, int] = {}
        # Weighted and robust rules: each client's (values, column weights or None).
        self.replies: dict[str, list[tuple[Tensor, Tensor | None]]] = {}

    def add(self, values: dict[str, Tensor], column_weights: dict[str, Tensor]) -> None:
        for name, kept in values.items():
            weights = column_weights.get(name)
            if self.aggregation != "mean" or weights is not None:
                self.replies.setdefault(name, []).append((kept, weights))
                continue
            if kept.shape != (self.kept[name],):
                raise ValueError(
                    f"{name}: {tuple(kept.shape)} values, the mask keeps {self.kept[name]} entries"
                )
            reached = columns_reached(kept, self.masks[name])
            if name in self.plain:
                self.plain[name] += kept
                self.reached[name] += reached
            else:
                self.plain[name] = kept.to(torch.float32, copy=True)
                self.reached[name] = reached.to(torch.int32)
            self.clients[name] = self.clients.get(name, 0) + 1

    def state_bytes(self, name: str | None = None) -> int:
        """Bytes held for ``name`` (every matrix when None) until :meth:`finish`: the uniform
        sums and per-column counts, the buffered replies of the other rules. The masks are the
        caller's and not counted."""
        names = [name] if name is not None else {*self.plain, *self.replies}
        total = 0
        for n in names:
            total += _nbytes(self.plain.get(n)) + _nbytes(self.reached.get(n))
            total += sum(_nbytes(v) + _nbytes(w) for v, w in self.replies.get(n, []))
        return total

    def finish(self, name: str, dense: Tensor | None = None) -> Tensor | None:
        """The merged kept values of ``name``, or None if nobody re-solved it: float32 for the
        uniform mean (its running sum, divided in place), float64 for the other rules.

        ``dense`` (the dense weights under the mask, in the same order) tells a dead column
        from one whose dense weights are 0; without it every all-zero column counts as dead. A
        robust rule also clips each client's change from ``dense`` to the median norm."""
        if name not in self.replies and name not in self.plain:
            return None
        mask = self.masks[name]  # read once: a packed mapping unpacks on each read
        zero_dense = None if dense is None else ~columns_reached(dense, mask)
        if name in self.replies:
            return self._finish_buffered(name, mask, dense, zero_dense)
        total, count, clients = self.plain.pop(name), self.reached.pop(name), self.clients.pop(name)
        if zero_dense is not None:  # there a 0 is a value: every client counts
            count.masked_fill_(zero_dense, clients)
        count.clamp_min_(1)  # a column nobody reached: its sum is 0, and so its entries
        for start, stop, columns in kept_column_blocks(mask):
            total[start:stop] /= count[columns]
        return total

    def _finish_buffered(
        self, name: str, mask: Tensor, dense: Tensor | None, zero_dense: Tensor | None
    ) -> Tensor:
        replies = self.replies.pop(name)
        columns, width = kept_columns(mask), mask.shape[1]  # for this matrix's finish only
        values = torch.stack([kept.double() for kept, _ in replies])  # (K, kept)
        reached = torch.stack([reached_columns(kept, columns, width) for kept, _ in replies])
        if zero_dense is not None:
            reached |= zero_dense
        live = reached[:, columns]  # (K, kept)
        if self.aggregation != "mean":
            del columns
            values = torch.where(live, values, torch.nan)  # NaN: no value from that client
            del live
            if dense is not None:
                values = clip_to_median_norm(values, dense)
            return robust_centre(values, self.aggregation, self.trim_fraction)
        mean = values.sum(dim=0) / live.sum(dim=0).clamp_min(1)
        del live
        weights = torch.stack([w.double() for _, w in replies]) * reached  # (K, in)
        per_entry = clip_column_weights(weights)[:, columns]  # (K, kept)
        del columns
        total = per_entry.sum(dim=0)
        weighted = (per_entry * values).sum(dim=0) / total.clamp_min(torch.finfo(total.dtype).tiny)
        return torch.where(total > 0, weighted, mean)
