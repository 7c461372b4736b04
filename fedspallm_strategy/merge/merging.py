"""How the server turns the clients' pruned matrices into one global matrix, per strategy.

All rules stream: a client's matrices are added to one :class:`L0Accumulator` per matrix and
dropped, so the server holds ``sum M*W`` and ``sum M`` per matrix whatever the client count;
for mask-only replies (the values are the dense ones it holds) only ``sum M``, 2 bytes a weight.

- ``fedspallm`` (Bai et al. 2025): l0-norm aggregation, then adaptive mask expansion. A
  client's kept entries in an input column its calibration never reached (all kept values 0,
  ``dead_input_columns``) vote for the mask but stay out of the mean.
- ``fedavg``: plain mean over the clients (a pruned weight counts as 0), then magnitude
  re-pruning to the target: the naive baseline.
- ``fedprllm`` (Guo et al. 2025): masks only; keep the entries with the fewest prune votes,
  ties at random, at their dense values.

With ``aggregation`` = ``trimmed-mean`` or ``median`` (beyond the paper), ``fedspallm`` clips
each client's change from the dense weights to the median norm over the clients, then takes a
robust centre over the clients that kept each entry instead of their mean; it holds every
client's matrix until the merge (``RobustAccumulator``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedspallm_strategy.merge.aggregation import (
    L0Accumulator,
    dead_input_columns,
    make_accumulator,
)
from fedspallm_strategy.merge.expansion import expand_mask, expand_mask_nm
from fedspallm_strategy.merge.resolve_average import clip_column_weights
from llm_pruning.pruners import PRUNERS, SparsityPattern

MERGE_RULES = ("fedspallm", "fedavg", "fedprllm")


def kept_nonzero(values: Tensor) -> Tensor:
    """``values`` with every exact 0 made the dtype's least normal number, for entries the mask
    keeps: a kept 0 would read as pruned and break the exact sparsity (two clients' opposite
    16-bit values average to exactly 0; a dense weight may be 0)."""
    return torch.where(values == 0, torch.finfo(values.dtype).tiny, values)


class MatrixMerger:
    """Accumulates every client's version of a set of matrices, then merges each one."""

    def __init__(
        self,
        rule: str,
        dense: Mapping[str, Tensor],
        pattern: SparsityPattern,
        generator: torch.Generator,
        *,
        aggregation: str = "mean",
        trim_fraction: float = 0.25,
        patterns: Mapping[str, SparsityPattern] | None = None,
    ):
        if rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {rule!r}; choose one of {', '.join(MERGE_RULES)}")
        if aggregation != "mean" and rule != "fedspallm":
            raise ValueError(f"aggregation {aggregation!r} applies to rule fedspallm, not {rule!r}")
        self.rule, self.dense, self.pattern, self.generator = rule, dense, pattern, generator
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        self.patterns = dict(patterns or {})  # per-matrix overrides (sparsity-profile='owl')
        self.accumulators: dict[str, L0Accumulator] = {}
        self.column_norms: dict[str, list[Tensor]] = {}  # mask-only: each client's Σ x_j²

    def add(
        self,
        tensors: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        column_norms: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Add one client's matrices. ``tensors`` is empty for a mask-only payload: the
        client kept the dense values the server already holds, or the re-solve replaces its
        values; then ``column_norms`` (name -> its ``Σ x_j²`` per input column, if sent) break
        the expansion's ties."""
        for name, keep in masks.items():
            if not tensors:  # votes only: 2 bytes per weight, whatever the rule
                self.accumulators.setdefault(name, L0Accumulator(keep.shape)).add_votes(keep)
                if column_norms:
                    self.column_norms.setdefault(name, []).append(column_norms[name])
                continue
            weight = tensors[name]
            if name not in self.accumulators:
                self.accumulators[name] = make_accumulator(
                    keep.shape, self.aggregation, self.trim_fraction, self.dense[name]
                )
            counted = None
            if tensors and self.rule == "fedspallm":  # fedavg counts a pruned weight as 0
                counted = ~dead_input_columns(weight, keep, self.dense[name]).unsqueeze(0)
            self.accumulators[name].add(weight.to(self.dense[name].dtype), keep, counted)

    def finish(self, name: str) -> tuple[Tensor, Tensor]:
        """The merged matrix ``name`` and its keep-mask; frees its accumulator."""
        accumulator = self.accumulators.pop(name)
        # Mask-only replies kept the dense values: their mean is the dense matrix.
        mean = accumulator.finish() if accumulator.has_values else self.dense[name]
        if self.rule == "fedspallm":
            merged = mean
            keep = self._expand(self._tie_break(name, merged), accumulator, self.pattern_of(name))
        elif self.rule == "fedavg":
            # sum M*W / N == (sum M*W / sum M) * sum M / N
            merged = mean * accumulator.kept_count / accumulator.num_clients
            merged, keep = PRUNERS["magnitude"].prune(
                merged.to(self.dense[name].dtype), None, self.pattern_of(name)
            )
        else:  # fedprllm: random tie-break among equal vote counts
            noise = torch.rand(accumulator.shape, generator=self.generator)
            keep = self._expand(noise, accumulator, self.pattern_of(name))
            merged = self.dense[name]
        merged = kept_nonzero(merged.to(self.dense[name].dtype))
        return torch.where(keep, merged, torch.zeros((), dtype=merged.dtype)), keep

    def _tie_break(self, name: str, merged: Tensor) -> Tensor:
        """What decides among equal votes: ``|W_g|``, or without the clients' values
        ``|W| · ‖x_j‖`` with ``‖x_j‖²`` the clients' pooled input energy of column j (Wanda's
        saliency; each client's clipped to 4x the median client's, as the re-solve's weights)."""
        norms = self.column_norms.pop(name, None)
        if not norms:
            return merged
        pooled = clip_column_weights(torch.stack([n.double() for n in norms])).sum(dim=0)
        return merged.abs().double() * pooled.sqrt().unsqueeze(0)

    def pattern_of(self, name: str) -> SparsityPattern:
        """The pattern matrix ``name`` is merged to: its own under a profile, else the run's."""
        return self.patterns.get(name, self.pattern)

    def _expand(
        self, tie_break: Tensor, accumulator: L0Accumulator, pattern: SparsityPattern
    ) -> Tensor:
        """Keep-mask from prune votes; ``tie_break`` decides among equal votes (smaller |x|
        is pruned first)."""
        if pattern.is_nm:
            return expand_mask_nm(tie_break, accumulator.prune_votes, pattern.n, pattern.m)
        return expand_mask(
            tie_break, accumulator.prune_votes, accumulator.num_clients, pattern.sparsity
        )
