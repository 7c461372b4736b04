"""LoRA for recovery, without peft: adapters as forward hooks, and activations recomputed.

:func:`llm_pruning.recovery.recover` with ``method="lora"`` trains an :class:`Adapter` on every
prunable Linear of a frozen model inside :func:`recomputed_activations`; nothing here wraps or
re-registers the model's modules, so removing the hooks leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from llm_pruning.families import family_of


@contextlib.contextmanager
def recomputed_activations(model: PreTrainedModel) -> Iterator[None]:
    """Gradient checkpointing of every decoder layer while in the block: a layer's forward
    keeps only its inputs, and the backward pass runs it again. Done here rather than with
    transformers' switch, whose name and side effects (an input hook it leaves behind)
    change between versions. Non-reentrant: the frozen base's inputs need no
    ``requires_grad``, and the adapters' hooks run again in the recomputation."""
    layers = list(family_of(model).layers_of(model))
    # A forward set on the instance (accelerate's hooks set one) is put back as it was.
    own = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        # An instance attribute shadows the class's forward; Module.__call__ (and its hooks)
        # still wraps it.
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


class Adapter:
    """A LoRA adapter on one Linear as a forward hook: no wrapper module, no parameter is
    registered on the model, and removing the hook leaves the model as it was."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, device: torch.device):
        out_features, in_features = linear.weight.shape
        self.scale = alpha / rank
        # As LoRA (and peft) initialise: A Kaiming-uniform, B zero, so training starts at the
        # pruned model. Adapters stay float32 whatever the base dtype.
        a = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.a = nn.Parameter(a.to(device))
        self.b = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.handle = linear.register_forward_hook(self._add)

    def _add(self, _module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        low_rank = inputs[0].to(self.a.dtype) @ self.a.T @ self.b.T
        return output + (low_rank * self.scale).to(output.dtype)

    def update(self) -> Tensor:
        """The adapter's full-size update of the weight, ``B @ A * alpha / rank``."""
        return (self.b @ self.a) * self.scale

    def remove(self) -> None:
        self.handle.remove()
