"""The store behind a lazy model: its decoder layers, materialised one at a time from disk.

A :class:`LayerStore` reads a layer's tensors from the model's safetensors files
(memory-mapped by ``safe_open``) when asked, keeps a changed layer *pinned* until its owner
has used it, and writes a layer whose new values must outlive the process to a per-layer
file (:meth:`LayerStore.replace`). :mod:`llm_pruning.lazy` builds lazy models on top of it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llm_pruning.families import family_of
from llm_pruning.model_folder import DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, SINGLE_FILE, write_weights

log = logging.getLogger(__name__)

_STORE_ATTRIBUTE = "_fedspallm_layer_store"


class LayerNotLoadedError(RuntimeError):
    """A decoder layer of a lazy model was used while its weights were on the meta device."""


def has_safetensors(folder: Path) -> bool:
    """Whether ``folder`` holds a model in safetensors (one file or a sharded index)."""
    return (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it, for one file or a sharded index."""
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as handle:
            return {key: folder / SINGLE_FILE for key in handle.keys()}
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    raise FileNotFoundError(f"model: {folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def layer_store(model: nn.Module) -> LayerStore | None:
    """The store of a lazy model; ``None`` for an eager one."""
    return getattr(model, _STORE_ATTRIBUTE, None)


def attach_store(model: nn.Module, store: LayerStore) -> None:
    """Make ``store`` the one :func:`layer_store` finds on ``model``."""
    setattr(model, _STORE_ATTRIBUTE, store)


def assign_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter or buffer ``name`` (relative to ``root``) to ``value``, in place of the
    old tensor object: the module objects stay, so hooks on them keep working."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


def state_entries(root: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``root`` by relative name (what a checkpoint holds)."""
    return dict(root.state_dict(keep_vars=True))


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """Write, then rename: a reader (or an mmap of the old file) never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    safetensors.torch.save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


class LayerStore:
    """Decoder layers of one lazy model, materialised on demand from safetensors files.

    Parameters
    ----------
    model
        The model whose decoder-layer parameters are on the meta device.
    sources
        Model tensor name -> (safetensors file, key in that file): every tensor the base
        checkpoint holds, decoder-layer ones included.
    work_dir
        Where :meth:`replace` writes its per-layer files; may be set later. Without one, a
        temporary folder under ``scratch_root`` (default: the system's) is made on first use
        and removed with the store. A store starts with no replacements, whatever the folder
        already holds.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        sources: Mapping[str, tuple[Path, str]],
        *,
        work_dir: Path | None = None,
        scratch_root: Path | None = None,
    ):
        # The model holds its store; the store only a weak reference back, so a model nobody
        # uses any more is freed at once (a ClientApp process prunes one model per message).
        self._model = weakref.ref(model)
        self.family = family_of(model)
        # Per layer: full name -> meta tensor (shape and dtype of what `load` materialises).
        self._entries: list[dict[str, torch.Tensor]] = []
        for index, layer in enumerate(self.family.layers_of(model)):
            prefix = self.family.layer_prefix(index)
            entries = {
                prefix + name: torch.empty_like(tensor, device="meta")
                for name, tensor in state_entries(layer).items()
            }
            missing = sorted(set(entries) - set(sources))
            if missing:
                raise ValueError(f"model: the checkpoint lacks decoder-layer tensors {missing}")
            self._entries.append(entries)
            self._guard(index, layer)
        self._sources = dict(sources)
        layers_prefix = self.family.layers_prefix
        self._outer_keys = frozenset(n for n in sources if not n.startswith(layers_prefix))
        self._pinned: set[int] = set()
        self._replaced: dict[int, Path] = {}
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._scratch_root = scratch_root
        self._scratch: tempfile.TemporaryDirectory | None = None

    # --------------------------------------------------------------------------- state

    @property
    def model(self) -> PreTrainedModel:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this layer store no longer exists")
        return model

    @property
    def _layers(self) -> nn.ModuleList:
        return self.family.layers_of(self.model)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def work_dir(self) -> Path | None:
        return self._work_dir

    @work_dir.setter
    def work_dir(self, folder: Path | None) -> None:
        # Files written so far stay where they are (`_replaced` keeps their paths).
        self._work_dir = Path(folder) if folder is not None else None

    def names(self, index: int) -> list[str]:
        """Full names of layer ``index``'s parameters and persistent buffers."""
        return list(self._entries[self._check(index)])

    def is_resident(self, index: int) -> bool:
        """Whether layer ``index`` holds real tensors (on any device)."""
        layer = self._layers[self._check(index)]
        return not any(tensor.is_meta for tensor in state_entries(layer).values())

    def is_pinned(self, index: int) -> bool:
        return index in self._pinned

    def resident(self) -> list[int]:
        """Indices of the materialised layers."""
        return [index for index in range(len(self)) if self.is_resident(index)]

    # ------------------------------------------------------------------- load / unload

    def load(self, index: int, device: str | torch.device = "cpu") -> nn.Module:
        """Materialise layer ``index`` on ``device`` (a resident one is only moved there)."""
        layer = self._layers[self._check(index)]
        if self.is_resident(index):
            return layer.to(device)
        prefix = self.family.layer_prefix(index)
        for name, value in self._read(index).items():
            assign_tensor(layer, name[len(prefix) :], value.to(device))
        return layer

    def unload(self, index: int) -> None:
        """Put layer ``index`` back on the meta device, freeing its memory — unless pinned."""
        if index in self._pinned:
            return
        layer, prefix = self._layers[self._check(index)], self.family.layer_prefix(index)
        for name, spec in self._entries[index].items():
            assign_tensor(layer, name[len(prefix) :], torch.empty_like(spec, device="meta"))

    def pin(self, index: int) -> None:
        """Keep resident layer ``index`` in memory (its weights changed) until :meth:`unpin`."""
        if not self.is_resident(index):
            raise RuntimeError(f"layer {index} is not loaded: load it before pinning it")
        self._pinned.add(index)

    def unpin(self, index: int) -> None:
        """Let :meth:`unload` free layer ``index`` again (it stays resident until then)."""
        self._pinned.discard(self._check(index))

    # ------------------------------------------------------------------ disk values

    def tensors(self, index: int, *, original: bool = False) -> dict[str, torch.Tensor]:
        """Layer ``index``'s tensors as on disk (CPU, model dtype), by full name.

        The replacement file if one was written, else the base checkpoint; ``original=True``
        reads the base checkpoint always (e.g. dense weights to check a client's reply
        against). Does not materialise the module, and ignores unsaved in-memory changes.
        """
        return self._read(self._check(index), original=original)

    def replace(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Persist new values for (some of) layer ``index``'s tensors, by full name.

        The rest of the layer keeps its current values (the resident module's, else the
        disk's); the whole layer goes into ``<work dir>/layer-<index>.safetensors``, which
        later loads read. A resident layer is updated in place.
        """
        entries = self._entries[self._check(index)]
        unknown = sorted(set(tensors) - set(entries))
        if unknown:
            raise ValueError(f"layer {index} has no tensors {unknown}")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(entries[name].shape):
                raise ValueError(
                    f"{name}: shape {tuple(value.shape)} != the model's "
                    f"{tuple(entries[name].shape)}"
                )
        resident = self.is_resident(index)
        merged = self._current(index) if resident else self._read(index)
        for name, value in tensors.items():
            merged[name] = value.detach().to("cpu", entries[name].dtype).contiguous()
        path = self._folder() / f"layer-{index:05d}.safetensors"
        _save_atomically(merged, path, {"format": "pt", "layer": str(index)})
        self._replaced[index] = path
        if resident:
            current = self._module_tensors(index)
            for name in tensors:
                current[name].data.copy_(merged[name])

    # ---------------------------------------------------------------------- saving

    def save_pretrained(
        self,
        folder: Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> None:
        """Write a Hugging Face model folder as ``PreTrainedModel.save_pretrained`` writes it
        (its shards, their names, the index), one decoder layer in memory at a time.

        ``config.json`` (and the generation config), the tokenizer if given, and the weights
        split at ``max_shard_size`` (see :func:`llm_pruning.model_folder.write_weights`).
        Layer values are the resident module's if loaded, else the disk's (replacement or base).
        """
        folder = Path(folder)
        protected = {path.parent.resolve() for path, _ in self._sources.values()}
        protected |= {path.parent.resolve() for path in self._replaced.values()}
        if folder.resolve() in protected:
            raise ValueError(f"save_pretrained: {folder} holds this store's own files")
        folder.mkdir(parents=True, exist_ok=True)
        model = self.model
        # As PreTrainedModel.save_pretrained does: record dtype and class in the config.
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        outer = self._outer_state()
        layer_of = {name: index for index, names in enumerate(self._entries) for name in names}
        specs = {  # what save_pretrained writes; meta tensors (shape, dtype) for layer ones
            name: outer[name] if name in outer else self._entries[layer_of[name]][name]
            for name in model.state_dict()
            if name in outer or name in layer_of
        }
        cached: dict[int, dict[str, torch.Tensor]] = {}  # the one layer in memory

        def fetch(name: str) -> torch.Tensor:
            if name in outer:
                return outer[name]
            index = layer_of[name]
            if index not in cached:
                cached.clear()  # drop the previous layer before reading the next
                cached[index] = self._latest(index)
            return cached[index][name]

        total = model.num_parameters()
        write_weights(folder, specs, fetch, max_shard_size=max_shard_size, total_parameters=total)

    # -------------------------------------------------------------------- internals

    def _check(self, index: int) -> int:
        if not 0 <= index < len(self._layers):
            raise IndexError(f"layer {index} out of range: the model has layers 0..{len(self) - 1}")
        return index

    def _guard(self, index: int, layer: nn.Module) -> None:
        """A pre-hook on the layer and each module owning its tensors: use before load fails."""

        def check(module: nn.Module, _args) -> None:
            tensors = [*module.parameters(), *module.buffers()]
            if any(tensor.is_meta for tensor in tensors):
                raise LayerNotLoadedError(
                    f"decoder layer {index} of this lazy model is not loaded (its weights are on "
                    f"the meta device): use llm_pruning.lazy.on_device(model, {index}, device) "
                    f"or layer_store(model).load({index}, device)"
                )

        for module in layer.modules():
            if module is layer or module._parameters or module._buffers:
                module.register_forward_pre_hook(check)

    def _module_tensors(self, index: int) -> dict[str, torch.Tensor]:
        prefix = self.family.layer_prefix(index)
        return {prefix + name: t for name, t in state_entries(self._layers[index]).items()}

    def _current(self, index: int) -> dict[str, torch.Tensor]:
        """A resident layer's values, on the CPU."""
        return {name: t.detach().cpu() for name, t in self._module_tensors(index).items()}

    def _latest(self, index: int) -> dict[str, torch.Tensor]:
        return self._current(index) if self.is_resident(index) else self._read(index)

    def _read(self, index: int, *, original: bool = False) -> dict[str, torch.Tensor]:
        entries = self._entries[index]
        if not original and index in self._replaced:
            with safe_open(str(self._replaced[index]), framework="pt") as handle:
                return {name: handle.get_tensor(name) for name in entries}
        by_file: dict[Path, list[str]] = {}
        for name in entries:
            by_file.setdefault(self._sources[name][0], []).append(name)
        values = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    stored = handle.get_tensor(self._sources[name][1])
                    if tuple(stored.shape) != tuple(entries[name].shape):
                        raise ValueError(
                            f"model: {name} has shape {tuple(stored.shape)} in {file.name}, "
                            f"the config implies {tuple(entries[name].shape)}"
                        )
                    values[name] = stored.to(entries[name].dtype)  # as from_pretrained casts
        return {name: values[name] for name in entries}

    def _folder(self) -> Path:
        if self._work_dir is not None:
            self._work_dir.mkdir(parents=True, exist_ok=True)
            return self._work_dir
        if self._scratch is None:
            if self._scratch_root is not None:
                self._scratch_root.mkdir(parents=True, exist_ok=True)
            self._scratch = tempfile.TemporaryDirectory(
                prefix="fedspallm-layers-", dir=self._scratch_root
            )
        return Path(self._scratch.name)

    def _outer_state(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder layers, tied copies dropped as HF drops them."""
        layers_prefix = self.family.layers_prefix
        outer = {
            name: tensor
            for name, tensor in self.model.state_dict().items()
            if not name.startswith(layers_prefix)
        }
        kept: dict[int, str] = {}
        for name in sorted(outer, key=lambda n: (n not in self._outer_keys, n)):
            storage = outer[name].untyped_storage().data_ptr()
            if storage in kept:  # tied to a tensor kept already (the checkpoint's own key)
                del outer[name]
            else:
                kept[storage] = name
        return outer
