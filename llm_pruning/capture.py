"""What each decoder layer receives, caught on the calibration segments, and the logits after
any layer: the inputs the engine walks the layers with, and the scores OWL and evaluation read.

Decoder layer 0's hidden states come with every keyword argument it is called with (current
LLaMA layers need ``position_embeddings``); every other layer's keyword arguments are caught
too (Gemma's and Qwen2's sliding layers get other masks than their global ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from llm_pruning.families import family_of
from llm_pruning.lazy import on_device


class _InputCatcher(nn.Module):
    """Stands in for one decoder layer while the backbone runs: records the arguments the
    model passes that layer (per layer: Gemma's sliding and global layers get different masks
    and rotary tables), the same for every segment of one length.

    The catcher of layer 0 also records its hidden states and runs the real layer, so the
    model's own code path is untouched (no exception is needed to stop the forward pass). The
    others pass their input through in layer 0's output form and hold their layer outside the
    module tree: moving the backbone never moves (or, lazy, loads) them.
    """

    def __init__(self, layer: nn.Module, first: _InputCatcher | None = None):
        super().__init__()
        if first is None:
            self.layer = layer
        else:
            object.__setattr__(self, "_stand_in_for", layer)
        object.__setattr__(self, "_first", first)
        self.hidden: list[torch.Tensor] = []
        self.args: tuple | None = None  # positional arguments after the hidden states
        self.kwargs: dict | None = None
        self.returns_tuple = False

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.kwargs is None:  # identical for every segment of the same length
            self.args, self.kwargs = args[1:], kwargs
        first = self._first
        if first is not None:
            return (hidden, None) if first.returns_tuple else hidden
        self.hidden.append(hidden)
        output = self.layer(hidden, *args[1:], **kwargs)
        self.returns_tuple = isinstance(output, tuple)
        return output

    def __getattr__(self, name: str):
        # The model may read attributes of its layers (e.g. `attention_type` on Mistral/Qwen2).
        try:
            return super().__getattr__(name)
        except AttributeError:
            stand_in = self.__dict__.get("_stand_in_for")
            return getattr(stand_in if stand_in is not None else super().__getattr__("layer"), name)


def hidden_of(output) -> torch.Tensor:
    """Decoder layers return a tensor in current transformers, a tuple in older releases."""
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class LayerCall:
    """What the model passes a decoder layer besides its hidden states."""

    args: tuple
    kwargs: dict


@torch.no_grad()
def capture_layer_calls(
    model: PreTrainedModel, segments: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[LayerCall]]:
    """What the decoder layers receive on each segment: layer 0's hidden states ``(N, T, C)``
    on ``device``, and every layer's other arguments on the first segment (the same for every
    segment of one length). Runs the embeddings and layer 0 only; the model ends up on the CPU.
    """
    family = family_of(model)
    backbone = family.backbone_of(model)
    layers = family.layers_of(model)
    with on_device(model, 0, device) as first:
        catcher = _InputCatcher(first)
        stand_ins = [catcher] + [_InputCatcher(layer, catcher) for layer in layers[1:]]
        setattr(backbone, family.layers_attribute, nn.ModuleList(stand_ins))
        try:
            backbone.to(device)
            for segment in segments:
                backbone(input_ids=segment[None].to(device), use_cache=False)
        finally:
            backbone.to("cpu")  # before the other (lazy: not loaded) layers are back
            setattr(backbone, family.layers_attribute, layers)
    missing = [index for index, stand_in in enumerate(stand_ins) if stand_in.kwargs is None]
    if missing:
        raise RuntimeError(f"the model's forward pass did not call decoder layers {missing}")
    calls = [LayerCall(stand_in.args, stand_in.kwargs) for stand_in in stand_ins]
    return torch.cat(catcher.hidden), calls


def capture_layer_inputs(
    model: PreTrainedModel, segments: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, dict]:
    """Layer 0's hidden states and keyword arguments (:func:`capture_layer_calls`)."""
    hidden, calls = capture_layer_calls(model, segments, device)
    return hidden, calls[0].kwargs


class _LastLayerOutputs(nn.Module):
    """Stands in for the whole decoder-layer list: returns given outputs of the last layer,
    so the model's own code runs whatever follows it (final norm, OPT's projection, the LM
    head, Gemma 2's logit soft-capping). Holds the last layer outside the module tree only to
    answer the model's questions about it (``attention_type``)."""

    def __init__(self, last_layer: nn.Module, returns_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_stand_in_for", last_layer)
        self.returns_tuple = returns_tuple
        self.output: torch.Tensor | None = None

    def forward(self, *_args, **_kwargs):
        return (self.output, None) if self.returns_tuple else self.output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_stand_in_for"], name)


@contextmanager
def logits_after_layers(
    model: PreTrainedModel, device: torch.device, returns_tuple: bool = False
) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """For a ``with`` block, a function ``(input_ids (1, T), last hidden (1, T, C)) -> logits
    (1, T, V)``: the CausalLM's own forward with its decoder layers replaced by the given
    output of the last one. Everything but the decoder layers sits on ``device`` meanwhile;
    no decoder layer is loaded or moved. ``returns_tuple``: the layers' output form
    (:attr:`LayerwiseCalibrator.returns_tuple`)."""
    family = family_of(model)
    backbone, layers = family.backbone_of(model), family.layers_of(model)
    stand_in = _LastLayerOutputs(layers[-1], returns_tuple)

    def logits(input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        stand_in.output = hidden
        return model(input_ids=input_ids, use_cache=False).logits

    setattr(backbone, family.layers_attribute, nn.ModuleList([stand_in]))
    try:
        model.to(device)
        yield logits
    finally:
        model.to("cpu")  # before the (lazy: not loaded) layers are back
        setattr(backbone, family.layers_attribute, layers)
