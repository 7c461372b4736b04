"""The weights of a Hugging Face model folder, written as ``save_pretrained`` writes them, but
one tensor at a time.

``PreTrainedModel.save_pretrained`` splits the state dict into shards of at most
``max_shard_size`` bytes with huggingface_hub's ``split_state_dict_into_shards_factory`` (in
order of name, digits compared as numbers, as transformers 5 sorts a model loaded with
``from_pretrained``; a tensor larger than the limit gets a shard of its own), names them
``model-00001-of-0000N.safetensors`` with a ``model.safetensors.index.json`` (one shard: a plain
``model.safetensors``, no index). :func:`write_weights` makes the same split, with the same
function, from each tensor's shape and dtype alone, then streams every shard to disk: the
safetensors header first (it needs only shapes and dtypes), then each tensor's bytes as
``fetch`` hands it over. So a caller whose tensors live on disk (a lazy model's decoder layers)
holds one layer at a time, whatever the shard size: the default, 50GB, makes one file of most
models.

The bytes equal ``safetensors.torch.save_file``'s for a shard of one dtype (tensors ordered by
name, the header padded to 8 bytes); with mixed dtypes the order differs (larger elements
first, then by name), which keeps every tensor aligned and the file as valid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory

try:  # the order transformers 5's save_pretrained splits in (its revert_weight_conversion)
    from transformers.core_model_loading import dot_natural_key
except ImportError:  # transformers 4 split in state-dict order
    dot_natural_key = None

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FILENAME_PATTERN = "model{suffix}.safetensors"  # as save_pretrained: model-00001-of-00003
# PreTrainedModel.save_pretrained's default in transformers 5 (4.x had "5GB").
DEFAULT_MAX_SHARD_SIZE = "50GB"
_METADATA = {"format": "pt"}
# torch dtype -> safetensors' name for it.
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s values (a meta tensor's too): what it takes in a shard."""
    return tensor.numel() * tensor.element_size()


def write_weights(
    folder: Path,
    specs: Mapping[str, torch.Tensor],
    fetch: Callable[[str], torch.Tensor],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    total_parameters: int,
) -> list[str]:
    """Write the safetensors files (and, sharded, the index) of a model into ``folder``.

    ``specs``: tensor name -> a tensor of its shape and dtype (meta is fine), tied copies
    already dropped; split in the order ``save_pretrained`` splits them. ``fetch(name)``
    returns the values, on any device; it is called once per tensor, shard after shard, in
    each file's order. Files of an earlier save (``model*.safetensors``, the index) are removed
    first. Returns the file names written.
    """
    folder = Path(folder)
    ordered = dict(specs)
    if dot_natural_key is not None:
        ordered = dict(sorted(ordered.items(), key=lambda item: dot_natural_key(item[0])))
    split = split_state_dict_into_shards_factory(
        ordered,
        get_storage_size=nbytes,
        filename_pattern=FILENAME_PATTERN,
        max_shard_size=max_shard_size,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a stale model.safetensors would win over the index
    for file, names in split.filename_to_tensors.items():
        write_safetensors(folder / file, {name: specs[name] for name in names}, fetch)
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        # As save_pretrained writes it.
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (folder / INDEX_FILE).write_text(text, encoding="utf-8")
    return list(split.filename_to_tensors)


def write_safetensors(
    path: Path, specs: Mapping[str, torch.Tensor], fetch: Callable[[str], torch.Tensor]
) -> None:
    """One safetensors file, streamed: the header from ``specs`` (shapes and dtypes), then each
    tensor's bytes from ``fetch``, one at a time; written to ``<path>.partial``, then renamed."""
    order = sorted(specs, key=lambda name: (-specs[name].element_size(), name))
    header: dict[str, object] = {"__metadata__": _METADATA}
    offset = 0
    for name in order:
        spec = specs[name]
        if spec.dtype not in _DTYPE_NAMES:
            raise ValueError(f"save: {name} has dtype {spec.dtype}, which this writer lacks")
        size = nbytes(spec)
        entry = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape)}
        header[name] = {**entry, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data 8-byte aligned, as safetensors pads
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name in order:
            spec, value = specs[name], fetch(name)
            if value.dtype != spec.dtype or tuple(value.shape) != tuple(spec.shape):
                raise ValueError(
                    f"save: {name} is {value.dtype} {tuple(value.shape)}, the header says "
                    f"{spec.dtype} {tuple(spec.shape)}"
                )
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            handle.write(flat.view(torch.uint8).numpy().data)  # little-endian, as safetensors
            del flat, value
    os.replace(partial, path)
