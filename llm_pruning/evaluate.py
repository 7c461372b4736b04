"""Perplexity on held-out text, and how sparse a model really is."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_pruning.models import num_layers, prunable_weights

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
    predicted token weighs the same.
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
    count = available if max_windows is None else min(max_windows, available)
    windows = tokens[: count * seqlen].view(count, seqlen)  # (W, T)
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


def sparsity_report(model: PreTrainedModel) -> dict:
    """Fraction of exact zeros in every prunable matrix, and over all of them."""
    per_matrix, zeros, total = {}, 0, 0
    for index in range(num_layers(model)):
        for name, linear in prunable_weights(model, index).items():
            matrix_zeros = int((linear.weight == 0).sum())
            per_matrix[name] = matrix_zeros / linear.weight.numel()
            zeros += matrix_zeros
            total += linear.weight.numel()
    return {"overall": zeros / total, "per_matrix": per_matrix}
