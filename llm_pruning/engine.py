"""Sequential layer-wise calibration: prune chosen decoder layers of a causal LM.

As in SparseGPT: capture what decoder layer 0 receives (hidden states and every keyword
argument — current LLaMA layers need ``position_embeddings``) on the calibration segments,
then walk the layers in order. A sampled layer gets its prunable Linears' statistics from
forward hooks, is pruned, and is run again so the next layer sees the pruned layer's outputs.
A layer outside the set is only run forward: it stays bit-identical. One decoder layer sits on
the compute device at a time; the rest of the model stays on the CPU. For a lazy model
(:mod:`llm_pruning.lazy`) the other layers stay on disk: a layer is loaded for its forward
passes and unloaded after, except a pruned one, which is pinned until its owner encodes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_pruning.lazy import on_device, pin_layer
from llm_pruning.models import family_of, num_layers, prunable_weights
from llm_pruning.pruners import Pruner, SparsityPattern

log = logging.getLogger(__name__)


class _InputCatcher(nn.Module):
    """Wraps decoder layer 0: records its inputs, then runs it, so the model's own code path
    is untouched (no exception is needed to stop the forward pass)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict | None = None

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.hidden.append(hidden)
        if self.kwargs is None:  # identical for every segment of the same length
            self.kwargs = kwargs
        return self.layer(hidden, *args[1:], **kwargs)

    def __getattr__(self, name: str):
        # The model may read attributes of its layers (e.g. `attention_type` on Mistral/Qwen2).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


def _hidden_of(output) -> torch.Tensor:
    """Decoder layers return a tensor in current transformers, a tuple in older releases."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_layer_inputs(
    model: PreTrainedModel, segments: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, dict]:
    """What decoder layer 0 receives on each segment: hidden states ``(N, T, C)`` on
    ``device``, and the keyword arguments of the first segment (the same for every segment of
    one length). Runs the embeddings and layer 0 only; the model ends up on the CPU."""
    backbone = family_of(model).backbone_of(model)
    layers = backbone.layers
    with on_device(model, 0, device) as first:
        catcher = _InputCatcher(first)
        backbone.layers = nn.ModuleList([catcher])  # run embeddings + layer 0 only
        try:
            backbone.to(device)
            for segment in segments:
                backbone(input_ids=segment[None].to(device), use_cache=False)
        finally:
            backbone.to("cpu")  # before the other (lazy: not loaded) layers are back
            backbone.layers = layers
    return torch.cat(catcher.hidden), catcher.kwargs


class _SharedInputFeed:
    """Feeds each prunable Linear's inputs to its statistics, once per distinct input tensor.

    q/k/v read one tensor (the normed hidden states) and gate/up another, so their sums are
    equal: a Linear whose hook sees the very tensor the previous hook saw shares that
    accumulator instead of summing again. On LLaMA-like layers that is 4 Hessian sums instead
    of 7, about a quarter of the statistics time. The sharing found on the first segment must
    hold on every segment, or the sums would silently miss rows: a change raises.
    """

    def __init__(self, stats: dict[str, object]):
        self.stats = stats
        self.owner: dict[str, str] = {}  # name -> the name whose accumulator it shares
        self.segments: dict[str, int] = dict.fromkeys(stats, 0)
        self._previous: tuple[str, torch.Tensor] | None = None

    def hook(self, name: str):
        def add(_module, inputs, _output) -> None:
            tensor = inputs[0]
            previous = self._previous
            first_segment = self.segments[name] == 0
            shares = previous is not None and previous[1] is tensor
            if first_segment and shares:
                self.owner[name] = self.owner.get(previous[0], previous[0])
            elif shares != (name in self.owner):
                raise RuntimeError(
                    f"{name}: reads the previous Linear's input on one calibration segment but "
                    "not on another; its statistics cannot be shared"
                )
            self.segments[name] += 1
            if name not in self.owner:
                self.stats[name].add(tensor)
            self._previous = (name, tensor)

        return add

    def result(self) -> dict[str, object]:
        self._previous = None  # no activation outlives the pass
        return {name: self.stats[self.owner.get(name, name)] for name in self.stats}


@dataclass
class Timings:
    """Seconds spent per stage, summed over layers."""

    capture: float = 0.0
    statistics: float = 0.0
    prune: float = 0.0
    forward: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in vars(self).items()}


class LayerwiseCalibrator:
    """Holds the calibration activations entering the current decoder layer.

    The building blocks (``statistics``, ``prune_layer``, ``advance``) are public so that a
    federated strategy can interleave them with communication, e.g. summing statistics over
    clients before one pruning step.
    """

    def __init__(
        self, model: PreTrainedModel, segments: torch.Tensor, device: str | torch.device = "cpu"
    ):
        if segments.ndim != 2 or segments.shape[0] == 0:
            raise ValueError(
                f"segments must be a non-empty (N, T) tensor, got {tuple(segments.shape)}"
            )
        self.model = model
        self.family = family_of(model)
        self.device = torch.device(device)
        self.next_layer = 0
        self.timings = Timings()
        start = time.perf_counter()
        # (N, T, C) and the keyword arguments every segment shares
        self.hidden, self.layer_kwargs = capture_layer_inputs(model, segments, self.device)
        self.timings.capture = time.perf_counter() - start

    @torch.no_grad()
    def _run(self, layer: nn.Module) -> torch.Tensor:
        return torch.cat([_hidden_of(layer(h[None], **self.layer_kwargs)) for h in self.hidden])

    @torch.no_grad()
    def statistics(self, index: int, pruner: Pruner) -> dict[str, object]:
        """Run the calibration inputs through layer ``index`` and return each prunable
        Linear's statistics (keyed by weight name). Does not move to the next layer."""
        self._expect(index)
        linears = prunable_weights(self.model, index)
        feed = _SharedInputFeed(
            {name: pruner.make_stats(lin.in_features, self.device) for name, lin in linears.items()}
        )
        handles = [
            linear.register_forward_hook(feed.hook(name)) for name, linear in linears.items()
        ]
        start = time.perf_counter()
        try:
            with self._on_device(index) as layer:
                self._run(layer)
        finally:
            for handle in handles:
                handle.remove()
        self.timings.statistics += time.perf_counter() - start
        return feed.result()

    @torch.no_grad()
    def prune_layer(
        self,
        index: int,
        pruner: Pruner,
        pattern: SparsityPattern,
        stats: dict | None = None,
        keep_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prune every prunable Linear of layer ``index`` in place; returns keep-masks by name.

        ``stats`` defaults to this client's own statistics; a caller may pass pooled ones.
        ``keep_masks`` (weight name -> bool mask) fixes the masks instead of letting the pruner
        choose them: the pruner then only compensates for them (the masked re-solve), which
        only pruners that update weights can do. The layer of a lazy model is pinned: its new
        weights stay in memory until the caller releases it (``lazy.release_layer``).
        """
        if keep_masks is not None and not pruner.updates_weights:
            raise ValueError(
                f"pruner {pruner.name} keeps the dense values: it cannot re-solve under a mask"
            )
        pin_layer(self.model, index)  # first, so the statistics pass loads it only once
        if stats is None and pruner.make_stats is not None:
            stats = self.statistics(index, pruner)
        start = time.perf_counter()
        masks = {}
        for name, linear in prunable_weights(self.model, index).items():
            weight = linear.weight.data.to(self.device)
            given = {} if keep_masks is None else {"keep_mask": keep_masks[name]}
            new_weight, keep = pruner.prune(
                weight, stats[name] if stats else None, pattern, **given
            )
            linear.weight.data.copy_(new_weight.to(linear.weight.device))
            masks[name] = keep.cpu()
        self.timings.prune += time.perf_counter() - start
        return masks

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Run layer ``index`` (as it now is) to produce the next layer's inputs."""
        self._expect(index)
        start = time.perf_counter()
        with self._on_device(index) as layer:
            self.hidden = self._run(layer)
        self.next_layer += 1
        self.timings.forward += time.perf_counter() - start

    def _expect(self, index: int) -> None:
        if index != self.next_layer:
            raise RuntimeError(
                f"layers are calibrated in order: expected layer {self.next_layer}, got {index}"
            )

    def _on_device(self, index: int):
        return on_device(self.model, index, self.device)


@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor]  # weight name -> keep-mask (True = kept)
    timings: Timings
    layers: list[int] = field(default_factory=list)


def check_layer_ids(layer_ids: Iterable[int], total: int) -> list[int]:
    """Sorted distinct layer ids, or a clear error naming the bad one."""
    ids = sorted(set(int(i) for i in layer_ids))
    bad = [i for i in ids if not 0 <= i < total]
    if bad:
        raise ValueError(f"layer ids {bad} out of range: the model has layers 0..{total - 1}")
    return ids


def prune_model(
    model: PreTrainedModel,
    segments: torch.Tensor,
    pruner: Pruner,
    pattern: SparsityPattern,
    *,
    layer_ids: Iterable[int] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PruneResult:
    """Prune ``layer_ids`` (default: all) of ``model`` in place on ``segments`` ``(N, T)``."""
    total = num_layers(model)
    ids = check_layer_ids(range(total) if layer_ids is None else layer_ids, total)
    if not ids:
        return PruneResult({}, Timings(), [])
    if pruner.make_stats is None:  # magnitude: no calibration data needed
        return _prune_without_data(model, pruner, pattern, ids)
    calibrator = LayerwiseCalibrator(model, segments, device)
    masks: dict[str, torch.Tensor] = {}
    chosen = set(ids)
    # Layers after the last chosen one cannot change what we prune: stop there.
    bar = tqdm(
        range(ids[-1] + 1), desc=f"{pruner.name} {pattern}", unit="layer", disable=not progress
    )
    for index in bar:
        if index in chosen:
            masks.update(calibrator.prune_layer(index, pruner, pattern))
            log.info("layer %d/%d pruned (%s, %s)", index + 1, total, pruner.name, pattern)
        calibrator.advance(index)
    return PruneResult(masks, calibrator.timings, ids)


def _prune_without_data(
    model: PreTrainedModel, pruner: Pruner, pattern: SparsityPattern, ids: list[int]
) -> PruneResult:
    timings, masks = Timings(), {}
    start = time.perf_counter()
    for index in ids:
        pin_layer(model, index)  # lazy: loaded on the CPU, kept until encoded
        for name, linear in prunable_weights(model, index).items():
            new_weight, keep = pruner.prune(linear.weight.data, None, pattern)
            linear.weight.data.copy_(new_weight)
            masks[name] = keep
    timings.prune = time.perf_counter() - start
    return PruneResult(masks, timings, ids)
