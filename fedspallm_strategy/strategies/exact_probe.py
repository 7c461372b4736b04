"""The scale of a client's ``exact`` statistics, against the server's own probe of the layer.

Statistics that are finite, have a non-negative diagonal and obey Cauchy-Schwarz can still be
any multiple of honest ones: ``c × Σ xᵀx`` is the Hessian of ``√c × x``. Summed, a client's
statistics scaled ×1e6 outweigh every other client's, and float32-max ones break the
pruner's Cholesky (it falls back to magnitude pruning). The token count is fixed
(``calib-samples × seqlen``), so the scale is the trace per token, ``trace(H) / tokens``
(Wanda: ``Σ x² / tokens``): the mean squared norm of the layer's input rows.

A median over the clients would need every client's statistics held until the last reply
(the sums are streamed: one client's statistics in memory at a time), and says little with 2
clients. Instead the server runs its own model, as it stands after the previous rounds, on
:data:`PROBE_SEGMENTS` segments of ``seqlen`` tokens of the public built-in corpus
(``python-docs``), exactly as a client advances its own text, and takes the trace per token of
every statistics group (Wanda's column norms: the diagonal only, cheap for any pruner). A
client's trace per token must lie within :data:`SCALE_FACTOR` of it either way.

Measured on SmolLM2-135M (seqlen 256, every Linear of layers 0, 15 and 29, dense), honest
clients' trace per token over the probe's: 0.97-1.08 on python-docs shards, 0.95-1.09 on this
project's Markdown docs, 0.92-1.27 on Python source; over a probe of random token ids (below),
0.57-1.50 (tiny-llama: 0.87-1.27 and 0.94-1.39). :data:`SCALE_FACTOR` 100 leaves a margin of
over 50x either way; within it one client weighs at most 100 honest ones.

Without a tokenizer (a strategy built directly, as in some tests) the probe is seeded random
token ids: cruder (numbers above), still far within the factor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedspallm_strategy.wire.safetensors_reader import PayloadError
from llm_pruning.data import calibration_segments
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.pruners import ColumnNormStats, HessianStats, Stats, get_pruner

log = logging.getLogger(__name__)

PROBE_CORPUS = "python-docs"
PROBE_SEGMENTS = 2
# How far a client's trace per token may be from the probe's, either way.
SCALE_FACTOR = 100.0


def trace_per_token(stats: Stats) -> float:
    """``trace(Σ xᵀx) / rows`` (``Σ x² / rows`` for column norms), in float64."""
    if isinstance(stats, HessianStats):
        total = stats.xtx.double().diagonal().sum()
    elif isinstance(stats, ColumnNormStats):
        total = stats.sq_norm.double().sum()
    else:
        raise TypeError(f"no trace for statistics of type {type(stats).__name__}")
    return float(total) / stats.count if stats.count else float("inf")


def check_scale(name: str, stats: Stats, expected: float | None) -> None:
    """Refuse statistics whose trace per token is over :data:`SCALE_FACTOR` times off the
    probe's ``expected`` (skipped where the probe saw nothing: ``expected`` 0 or None)."""
    if expected is None or not expected > 0:
        return
    per_token = trace_per_token(stats)
    ratio = per_token / expected
    if not 1 / SCALE_FACTOR <= ratio <= SCALE_FACTOR:
        raise PayloadError(
            f"{name}: statistics of {per_token:.3g} per token (trace / tokens), {ratio:.3g} x "
            f"the server's probe of the layer ({expected:.3g} per token); more than "
            f"{SCALE_FACTOR:g}x off either way is not honest text"
        )


def probe_segments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    seqlen: int,
    seed: int,
) -> torch.Tensor:
    """``(PROBE_SEGMENTS, seqlen)`` token ids of the public corpus (seeded random ids
    without a tokenizer)."""
    if tokenizer is not None:
        return calibration_segments(
            PROBE_CORPUS, tokenizer, seqlen=seqlen, num_segments=PROBE_SEGMENTS, seed=seed
        )
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(0, vocab, (PROBE_SEGMENTS, seqlen), generator=generator)


class ScaleProbe:
    """The server's probe activations, advanced through the model's layers as they are
    pruned, and the trace per token of each statistics group of a round's layers."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        seqlen: int,
        seed: int,
        device: str = "cpu",
    ):
        self.model, self.tokenizer = model, tokenizer
        self.seqlen, self.seed, self.device = seqlen, seed, device
        self.calibrator: LayerwiseCalibrator | None = None  # built on first use
        self.norms = get_pruner("wanda")  # the diagonal suffices for a trace

    def expected(self, layers: Iterable[int], keys: Iterable[str]) -> dict[str, float]:
        """Group key -> the probe's trace per token, for the consecutive ``layers``.

        The probe enters the first of them through the layers before it as they now are
        (pruned), and, like a client, reaches the later ones of the round through the
        still-dense earlier ones.
        """
        layers = list(layers)
        if self.calibrator is None:
            segments = probe_segments(
                self.model, self.tokenizer, seqlen=self.seqlen, seed=self.seed
            )
            self.calibrator = LayerwiseCalibrator(self.model, segments, self.device)
        calibrator = self.calibrator
        while calibrator.next_layer < layers[0]:
            calibrator.advance(calibrator.next_layer)
        hidden, entering = calibrator.hidden, calibrator.next_layer
        wanted, traces = set(keys), {}
        try:
            for position, index in enumerate(layers):
                stats = calibrator.statistics(index, self.norms)
                traces |= {n: trace_per_token(s) for n, s in stats.items() if n in wanted}
                if position + 1 < len(layers):
                    calibrator.advance(index)
        finally:  # the next round advances from here through the layers once pruned
            calibrator.hidden, calibrator.next_layer = hidden, entering
        log.debug("exact: probe trace per token %s", traces)
        return traces


def check_all(entries: Mapping, expected: Mapping[str, float]) -> None:
    """:func:`check_scale` for every group of a decoded reply."""
    for name, (stats, _covers) in entries.items():
        check_scale(name, stats, expected.get(name))
