"""The one way the server reads a reply: nothing in it is trusted (DESIGN §7).

Flower has already turned a reply into records and ``Array`` objects when a strategy sees
it, but an Array's ``dtype``, ``shape`` and ``stype`` are whatever the sender wrote, and
``Array.numpy()`` hands its bytes to ``np.load``: bytes that are no ``.npy``, a pickled
object array or a header that claims 2⁴⁰ elements make it raise (or allocate) outside any
handler, and one such reply used to end the whole run. Here the ``.npy`` header is parsed
with numpy's own safe reader, compared with what the Array declares and with the size the
server expects, and only then are the bytes taken, without a copy through ``np.load``.

Every failure is a :class:`RejectedReply` naming the problem; the strategy logs it, records
it in the report and goes on with the other replies.
"""

from __future__ import annotations

import io
import math
from collections.abc import Container

import numpy as np
from flwr.app import Array, Message

MAX_REASON = 300  # characters of a client's error text kept in the log and the report


class RejectedReply(Exception):
    """A reply the server will not aggregate; the reason goes to the log and the report."""


def screen(reply: Message, node: int, asked: Container[int], answered: Container[int]) -> None:
    """What every strategy refuses before it reads a byte: an error reply, a reply from a
    node not asked this round, a second reply from one node."""
    if reply.has_error():
        raise RejectedReply(f"client error: {str(reply.error.reason)[:MAX_REASON]}")
    if node not in asked:
        raise RejectedReply("reply from a node that was not asked this round")
    if node in answered:
        raise RejectedReply("duplicate reply")


def reply_bytes(reply: Message, key: str, *, max_bytes: int) -> bytes:
    """The bytes a reply carries under ``key``: exactly one 1-D uint8 array in that record,
    of at most ``max_bytes`` (checked on the declared shape, before anything is read)."""
    try:
        return _reply_bytes(reply, key, max_bytes)
    except RejectedReply:
        raise
    except Exception as error:  # an object that is not what Flower would have built
        raise RejectedReply(f"{key}: unreadable record: {type(error).__name__}: {error}") from error


def _reply_bytes(reply: Message, key: str, max_bytes: int) -> bytes:
    records = reply.content.array_records
    if key not in records:
        raise RejectedReply(f"reply has no '{key}' ArrayRecord")
    arrays = records[key]
    if list(arrays.keys()) != [key]:
        raise RejectedReply(f"{key} record must hold exactly one array '{key}'")
    array = arrays[key]
    if not isinstance(array, Array):
        raise RejectedReply(f"{key} is a {type(array).__name__}, not a Flower Array")
    declared = (array.stype, array.dtype, list(array.shape))
    if declared[:2] != ("numpy.ndarray", "uint8") or len(declared[2]) != 1:
        raise RejectedReply(f"{key} must be a 1-D uint8 numpy array, got {declared}")
    (length,) = declared[2]
    if not isinstance(length, int) or not 0 <= length <= max_bytes:
        raise RejectedReply(f"{key} declares {length!r} bytes; this reply may hold {max_bytes}")
    return npy_bytes(array.data, length, what=key)


def npy_bytes(data: object, length: int, *, what: str) -> bytes:
    """The payload of ``data``, a ``.npy`` serialisation of a 1-D uint8 array of ``length``.

    Uses numpy's header reader (a literal parser with a size cap, no pickle) and checks the
    header against ``length`` and the real size before slicing.
    """
    if not isinstance(data, bytes):
        raise RejectedReply(f"{what}: array data is {type(data).__name__}, not bytes")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        reader = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran_order, dtype = reader(stream)
    except Exception as error:  # numpy raises ValueError, SyntaxError, EOFError, ...
        raise RejectedReply(f"{what}: not a valid .npy array: {error}") from error
    if dtype != np.dtype(np.uint8) or fortran_order or shape != (length,):
        raise RejectedReply(
            f"{what}: .npy header says {dtype} {shape}{' fortran' if fortran_order else ''}, "
            f"the array declares uint8 ({length},)"
        )
    offset = stream.tell()
    if len(data) - offset != length:
        raise RejectedReply(f"{what}: {len(data) - offset} data bytes for {length} declared")
    return data[offset:]


def reply_metrics(reply: Message) -> dict[str, int | float]:
    """The client's metrics, for the report only: finite scalars under string keys (anything
    else a client puts there is dropped, never trusted)."""
    record = reply.content.metric_records.get("metrics")
    if record is None:
        return {}
    return {
        str(key)[:100]: value
        for key, value in dict(record).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
