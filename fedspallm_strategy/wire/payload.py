"""Safetensors codec for pruned layers, with strict validation (DESIGN §2, §3).

A payload carries, for each pruned matrix ``name``:

- ``mask/<name>``: the keep-mask, flattened row-major and bit-packed (``numpy.packbits``,
  most significant bit first, padding bits 0) as uint8 of ``ceil(d / 8)`` bytes;
- ``values/<name>``: the kept values ``tensor[mask]``, 1-D, in the native dtype
  (float32, float16 or bfloat16, so the round trip is bit-exact), or as int8 codes with
  ``scales/<name>``, one float32 per row (``int8_values.py``; decoded to float32) -- absent
  in a mask-only payload, sent by pruners that do not update weights (the server already
  holds the dense values).

``__metadata__`` (str -> str) holds ``format``, ``version``, ``values`` ("true" or
"false") and ``matrices``: JSON mapping each name to its ``shape`` and, with values, its
``dtype``. The size is ``kept * itemsize + ceil(d / 8)`` (int8: ``kept + 4 * rows +
ceil(d / 8)``) plus a JSON header entry per tensor: 0.5625x dense fp16 at 50 % sparsity in
float16, 0.31x in int8, 1/16 for a mask-only payload.

Payloads come from other organisations, so :func:`decode` trusts nothing: every
malformation raises :class:`PayloadError` naming the problem, and parsing uses
``safetensors`` only (no pickle). Given what the assignment implies (:class:`MatrixSpec`:
shape, pattern, value dtype), it also refuses a payload whose size, metadata or tensor
layout disagrees *before* any tensor is materialised, and then one whose masks do not prune
exactly the count the pattern demands.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from fedspallm_strategy.wire.int8_values import NAME as INT8_NAME
from fedspallm_strategy.wire.int8_values import (
    SCALES_PREFIX,
    dequantize_rows,
    quantize_rows,
    row_counts,
)
from fedspallm_strategy.wire.payload_spec import MatrixSpec, payload_limit
from fedspallm_strategy.wire.safetensors_reader import (
    DTYPE_NAMES,
    DTYPES,
    PayloadError,
    check_names,
    parse_guarded,
    read_header,
    unique_keys,
)
from llm_pruning.pruners.masks import nm_group_counts

logger = logging.getLogger(__name__)

FORMAT = "fedspallm-masked-layers"
VERSION = "1"
MASK_PREFIX = "mask/"
VALUES_PREFIX = "values/"

_METADATA_KEYS = {"format", "version", "values", "matrices"}
_WIRE_DTYPES = {**DTYPES, INT8_NAME: torch.int8}  # a value dtype's name in metadata
_SAFETENSORS_CODES = {torch.uint8: "U8", torch.float32: "F32", torch.float16: "F16"}
_SAFETENSORS_CODES |= {torch.bfloat16: "BF16", torch.int8: "I8"}
_CODE_SIZES = {"U8": 1, "F32": 4, "F16": 2, "BF16": 2, "I8": 1}


# --------------------------------------------------------------------------- encode


def _values_of(name: str, tensor: Tensor, mask: Tensor) -> Tensor:
    if tensor.shape != mask.shape:
        raise ValueError(f"{name}: tensor shape {tuple(tensor.shape)} != mask {tuple(mask.shape)}")
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"{name}: dtype {tensor.dtype} is not float32, float16 or bfloat16")
    values = tensor.detach()[mask.to(tensor.device)].cpu().contiguous()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name}: kept values are not all finite")
    return values


def encode(
    tensors: Mapping[str, Tensor] | None, masks: Mapping[str, Tensor], *, int8: bool = False
) -> bytes:
    """Serialise pruned matrices as a safetensors payload.

    Parameters
    ----------
    tensors
        Name -> pruned matrix, or None for a mask-only payload.
    masks
        Name -> bool keep-mask (True = kept); the same names as ``tensors``.
    int8
        Send the kept values as int8 codes and a float32 scale per row
        (``int8_values.quantize_rows``), not in their own dtype.

    Returns
    -------
    bytes
        The payload (see the module docstring for the layout).

    Raises
    ------
    ValueError
        On mismatched names or shapes, a non-bool or empty mask, an unsupported dtype
        or non-finite kept values.
    """
    if tensors is not None and set(tensors) != set(masks):
        raise ValueError(f"tensors and masks name different matrices: {set(tensors) ^ set(masks)}")
    entries: dict[str, Tensor] = {}
    matrices: dict[str, dict[str, object]] = {}
    for name, mask in masks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"matrix names must be non-empty strings, got {name!r}")
        if mask.dtype != torch.bool or mask.numel() == 0:
            raise ValueError(f"{name}: mask must be a non-empty bool tensor")
        packed = np.packbits(mask.detach().reshape(-1).cpu().numpy())
        entries[MASK_PREFIX + name] = torch.from_numpy(packed)
        matrices[name] = {"shape": list(mask.shape)}
        if tensors is not None:
            values = _values_of(name, tensors[name], mask)
            if int8:
                codes, scales = quantize_rows(values, row_counts(mask))
                entries[VALUES_PREFIX + name], entries[SCALES_PREFIX + name] = codes, scales
            else:
                entries[VALUES_PREFIX + name] = values
            matrices[name]["dtype"] = INT8_NAME if int8 else DTYPE_NAMES[values.dtype]
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "values": "true" if tensors is not None else "false",
        "matrices": json.dumps(matrices),
    }
    return safetensors.torch.save(entries, metadata=metadata)


# --------------------------------------------------------------------------- decode


def _parse_shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, list) or not shape:
        raise PayloadError(f"{name}: shape in metadata must be a non-empty list, got {shape!r}")
    if not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in shape):
        raise PayloadError(f"{name}: shape in metadata must hold positive integers, got {shape!r}")
    return tuple(shape)


def _parse_matrices(metadata: Mapping[str, str]) -> tuple[bool, dict[str, tuple]]:
    """Return ``(has_values, {name: (shape, dtype or None)})`` from checked metadata."""
    if set(metadata) != _METADATA_KEYS:
        raise PayloadError(f"metadata keys {sorted(metadata)} != {sorted(_METADATA_KEYS)}")
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise PayloadError(
            f"unsupported payload format {metadata.get('format')!r} "
            f"version {metadata.get('version')!r} (expected {FORMAT!r} {VERSION!r})"
        )
    if metadata.get("values") not in ("true", "false"):
        raise PayloadError(
            f"metadata 'values' must be 'true' or 'false': {metadata.get('values')!r}"
        )
    has_values = metadata["values"] == "true"
    try:
        matrices = json.loads(metadata.get("matrices", ""), object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError(f"metadata 'matrices' is not valid JSON: {exc}") from exc
    if not isinstance(matrices, dict):
        raise PayloadError("metadata 'matrices' must be a JSON object")
    specs: dict[str, tuple] = {}
    for name, entry in matrices.items():
        if not name or not isinstance(entry, dict):
            raise PayloadError(f"metadata entry for matrix {name!r} is malformed")
        expected_keys = {"shape", "dtype"} if has_values else {"shape"}
        if set(entry) != expected_keys:
            raise PayloadError(f"{name}: metadata keys {sorted(entry)} != {sorted(expected_keys)}")
        dtype = None
        if has_values:
            dtype = _WIRE_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
            if dtype is None:
                raise PayloadError(
                    f"{name}: value dtype {entry['dtype']!r} is not int8 or a float dtype"
                )
        specs[name] = (_parse_shape(name, entry["shape"]), dtype)
    return has_values, specs


def _load_tensors(data: bytes, specs: Mapping[str, tuple], has_values: bool) -> dict[str, Tensor]:
    try:
        loaded = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError and friends: offsets or shapes that lie
        raise PayloadError(f"invalid safetensors data: {exc}") from exc
    expected = {MASK_PREFIX + name for name in specs}
    if has_values:
        expected |= {VALUES_PREFIX + name for name in specs}
        expected |= {SCALES_PREFIX + n for n, (_, dtype) in specs.items() if dtype == torch.int8}
    if missing := sorted(expected - set(loaded)):
        raise PayloadError(f"payload lacks tensors listed in its metadata: {missing}")
    if unexpected := sorted(set(loaded) - expected):
        raise PayloadError(f"payload holds unexpected tensors: {unexpected}")
    return loaded


def _unpack_mask(name: str, packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise PayloadError(f"{name}: packed mask must be 1-D uint8, got {packed.dtype}")
    needed = (numel + 7) // 8
    if packed.numel() != needed:
        raise PayloadError(
            f"{name}: packed mask has {packed.numel()} bytes, {shape} needs {needed}"
        )
    bits = np.unpackbits(packed.numpy())
    if bits[numel:].any():
        raise PayloadError(f"{name}: padding bits beyond the {numel} mask entries are not 0")
    return torch.from_numpy(bits[:numel].view(np.bool_)).reshape(shape)


def _dense_from(
    name: str, loaded: Mapping[str, Tensor], mask: Tensor, dtype: torch.dtype
) -> Tensor:
    """The dense matrix: the kept values at the mask's entries, zeros elsewhere (an int8
    payload's dequantised, in float32)."""
    values = loaded[VALUES_PREFIX + name]
    if dtype == torch.int8:
        scales = loaded[SCALES_PREFIX + name]
        values, dtype = dequantize_rows(name, values, scales, row_counts(mask)), torch.float32
    if values.dtype != dtype or values.dim() != 1:
        raise PayloadError(
            f"{name}: values must be 1-D {dtype}, got {values.dim()}-D {values.dtype}"
        )
    kept = int(mask.sum())
    if values.numel() != kept:
        raise PayloadError(f"{name}: {values.numel()} values but the mask keeps {kept} entries")
    if not bool(torch.isfinite(values).all()):
        raise PayloadError(f"{name}: values are not all finite")
    return torch.zeros(mask.shape, dtype=dtype).masked_scatter_(mask, values)


def _check_declared(
    has_values: bool, specs: Mapping[str, tuple], expected: Mapping[str, MatrixSpec]
) -> None:
    """The metadata against the assignment: names, shapes, and values iff the pruner sends
    them."""
    want_values = any(spec.dtype is not None for spec in expected.values())
    if not expected:  # a node with no layer in this round's group: an empty payload either way
        want_values = has_values
    if has_values and not want_values:
        raise PayloadError("payload carries values, but this run's pruner keeps the dense ones")
    if want_values and not has_values:
        raise PayloadError("payload is mask-only, but this run's pruner updates the weights")
    check_names("matrices", specs, expected)
    for name, (shape, dtype) in specs.items():
        spec = expected[name]
        if shape != tuple(spec.shape) or dtype != spec.dtype:
            raise PayloadError(
                f"{name}: declared {shape} {dtype}, expected {tuple(spec.shape)} {spec.dtype}"
            )


def _check_layout(
    header: Mapping, header_len: int, size: int, expected: Mapping[str, MatrixSpec]
) -> None:
    """Every tensor entry of the safetensors header is the dtype and shape the assignment
    implies, and the entries tile the data exactly: checked before safetensors reads it."""
    layout = {}
    for name, spec in expected.items():
        layout[MASK_PREFIX + name] = ("U8", [spec.mask_bytes])
        if spec.dtype is not None:
            layout[VALUES_PREFIX + name] = (_SAFETENSORS_CODES[spec.dtype], [spec.kept])
        if spec.dtype == torch.int8:
            layout[SCALES_PREFIX + name] = ("F32", [spec.rows])
    entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
    if set(entries) != set(layout):
        differ = sorted(set(entries) ^ set(layout))
        raise PayloadError(f"header tensors differ from the assignment's in {differ[:4]}")
    spans = []
    for key, (code, shape) in layout.items():
        entry = entries[key]
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise PayloadError(f"{key}: malformed header entry")
        if entry["dtype"] != code or entry["shape"] != shape:
            raise PayloadError(
                f"{key}: header says {entry['dtype']} {entry['shape']}, expected {code} {shape}"
            )
        offsets = entry["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_index, offsets)):
            raise PayloadError(f"{key}: malformed data_offsets {offsets!r}")
        width = math.prod(shape) * _CODE_SIZES[code]
        if offsets[1] - offsets[0] != width:
            raise PayloadError(f"{key}: data_offsets {offsets} do not span {width} bytes")
        spans.append(tuple(offsets))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise PayloadError("header data_offsets overlap or leave gaps")
        position = end
    if position != size - 8 - header_len:
        raise PayloadError(
            f"tensor data is {size - 8 - header_len} bytes, the assignment implies {position}"
        )


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_pattern(name: str, mask: Tensor, spec: MatrixSpec) -> None:
    """The mask prunes exactly what the pattern demands: the exact count, and for N:M, N kept
    in every group of M consecutive inputs of a row."""
    kept = int(mask.sum())
    if kept != spec.kept:
        raise PayloadError(
            f"{name}: mask keeps {kept} of {spec.numel} entries; {spec.pattern} keeps {spec.kept}"
        )
    if spec.pattern.is_nm:
        if bool((nm_group_counts(mask, spec.pattern.m) != spec.pattern.n).any()):
            raise PayloadError(f"{name}: mask breaks the {spec.pattern} pattern")


def _decode_unchecked(
    data: bytes, max_bytes: int | None, expected: Mapping[str, MatrixSpec] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    if expected is not None:
        limit = payload_limit(expected)
        max_bytes = limit if max_bytes is None else min(max_bytes, limit)
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    data = bytes(data)
    header_len, header = read_header(data)
    has_values, specs = _parse_matrices(header["__metadata__"])
    if expected is not None:
        _check_declared(has_values, specs, expected)
        _check_layout(header, header_len, len(data), expected)
    loaded = _load_tensors(data, specs, has_values)
    tensors: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for name, (shape, dtype) in specs.items():
        masks[name] = _unpack_mask(name, loaded[MASK_PREFIX + name], shape)
        if expected is not None:
            _check_pattern(name, masks[name], expected[name])
        if has_values:
            tensors[name] = _dense_from(name, loaded, masks[name], dtype)
    return tensors, masks


def decode(
    data: bytes,
    *,
    max_bytes: int | None = None,
    expected: Mapping[str, MatrixSpec] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Parse and validate a payload made by :func:`encode`.

    Parameters
    ----------
    data
        The payload bytes.
    max_bytes
        Reject payloads longer than this before parsing anything.
    expected
        Name -> :class:`MatrixSpec` of every matrix the payload must hold, and nothing else
        (the server's view of a reply). Its size limit, metadata and tensor layout are then
        checked before any tensor is read, and every mask's count and pattern after.

    Returns
    -------
    tuple[dict[str, Tensor], dict[str, Tensor]]
        ``(tensors, masks)``: dense-shaped matrices with zeros at pruned positions, in the
        values' dtype (float32 for int8 codes; ``{}`` for a mask-only payload) and bool
        keep-masks of the original shapes.

    Raises
    ------
    PayloadError
        For anything malformed; no other exception escapes from parsing (except
        ``MemoryError`` and non-``Exception`` signals such as ``KeyboardInterrupt``).
    """
    return parse_guarded(lambda: _decode_unchecked(data, max_bytes, expected), "payload")


# --------------------------------------------------------------------------- validate
