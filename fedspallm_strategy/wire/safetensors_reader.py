"""Strict reading of a safetensors buffer from another organisation, shared by every codec.

The header is parsed here, not by ``safetensors`` (which drops ``__metadata__`` and accepts
duplicate keys); any failure of a parser is a :class:`PayloadError` naming the problem, never
a crash. The codecs (``payload.py``, ``stats_payload.py``, ``values_payload.py``) build on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Room for the JSON header beyond the tensor data: a fixed part plus a generous share per
# matrix (its names appear three times, with shapes and offsets).
HEADER_ALLOWANCE = 4096
HEADER_ALLOWANCE_PER_MATRIX = 1024

T = TypeVar("T")


class PayloadError(ValueError):
    """A payload is malformed, inconsistent, too large, or not what the server expects."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON object hook that rejects duplicate keys (parsers disagree on which wins)."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise PayloadError(f"duplicate key {key!r} in payload header")
        result[key] = value
    return result


def read_metadata(data: bytes) -> dict[str, str]:
    """Parse the safetensors header ourselves: ``safetensors.torch.load`` drops metadata."""
    return read_header(data)[1]["__metadata__"]


def read_header(data: bytes) -> tuple[int, dict]:
    """``(header length, header)`` of a safetensors buffer, ``__metadata__`` checked to be
    a str -> str object."""
    if len(data) < 8:
        raise PayloadError(f"payload of {len(data)} bytes is too short for a safetensors header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise PayloadError(f"header length {header_len} exceeds the {len(data)}-byte payload")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError(f"payload header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise PayloadError("payload header is not a JSON object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise PayloadError("payload has no __metadata__")
    if not all(isinstance(value, str) for value in metadata.values()):
        raise PayloadError("__metadata__ values must be strings")
    return header_len, header


def parse_guarded(parse: Callable[[], T], what: str) -> T:
    """Call ``parse``, turning any failure into :class:`PayloadError` ("malformed <what>: ...")."""
    try:
        return parse()
    except (PayloadError, MemoryError):
        raise
    except Exception as exc:
        raise PayloadError(f"malformed {what}: {type(exc).__name__}: {exc}") from exc
    except BaseException as exc:
        # A Rust panic inside safetensors surfaces as pyo3's PanicException, which derives
        # from BaseException; it is still a malformed payload, not a signal.
        if type(exc).__name__ == "PanicException":
            raise PayloadError(f"malformed {what}: safetensors panicked: {exc}") from exc
        raise


def check_names(what: str, found: Mapping, expected: Mapping) -> None:
    """``found`` names exactly the ``expected`` matrices: none missing, none extra."""
    if missing := sorted(set(expected) - set(found)):
        raise PayloadError(f"payload lacks {what} for matrices {missing}")
    if unexpected := sorted(set(found) - set(expected)):
        raise PayloadError(f"payload has {what} for unexpected matrices {unexpected}")
