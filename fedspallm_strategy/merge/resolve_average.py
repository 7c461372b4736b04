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
contribution (:func:`reached_columns`). Where the dense weights under the mask are themselves all
0, a 0 is a value, not a sign of a dead input, and counts.
"""

from __future__ import annotations

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


class ResolveAverage:
    """Merges the clients' re-solved values of a round into each kept entry.

    Every rule is over the clients that reached the entry's input column (module docstring):
    a client's kept values in a column it never saw are left out, not averaged in as 0. Where no
    client reached a column its entries are 0, as SparseGPT on the pooled calibration inputs
    (whose ``diag H`` is 0 there too) and a lone client would set them.

    Uniform: the plain mean, streamed (a running sum and a per-entry count of the clients that
    reached it). With column weights (each client's ``diag H``), entry (r, j) is
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
    """

    def __init__(
        self,
        masks: dict[str, Tensor],
        names,
        aggregation: str = "mean",
        trim_fraction: float = 0.25,
    ) -> None:
        # The input column of every kept entry, in the row-major order values travel in.
        self.columns = {n: masks[n].nonzero(as_tuple=True)[1] for n in names or []}
        self.in_features = {n: masks[n].shape[1] for n in names or []}
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        self.plain: dict[str, Tensor] = {}  # Σ values (a dead entry is 0: it adds nothing)
        self.reached: dict[str, Tensor] = {}  # per entry: the clients that reached its column
        self.clients: dict[str, int] = {}
        # Weighted and robust rules: each client's (values, column weights or None).
        self.replies: dict[str, list[tuple[Tensor, Tensor | None]]] = {}

    def add(self, values: dict[str, Tensor], column_weights: dict[str, Tensor]) -> None:
        for name, kept in values.items():
            weights = column_weights.get(name)
            if self.aggregation != "mean" or weights is not None:
                self.replies.setdefault(name, []).append((kept, weights))
                continue
            columns = self.columns[name]
            reached = reached_columns(kept, columns, self.in_features[name])[columns]
            self.plain[name] = self.plain.get(name, 0) + kept.double()
            self.reached[name] = self.reached.get(name, 0) + reached.to(torch.int32)
            self.clients[name] = self.clients.get(name, 0) + 1

    def finish(self, name: str, dense: Tensor | None = None) -> Tensor | None:
        """The merged kept values of ``name`` (float64), or None if nobody re-solved it.

        ``dense`` (the dense weights under the mask, in the same order) tells a dead column
        from one whose dense weights are 0; without it every all-zero column counts as dead. A
        robust rule also clips each client's change from ``dense`` to the median norm."""
        columns = self.columns.get(name)
        zero_dense = None
        if dense is not None and columns is not None:
            zero_dense = ~reached_columns(dense, columns, self.in_features[name])
        if name in self.replies:
            return self._finish_buffered(name, dense, zero_dense)
        if name not in self.plain:
            return None
        reached, clients = self.reached.pop(name), self.clients.pop(name)
        if zero_dense is not None:  # there a 0 is a value: every client counts
            reached = torch.where(zero_dense[columns], clients, reached)
        return self.plain.pop(name) / reached.clamp_min(1)

    def _finish_buffered(
        self, name: str, dense: Tensor | None, zero_dense: Tensor | None
    ) -> Tensor:
        replies = self.replies.pop(name)
        columns, width = self.columns[name], self.in_features[name]
        values = torch.stack([kept.double() for kept, _ in replies])  # (K, kept)
        reached = torch.stack([reached_columns(kept, columns, width) for kept, _ in replies])
        if zero_dense is not None:
            reached |= zero_dense
        live = reached[:, columns]  # (K, kept)
        if self.aggregation != "mean":
            values = torch.where(live, values, torch.nan)  # NaN: no value from that client
            if dense is not None:
                values = clip_to_median_norm(values, dense)
            return robust_centre(values, self.aggregation, self.trim_fraction)
        mean = values.sum(dim=0) / live.sum(dim=0).clamp_min(1)
        weights = torch.stack([w.double() for _, w in replies]) * reached  # (K, in)
        per_entry = clip_column_weights(weights)[:, columns]  # (K, kept)
        total = per_entry.sum(dim=0)
        weighted = (per_entry * values).sum(dim=0) / total.clamp_min(torch.finfo(total.dtype).tiny)
        return torch.where(total > 0, weighted, mean)
