"""Safetensors codec for re-solved values: the kept values under a mask both sides know.

In the masked re-solve round the server has fixed each matrix's global keep-mask and sent it
down; a client re-solves its kept weights under that mask and sends back only the values, so
no mask bits go up. For each matrix ``name`` the payload holds ``values/<name>``: the kept
values ``W[mask]`` (row-major order, 1-D, float32/float16/bfloat16). ``__metadata__`` holds
``format``, ``version`` and ``matrices`` (JSON: name -> ``count`` and ``dtype``).

The server trusts nothing: :func:`decode_values` compares the declared names and counts with
the masks it sent *before* it reads any tensor, and then checks the tensors themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import safetensors.torch
import torch
from torch import Tensor

from fedspallm_strategy.payload import (
    _DTYPE_NAMES,
    _DTYPES,
    VALUES_PREFIX,
    PayloadError,
    _read_metadata,
    _unique_keys,
    parse_guarded,
)

FORMAT = "fedspallm-resolved-values"
VERSION = "1"


def encode_values(values: Mapping[str, Tensor]) -> bytes:
    """Serialise re-solved kept values (name -> 1-D tensor of ``mask.sum()`` entries)."""
    entries, matrices = {}, {}
    for name, tensor in values.items():
        if tensor.dim() != 1 or tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: values must be a 1-D float tensor, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}: re-solved values are not all finite")
        entries[VALUES_PREFIX + name] = tensor.detach().cpu().contiguous()
        matrices[name] = {"count": int(tensor.numel()), "dtype": _DTYPE_NAMES[tensor.dtype]}
    metadata = {"format": FORMAT, "version": VERSION, "matrices": json.dumps(matrices)}
    return safetensors.torch.save(entries, metadata=metadata)


def kept_values(tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensor[mask]`` per matrix: what a client sends of a matrix whose mask it was given."""
    return {name: tensors[name][masks[name].to(tensors[name].device)] for name in masks}


def _check_declared(metadata: Mapping[str, str], expected: Mapping[str, int]) -> dict[str, str]:
    """Name -> dtype name, once the header says exactly what the server expects."""
    if set(metadata) != {"format", "version", "matrices"}:
        raise PayloadError(f"metadata keys {sorted(metadata)} != ['format', 'matrices', 'version']")
    if metadata["format"] != FORMAT or metadata["version"] != VERSION:
        raise PayloadError(
            f"unsupported values payload {metadata['format']!r} version {metadata['version']!r}"
        )
    try:
        matrices = json.loads(metadata["matrices"], object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError(f"metadata 'matrices' is not valid JSON: {exc}") from exc
    if not isinstance(matrices, dict):
        raise PayloadError("metadata 'matrices' must be a JSON object")
    if missing := sorted(set(expected) - set(matrices)):
        raise PayloadError(f"re-solve reply lacks values for matrices {missing}")
    if unexpected := sorted(set(matrices) - set(expected)):
        raise PayloadError(f"re-solve reply has values for matrices it was not sent: {unexpected}")
    dtypes = {}
    for name, entry in matrices.items():
        if not isinstance(entry, dict) or set(entry) != {"count", "dtype"}:
            raise PayloadError(f"{name}: metadata entry must hold exactly 'count' and 'dtype'")
        if entry["count"] != expected[name]:
            raise PayloadError(
                f"{name}: {entry['count']!r} values, but the mask sent keeps {expected[name]}"
            )
        if entry["dtype"] not in _DTYPES:
            raise PayloadError(f"{name}: value dtype {entry['dtype']!r} is not a float dtype")
        dtypes[name] = entry["dtype"]
    return dtypes


def _decode_unchecked(
    data: bytes, expected: Mapping[str, int], max_bytes: int | None
) -> dict[str, Tensor]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError(f"values payload must be bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"values payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    data = bytes(data)
    dtypes = _check_declared(_read_metadata(data), expected)
    # The size the declared counts imply, checked before any tensor is materialised.
    needed = sum(expected[n] * _DTYPES[d].itemsize for n, d in dtypes.items())
    header = 8 + int.from_bytes(data[:8], "little")
    if len(data) - header != needed:
        raise PayloadError(
            f"values payload carries {len(data) - header} bytes of tensors; "
            f"the masks sent imply {needed}"
        )
    loaded = safetensors.torch.load(data)
    if set(loaded) != {VALUES_PREFIX + name for name in expected}:
        raise PayloadError(f"values payload holds other tensors than declared: {sorted(loaded)}")
    values = {}
    for name, dtype in dtypes.items():
        tensor = loaded[VALUES_PREFIX + name]
        if tensor.dim() != 1 or tensor.numel() != expected[name] or tensor.dtype != _DTYPES[dtype]:
            raise PayloadError(
                f"{name}: values tensor is {tensor.dim()}-D {tensor.dtype} of {tensor.numel()}, "
                f"declared 1-D {dtype} of {expected[name]}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise PayloadError(f"{name}: re-solved values are not all finite")
        values[name] = tensor
    return values


def decode_values(
    data: bytes, expected: Mapping[str, int], *, max_bytes: int | None = None
) -> dict[str, Tensor]:
    """Parse a re-solve reply against the masks the server sent.

    Parameters
    ----------
    data
        The payload bytes.
    expected
        Name -> number of entries the sent mask keeps, for every matrix the reply must hold.
    max_bytes
        Reject longer payloads before parsing anything.

    Returns
    -------
    dict[str, Tensor]
        Name -> 1-D kept values, in the mask's row-major order.

    Raises
    ------
    PayloadError
        For anything malformed or not matching the masks sent (names, counts, dtypes, size).
    """
    return parse_guarded(lambda: _decode_unchecked(data, expected, max_bytes), "values payload")
