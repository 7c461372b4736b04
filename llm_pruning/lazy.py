"""Decoder layers loaded from disk one at a time: client RAM that does not grow with depth.

:func:`load_lazy` builds a causal LM whose embeddings, final norm and LM head are real, and
whose decoder-layer parameters sit on the ``meta`` device (shapes and dtypes, no storage). A
:class:`LayerStore`, reachable through :func:`layer_store`, materialises one layer at a time
from the model's safetensors files (memory-mapped by ``safe_open``), converted to the model
dtype exactly as ``from_pretrained(dtype=...)`` converts it, so a lazy model computes
bit-identical results to an eager one.

A layer whose weights changed in memory (a client's pruned layer) is *pinned*: it stays
resident until its owner has encoded it. A layer whose new values must outlive the process
(a merged global layer on the server, a client's copy of it) is written with
:meth:`LayerStore.replace` into a per-layer safetensors file; later loads read that file.

The helpers :func:`on_device`, :func:`pin_layer`, :func:`release_layer`, :func:`layer_tensors`
and :func:`update_layer` take any model: an eager one (``layer_store(model) is None``) keeps
today's behaviour, so the engine and evaluation have one code path.

A layer that is not loaded cannot be used by mistake: every module of it carries a forward
pre-hook that raises :class:`LayerNotLoadedError` (a meta weight would otherwise give
uninitialised numbers from ``F.linear`` on a CPU input), and reading its values fails as meta
tensors do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llm_pruning.families import family_of
from llm_pruning.layer_store import (
    LayerStore,
    assign_tensor,
    attach_store,
    checkpoint_files,
    layer_store,
    state_entries,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ loading


def load_lazy(
    location: Path,
    dtype: torch.dtype = torch.float32,
    *,
    work_dir: Path | None = None,
    scratch_root: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A lazy model and its tokenizer from a folder of safetensors (one file or sharded).

    Everything outside the decoder layers is loaded now, converted to ``dtype``; decoder-layer
    parameters stay on the meta device until :func:`on_device` or the store loads them. The
    model is in eval mode; ``layer_store(model)`` is its :class:`LayerStore`.
    """
    location = Path(location)
    files = checkpoint_files(location)
    tokenizer = AutoTokenizer.from_pretrained(str(location))
    config = AutoConfig.from_pretrained(str(location))
    # Real (not meta) buffers: non-persistent ones such as the rotary `inv_freq` are computed
    # at construction and never stored in a checkpoint.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    family = family_of(model)  # fail early on a family we cannot prune
    model.config._name_or_path = str(location)
    if (location / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(location))

    expected = state_entries(model)
    sources = _match_keys(files, expected, model.base_model_prefix, _key_renamings(model))
    layers_prefix = family.layers_prefix
    outer = {name: src for name, src in sources.items() if not name.startswith(layers_prefix)}
    by_file: dict[Path, list[str]] = {}
    for name, (file, _) in outer.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for name in names:
                stored = handle.get_tensor(outer[name][1])
                assign_tensor(model, name, stored.to(expected[name].dtype))
    missing = {
        name for name in expected if not name.startswith(layers_prefix) and name not in outer
    }
    _tie(model, missing)
    still_meta = sorted(
        name
        for name, tensor in state_entries(model).items()
        if tensor.is_meta and not name.startswith(layers_prefix)
    )
    if still_meta:
        raise ValueError(f"model: the checkpoint in {location} lacks tensors {still_meta}")

    store = LayerStore(model, sources, work_dir=work_dir, scratch_root=scratch_root)
    attach_store(model, store)
    model.eval()
    return model, tokenizer


def _key_renamings(model: PreTrainedModel) -> list:
    """The key renamings transformers 5 applies when it loads ``model``'s checkpoints (GPT-NeoX
    saves ``embed_out``, the model calls it ``lm_head``). Converters that fuse tensors (MoE
    experts) are not renamings: their keys stay unknown. None before transformers 5."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


def _match_keys(
    files: Mapping[str, Path],
    expected: Mapping[str, torch.Tensor],
    base_prefix: str,
    renamings: Iterable = (),
) -> dict[str, tuple[Path, str]]:
    """Model name -> (file, checkpoint key). Keys saved without the base-model prefix (old
    OPT checkpoints: ``decoder.layers.0...``) get it, legacy names get the model's
    ``renamings``; unknown keys are ignored, as HF does."""
    renamings = list(renamings)
    sources, unexpected = {}, []
    for key, file in files.items():
        if key in expected:
            sources[key] = (file, key)
        elif f"{base_prefix}.{key}" in expected:
            sources[f"{base_prefix}.{key}"] = (file, key)
        elif (renamed := _renamed(key, renamings, expected)) is not None:
            sources[renamed] = (file, key)
        else:
            unexpected.append(key)
    if unexpected:
        log.warning("model: ignoring checkpoint tensors the model does not have: %s", unexpected)
    return sources


def _renamed(key: str, renamings: list, expected: Mapping[str, torch.Tensor]) -> str | None:
    """The model's name for legacy checkpoint key ``key``, or None."""
    for rule in renamings:
        name, _ = rule.rename_source_key(key)
        if name in expected:
            return name
    return None


def _tie(model: PreTrainedModel, missing: set[str]) -> None:
    """Tie the weights the config ties, as from_pretrained does (the missing key follows)."""
    try:
        model.tie_weights(missing_keys=set(missing))
    except TypeError:  # transformers 4.x: no `missing_keys`
        model.tie_weights()


# --------------------------------------------------------------- helpers for any model


@contextmanager
def on_device(
    model: PreTrainedModel, index: int, device: str | torch.device
) -> Iterator[nn.Module]:
    """Decoder layer ``index`` on ``device`` for a ``with`` block, then back.

    Eager model, or a layer already resident: moved to ``device``, then to the CPU. A lazy
    layer not loaded: loaded on ``device``, then unloaded — unless it was pinned meanwhile,
    in which case it moves to the CPU and stays.
    """
    store = layer_store(model)
    if store is None or store.is_resident(index):
        layer = family_of(model).layers_of(model)[index].to(device)
        try:
            yield layer
        finally:
            layer.to("cpu")
        return
    layer = store.load(index, device)
    try:
        yield layer
    finally:
        if store.is_pinned(index):
            layer.to("cpu")
        else:
            store.unload(index)


def pin_layer(model: PreTrainedModel, index: int) -> nn.Module:
    """Layer ``index`` resident (on the CPU if it had to be loaded) and pinned, so changes
    made to it in memory stay until :func:`release_layer`. An eager model's layer as it is."""
    store = layer_store(model)
    if store is not None:
        if not store.is_resident(index):
            store.load(index, "cpu")
        store.pin(index)
    return family_of(model).layers_of(model)[index]


def release_layer(model: PreTrainedModel, index: int) -> None:
    """Unpin and unload layer ``index`` of a lazy model (its changes are lost unless saved
    with :func:`update_layer`); nothing for an eager model."""
    store = layer_store(model)
    if store is not None:
        store.unpin(index)
        store.unload(index)


def layer_tensors(model: PreTrainedModel, index: int) -> dict[str, torch.Tensor]:
    """Layer ``index``'s current tensors by full name, without materialising the module.

    Eager or resident: the module's own tensors (on their device). Otherwise the store's
    values on disk (CPU).
    """
    store = layer_store(model)
    if store is not None and not store.is_resident(index):
        return store.tensors(index)
    family = family_of(model)
    prefix = family.layer_prefix(index)
    layer = family.layers_of(model)[index]
    return {prefix + name: t.detach() for name, t in state_entries(layer).items()}


def update_layer(model: PreTrainedModel, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
    """Give (some of) layer ``index``'s tensors new values, by full name.

    Eager: copied into the parameters. Lazy: :meth:`LayerStore.replace` (on disk; the layer
    needs no memory until it is next loaded).
    """
    store = layer_store(model)
    if store is not None:
        store.replace(index, tensors)
        return
    current = layer_tensors(model, index)
    unknown = sorted(set(tensors) - set(current))
    if unknown:
        raise ValueError(f"layer {index} has no tensors {unknown}")
    for name, value in tensors.items():
        current[name].copy_(value)


@contextmanager
def resident_layers(model: PreTrainedModel, layers: Iterable[int]) -> Iterator[None]:
    """``layers`` pinned in memory for a ``with`` block, then saved and freed.

    For a lazy model, whatever the block changed in those layers is written to the store
    (:meth:`LayerStore.replace`, on disk) when the block ends, and the layers are unloaded:
    a server merging one group of layers at a time holds only that group. Nothing happens
    for an eager model. If the block raises, the layers stay pinned and unsaved.
    """
    layers = sorted(set(layers))
    for index in layers:
        pin_layer(model, index)
    yield
    store = layer_store(model)
    for index in layers:
        if store is not None:
            store.replace(index, layer_tensors(model, index))
        release_layer(model, index)
