"""Sequential layer-wise calibration: prune chosen decoder layers of a causal LM.

As in SparseGPT: capture what decoder layer 0 receives (hidden states and every keyword
argument — current LLaMA layers need ``position_embeddings``) on the calibration segments, and
what every other layer receives besides its hidden states (Gemma's and Qwen2's sliding layers
get other masks than their global ones), then walk the layers in order. A sampled layer gets
its prunable Linears' statistics from forward hooks, is pruned, and is run again so the next
layer sees the pruned layer's outputs. A layer outside the set is only run forward: it stays
bit-identical. One decoder layer sits on the compute device at a time; the rest of the model
stays on the CPU. For a lazy model (:mod:`llm_pruning.lazy`) the other layers stay on disk: a
layer is loaded for its forward passes and unloaded after, except a pruned one, which is pinned
until its owner encodes it.
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

from llm_pruning.capture import capture_layer_calls, hidden_of
from llm_pruning.families import family_of, num_layers, prunable_weights
from llm_pruning.lazy import on_device, pin_layer
from llm_pruning.pruners import Pruner, SparsityPattern
from llm_pruning.pruners.sparsegpt import check_reconstruction

log = logging.getLogger(__name__)

# Tokens per decoder-layer call in the calibration forwards (whole segments; at least one).
_FORWARD_TOKENS = 4096


class _SharedInputFeed:
    """Feeds each prunable Linear's inputs to its statistics, once per distinct input tensor.

    q/k/v read one tensor (the normed hidden states) and gate/up another, so their sums are
    equal: a Linear whose hook sees the very tensor the previous hook saw shares that
    accumulator instead of summing again. On LLaMA-like layers that is 4 Hessian sums instead
    of 7, about a quarter of the statistics time. The sharing found on the first forward call
    must hold on every call, or the sums would silently miss rows: a change raises.
    """

    def __init__(self, stats: dict[str, object]):
        self.stats = stats
        self.owner: dict[str, str] = {}  # name -> the name whose accumulator it shares
        self.calls: dict[str, int] = dict.fromkeys(stats, 0)
        self._previous: tuple[str, torch.Tensor] | None = None

    def hook(self, name: str):
        def add(_module, inputs, _output) -> None:
            tensor = inputs[0]
            previous = self._previous
            first_call = self.calls[name] == 0
            shares = previous is not None and previous[1] is tensor
            if first_call and shares:
                self.owner[name] = self.owner.get(previous[0], previous[0])
            elif shares != (name in self.owner):
                raise RuntimeError(
                    f"{name}: reads the previous Linear's input in one forward call but not in "
                    "another; its statistics cannot be shared"
                )
            self.calls[name] += 1
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
        # (N, T, C), and per layer the other arguments every segment shares
        self.hidden, self.layer_calls = capture_layer_calls(model, segments, self.device)
        self.layer_kwargs = self.layer_calls[0].kwargs  # layer 0's (benchmarks run layer 0)
        self.returns_tuple = False  # whether the decoder layers return tuples (transformers 4)
        self.timings.capture = time.perf_counter() - start

    @torch.no_grad()
    def _run(self, index: int, layer: nn.Module) -> torch.Tensor:
        call = self.layer_calls[index]
        # Several segments per call: fewer, larger calls (on the 2-core CPU SmolLM2's 8 x 512
        # tokens measured the same either way: its products already run at the matmul rate;
        # the gain is for devices where a call's launch cost dominates). The arguments were
        # captured for one segment and broadcast over the batch (masks, rotary: (1, ...)).
        per_call = max(1, _FORWARD_TOKENS // self.hidden.shape[1])
        outputs = [
            layer(self.hidden[first : first + per_call], *call.args, **call.kwargs)
            for first in range(0, self.hidden.shape[0], per_call)
        ]
        self.returns_tuple = isinstance(outputs[0], tuple)  # the form the model expects back
        return torch.cat([hidden_of(output) for output in outputs])

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
                self._run(index, layer)
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
        patterns: Mapping[str, SparsityPattern] | None = None,
        reconstruction: str = "sparsegpt",
    ) -> dict[str, torch.Tensor]:
        """Prune every prunable Linear of layer ``index`` in place; returns keep-masks by name.

        ``stats`` defaults to this client's own statistics; a caller may pass pooled ones.
        ``keep_masks`` (weight name -> bool mask) fixes the masks instead of letting the pruner
        choose them: the pruner then only compensates for them (the masked re-solve), which
        only pruners that update weights can do. ``patterns`` (weight name -> pattern)
        overrides ``pattern`` per matrix (non-uniform layer-wise sparsity, ``owl.py``).
        ``reconstruction`` (one of :data:`~llm_pruning.pruners.RECONSTRUCTIONS`) sets how a
        pruner that updates weights sets the kept values; ``"lsq"`` solves the masked least
        squares exactly (``pruners/lsq.py``). The layer of a lazy model is pinned: its new
        weights stay in memory until the caller releases it (``lazy.release_layer``).
        """
        if keep_masks is not None and not pruner.updates_weights:
            raise ValueError(
                f"pruner {pruner.name} keeps the dense values: it cannot re-solve under a mask"
            )
        options = reconstruction_options(pruner, reconstruction)
        pin_layer(self.model, index)  # first, so the statistics pass loads it only once
        if stats is None and pruner.make_stats is not None:
            stats = self.statistics(index, pruner)
        start = time.perf_counter()
        masks = {}
        for name, linear in prunable_weights(self.model, index).items():
            weight = linear.weight.data.to(self.device)
            given = {} if keep_masks is None else {"keep_mask": keep_masks[name]}
            matrix_pattern = patterns.get(name, pattern) if patterns else pattern
            new_weight, keep = pruner.prune(
                weight, stats[name] if stats else None, matrix_pattern, **given, **options
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
            self.hidden = self._run(index, layer)
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


def reconstruction_options(pruner: Pruner, reconstruction: str) -> dict[str, str]:
    """The keyword arguments that ask ``pruner.prune`` for ``reconstruction``.

    Empty for the default ``"sparsegpt"``, so that pruners (and wrappers of them) that take no
    such argument keep working; a mask-only pruner cannot do anything else.

    Raises
    ------
    ValueError
        Naming ``reconstruction`` when it is unknown, or not the default for a pruner that
        keeps the dense values.
    """
    check_reconstruction(reconstruction)
    if reconstruction == "sparsegpt":
        return {}
    if not pruner.updates_weights:
        raise ValueError(
            f"reconstruction={reconstruction!r} sets kept values, but pruner {pruner.name} "
            "keeps the dense values (it only chooses a mask); use a pruner that updates "
            "weights (sparsegpt) or reconstruction='sparsegpt'"
        )
    return {"reconstruction": reconstruction}


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
    patterns: Mapping[str, SparsityPattern] | None = None,
    reconstruction: str = "sparsegpt",
) -> PruneResult:
    """Prune ``layer_ids`` (default: all) of ``model`` in place on ``segments`` ``(N, T)``.

    ``patterns`` (weight name -> pattern) overrides ``pattern`` per matrix;
    ``reconstruction`` is passed to :meth:`LayerwiseCalibrator.prune_layer`."""
    reconstruction_options(pruner, reconstruction)  # fail before any work
    total = num_layers(model)
    ids = check_layer_ids(range(total) if layer_ids is None else layer_ids, total)
    if not ids:
        return PruneResult({}, Timings(), [])
    if pruner.make_stats is None:  # magnitude: no calibration data needed
        return _prune_without_data(model, pruner, pattern, ids, patterns)
    calibrator = LayerwiseCalibrator(model, segments, device)
    masks: dict[str, torch.Tensor] = {}
    chosen = set(ids)
    # Layers after the last chosen one cannot change what we prune: stop there.
    bar = tqdm(
        range(ids[-1] + 1), desc=f"{pruner.name} {pattern}", unit="layer", disable=not progress
    )
    for index in bar:
        if index in chosen:
            masks.update(
                calibrator.prune_layer(
                    index, pruner, pattern, patterns=patterns, reconstruction=reconstruction
                )
            )
            log.info("layer %d/%d pruned (%s, %s)", index + 1, total, pruner.name, pattern)
        calibrator.advance(index)
    return PruneResult(masks, calibrator.timings, ids)


def _prune_without_data(
    model: PreTrainedModel,
    pruner: Pruner,
    pattern: SparsityPattern,
    ids: list[int],
    patterns: Mapping[str, SparsityPattern] | None = None,
) -> PruneResult:
    timings, masks = Timings(), {}
    start = time.perf_counter()
    for index in ids:
        pin_layer(model, index)  # lazy: loaded on the CPU, kept until encoded
        for name, linear in prunable_weights(model, index).items():
            matrix_pattern = patterns.get(name, pattern) if patterns else pattern
            new_weight, keep = pruner.prune(linear.weight.data, None, matrix_pattern)
            linear.weight.data.copy_(new_weight)
            masks[name] = keep
    timings.prune = time.perf_counter() - start
    return PruneResult(masks, timings, ids)
