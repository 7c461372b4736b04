"""Perplexity on held-out text, and how sparse a model really is.

Both work on lazy models (:mod:`llm_pruning.lazy`) one decoder layer at a time: perplexity
runs every window through layer 0, then layer 1, ... (as calibration does), then the final
norm and the LM head, and agrees exactly with the whole-model forward of an eager model.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_pruning.capture import logits_after_layers
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.layer_store import layer_store
from llm_pruning.lazy import layer_tensors

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    *,
    seqlen: int,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over non-overlapping ``seqlen`` windows of ``tokens``.

    The WikiText-2 convention of SparseGPT and Wanda: the stream is cut into
    ``len(tokens) // seqlen`` windows (the tail is dropped), each scored on its own, and every
    predicted token weighs the same. ``max_windows`` caps how many are scored, spread evenly
    over the text (:func:`evaluation_windows`). A lazy model is run layer by layer, holding the
    hidden states of every window ``(W, T, C)`` on ``device`` and one decoder layer at a time.
    """
    # Each window must predict at least one token, and at least one window must be scored:
    # otherwise the mean below divides by zero.
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"eval-windows must be at least 1, got {max_windows}")
    available = tokens.numel() // seqlen
    if available == 0:
        raise ValueError(
            f"evaluation text too short: {tokens.numel()} tokens, but seqlen is {seqlen}"
        )
    chosen = evaluation_windows(available, max_windows)
    windows = tokens[: available * seqlen].view(available, seqlen)[chosen]  # (W, T)
    if layer_store(model) is not None:
        return _perplexity_by_layer(model, windows, torch.device(device), progress)
    model.to(device)
    nll, predicted = 0.0, 0
    try:
        for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            ids = window[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            predicted += seqlen - 1
    finally:
        model.to("cpu")
    return math.exp(nll / predicted)


def evaluation_windows(available: int, max_windows: int | None) -> list[int]:
    """Indices of the windows :func:`perplexity` scores: all ``available``, or ``max_windows``
    of them evenly spaced, window ``floor(i * available / max_windows)`` for
    ``i = 0 .. max_windows - 1`` (10 windows, cap 4: 0, 2, 5, 7).

    The first N windows of a long text are one passage of it (the first 16 of Austen's
    *Persuasion* score 8 % above the whole book); evenly spaced ones sample all of it, and
    exact integer arithmetic makes the choice the same on every machine.
    """
    if max_windows is None or max_windows >= available:
        return list(range(available))
    return [i * available // max_windows for i in range(max_windows)]


@torch.no_grad()
def _perplexity_by_layer(
    model: PreTrainedModel, windows: torch.Tensor, device: torch.device, progress: bool
) -> float:
    """:func:`perplexity` of a lazy model: the windows advance together, layer by layer."""
    calibrator = LayerwiseCalibrator(model, windows, device)  # the inputs of layer 0
    total = num_layers(model)
    for index in tqdm(range(total), desc="perplexity", unit="layer", disable=not progress):
        calibrator.advance(index)
    # The CausalLM's own code after the last layer (final norm, LM head, any soft-capping).
    nll, predicted = 0.0, 0
    with logits_after_layers(model, device, calibrator.returns_tuple) as head:
        for window, hidden in zip(windows, calibrator.hidden, strict=True):
            ids = window[None].to(device)
            logits = head(ids, hidden[None])[0, :-1].float()  # (T-1, V)
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            predicted += window.numel() - 1
    return math.exp(nll / predicted)


def sparsity_report(model: PreTrainedModel) -> dict:
    """Fraction of exact zeros in every prunable matrix, and over all of them.

    A lazy model's layers that are not loaded are read from disk one at a time.
    """
    per_matrix, zeros, total = {}, 0, 0
    for index in range(num_layers(model)):
        tensors = layer_tensors(model, index)
        for name in prunable_weights(model, index):
            weight = tensors[name]
            matrix_zeros = int((weight == 0).sum())
            per_matrix[name] = matrix_zeros / weight.numel()
            zeros += matrix_zeros
            total += weight.numel()
    return {"overall": zeros / total, "per_matrix": per_matrix}
