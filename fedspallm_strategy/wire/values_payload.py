"""Safetensors codec for re-solved values: the kept values under a mask both sides know.

In the masked re-solve round the server has fixed each matrix's global keep-mask and sent it
down; a client re-solves its kept weights under that mask and sends back only the values, so
no mask bits go up. For each matrix ``name`` the payload holds ``values/<name>``: the kept
values ``W[mask]`` (row-major order, 1-D, float32/float16/bfloat16, or int8 codes with
``scales/<name>``, one float32 per row of the mask: ``int8_values.py``). ``__metadata__``
holds ``format``, ``version`` and ``matrices`` (JSON: name -> ``count``, ``dtype``, for int8
``rows`` and, when the server weighs the clients per column, ``columns``: then
``column-weights/<name>`` holds the client's ``diag H``, one float32 per input column).

The server trusts nothing: :func:`decode_values` compares the declared names and counts with
the masks it sent *before* it reads any tensor, and then checks the tensors themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import safetensors.torch
import torch
from torch import Tensor

from fedspallm_strategy.wire.int8_values import NAME as INT8_NAME
from fedspallm_strategy.wire.int8_values import (
    SCALES_PREFIX,
    dequantize_rows,
    nbytes,
    quantize_rows,
    row_counts,
)
from fedspallm_strategy.wire.payload import VALUES_PREFIX
from fedspallm_strategy.wire.safetensors_reader import (
    DTYPE_NAMES,
    DTYPES,
    HEADER_ALLOWANCE,
    HEADER_ALLOWANCE_PER_MATRIX,
    PayloadError,
    parse_guarded,
    read_metadata,
    unique_keys,
)

FORMAT = "fedspallm-resolved-values"
VERSION = "1"
WEIGHTS_PREFIX = "column-weights/"


@dataclass(frozen=True)
class Expected:
    """What the server's mask for one matrix implies a re-solve reply holds."""

    count: int  # kept entries: values sent
    columns: int | None = None  # input columns, when per-column weights are asked for
    # int8 values (payload-dtype int8): the mask's kept entries per row, (rows,) int64; None:
    # values in a float dtype
    row_counts: Tensor | None = field(default=None, compare=False)

    @property
    def rows(self) -> int | None:
        return None if self.row_counts is None else self.row_counts.numel()

    @property
    def value_bytes(self) -> int:
        """The most bytes its values take: int8 codes and scales, else float32."""
        dtype = torch.float32 if self.row_counts is None else torch.int8
        return nbytes(dtype, self.count, self.rows or 0)


def values_limit(expected: Mapping[str, Expected]) -> int:
    """The most bytes a valid re-solve reply for ``expected`` can take (float values at
    float32's width)."""
    data = sum(e.value_bytes + 4 * (e.columns or 0) for e in expected.values())
    return data + 8 + HEADER_ALLOWANCE + HEADER_ALLOWANCE_PER_MATRIX * len(expected)


def encode_values(
    values: Mapping[str, Tensor],
    column_weights: Mapping[str, Tensor] | None = None,
    *,
    int8_masks: Mapping[str, Tensor] | None = None,
) -> bytes:
    """Serialise re-solved kept values (name -> 1-D tensor of ``mask.sum()`` entries).

    ``column_weights`` (name -> ``(in,)`` float32, the client's ``diag H``, for any of the
    names) lets the server weigh each client's value of column j by how much input energy it
    saw there. A matrix may carry no values (count 0) and only its column weights: a pruned
    matrix whose values stayed home, for the server's tie-break. ``int8_masks`` (name -> the
    keep-mask its values were taken under, for any of the names): those go as int8 codes and
    a float32 scale per row of the mask (``int8_values.quantize_rows``).
    """
    entries, matrices = {}, {}
    for name, tensor in values.items():
        if tensor.dim() != 1 or tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: values must be a 1-D float tensor, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}: re-solved values are not all finite")
        matrices[name] = {"count": int(tensor.numel()), "dtype": DTYPE_NAMES[tensor.dtype]}
        if int8_masks is not None and name in int8_masks:
            counts = row_counts(int8_masks[name])
            codes, entries[SCALES_PREFIX + name] = quantize_rows(tensor, counts)
            entries[VALUES_PREFIX + name] = codes
            matrices[name].update(dtype=INT8_NAME, rows=int(counts.numel()))
        else:
            entries[VALUES_PREFIX + name] = tensor.detach().cpu().contiguous()
        if column_weights is not None and name in column_weights:
            weights = column_weights[name].detach().to("cpu", torch.float32).contiguous()
            entries[WEIGHTS_PREFIX + name] = weights
            matrices[name]["columns"] = int(weights.numel())
    metadata = {"format": FORMAT, "version": VERSION, "matrices": json.dumps(matrices)}
    return safetensors.torch.save(entries, metadata=metadata)


def kept_values(tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensor[mask]`` per matrix: what a client sends of a matrix whose mask it was given."""
    return {name: tensors[name][masks[name].to(tensors[name].device)] for name in masks}


def _check_declared(
    metadata: Mapping[str, str], expected: Mapping[str, Expected]
) -> dict[str, torch.dtype]:
    """Name -> wire dtype, once the header says exactly what the server expects."""
    if set(metadata) != {"format", "version", "matrices"}:
        raise PayloadError(f"metadata keys {sorted(metadata)} != ['format', 'matrices', 'version']")
    if metadata["format"] != FORMAT or metadata["version"] != VERSION:
        raise PayloadError(
            f"unsupported values payload {metadata['format']!r} version {metadata['version']!r}"
        )
    try:
        matrices = json.loads(metadata["matrices"], object_pairs_hook=unique_keys)
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
        int8 = expected[name].row_counts is not None
        keys = {"count", "dtype"} | ({"columns"} if expected[name].columns is not None else set())
        keys |= {"rows"} if int8 else set()
        if not isinstance(entry, dict) or set(entry) != keys:
            raise PayloadError(f"{name}: metadata entry must hold exactly {sorted(keys)}")
        if entry["count"] != expected[name].count:
            raise PayloadError(
                f"{name}: {entry['count']!r} values, but the mask sent keeps {expected[name].count}"
            )
        if entry.get("columns") != expected[name].columns:
            raise PayloadError(
                f"{name}: {entry['columns']!r} column weights, the matrix has "
                f"{expected[name].columns} columns"
            )
        if int8:
            if entry["dtype"] != INT8_NAME or entry["rows"] != expected[name].rows:
                raise PayloadError(
                    f"{name}: {entry['dtype']!r} values of {entry['rows']!r} rows, but this run "
                    f"sends int8 values with a scale for each of the mask's {expected[name].rows}"
                )
            dtypes[name] = torch.int8
        elif not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES:
            raise PayloadError(f"{name}: value dtype {entry['dtype']!r} is not a float dtype")
        else:
            dtypes[name] = DTYPES[entry["dtype"]]
    return dtypes


def _decode_unchecked(
    data: bytes, expected: Mapping[str, Expected], max_bytes: int | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError(f"values payload must be bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"values payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    data = bytes(data)
    dtypes = _check_declared(read_metadata(data), expected)
    # The size the declared counts imply, checked before any tensor is materialised.
    needed = sum(
        nbytes(dtype, expected[n].count, expected[n].rows or 0) + 4 * (expected[n].columns or 0)
        for n, dtype in dtypes.items()
    )
    header = 8 + int.from_bytes(data[:8], "little")
    if len(data) - header != needed:
        raise PayloadError(
            f"values payload carries {len(data) - header} bytes of tensors; "
            f"the masks sent imply {needed}"
        )
    loaded = safetensors.torch.load(data)
    declared = {VALUES_PREFIX + name for name in expected}
    declared |= {WEIGHTS_PREFIX + n for n, e in expected.items() if e.columns is not None}
    declared |= {SCALES_PREFIX + n for n, e in expected.items() if e.row_counts is not None}
    if set(loaded) != declared:
        raise PayloadError(f"values payload holds other tensors than declared: {sorted(loaded)}")
    values, weights = {}, {}
    for name, dtype in dtypes.items():
        counts, sent = expected[name].row_counts, loaded[VALUES_PREFIX + name]
        if counts is not None:
            values[name] = dequantize_rows(name, sent, loaded[SCALES_PREFIX + name], counts)
        else:
            values[name] = _checked(name, "values", sent, dtype, expected[name].count)
        if expected[name].columns is not None:
            weights[name] = _checked(
                name,
                "column weights",
                loaded[WEIGHTS_PREFIX + name],
                torch.float32,
                expected[name].columns,
            )
            if bool((weights[name] < 0).any()):
                raise PayloadError(f"{name}: column weights (diag H) must not be negative")
    return values, weights


def _checked(name: str, what: str, tensor: Tensor, dtype: torch.dtype, count: int) -> Tensor:
    if tensor.dim() != 1 or tensor.numel() != count or tensor.dtype != dtype:
        raise PayloadError(
            f"{name}: {what} tensor is {tensor.dim()}-D {tensor.dtype} of {tensor.numel()}, "
            f"declared 1-D {dtype} of {count}"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise PayloadError(f"{name}: {what} are not all finite")
    return tensor


def decode_values(
    data: bytes, expected: Mapping[str, Expected], *, max_bytes: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Parse a re-solve reply against the masks the server sent.

    Parameters
    ----------
    data
        The payload bytes.
    expected
        Name -> what the sent mask implies (kept count, its kept entries per row when values
        travel as int8, and the column count when per-column weights are asked for), for every
        matrix the reply must hold.
    max_bytes
        Reject longer payloads before parsing anything.

    Returns
    -------
    tuple[dict[str, Tensor], dict[str, Tensor]]
        Name -> 1-D kept values in the mask's row-major order (int8 codes dequantised to
        float32); name -> column weights (empty when none were asked for).

    Raises
    ------
    PayloadError
        For anything malformed or not matching the masks sent (names, counts, dtypes, size).
    """
    return parse_guarded(lambda: _decode_unchecked(data, expected, max_bytes), "values payload")
