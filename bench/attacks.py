"""The replies a hostile organisation sends, built from an honest one.

Used by the CI fuzz (``tests/test_hostile.py``) and by ``bench/poisoning.py``: lying Flower
Arrays, broken bytes, and well-formed payloads that lie about what they are (the attacks of
issue 15). Payloads are forged with safetensors directly, so they can hold what
``payload.encode`` refuses to write (NaN, inf, wrong dtypes).
"""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedspallm_strategy.wire.protocol import PAYLOAD_KEY
from llm_pruning.families import prunable_weights

LAYERS = [0, 1, 2, 3]


def reply(node: int, content: RecordDict, message_id: str | None = None) -> Message:
    request = Message(RecordDict(), message_type="train", dst_node_id=node, group_id="1")
    request.metadata.__dict__["_message_id"] = message_id or f"m{node}-{random.random()}"
    return Message(content, reply_to=request)


def payload_content(data: bytes) -> RecordDict:
    array = Array(np.frombuffer(data, dtype=np.uint8))
    return RecordDict({PAYLOAD_KEY: ArrayRecord({PAYLOAD_KEY: array}), "metrics": MetricRecord()})


def matrices(model, layers=None):
    """Name -> weight of every prunable matrix of ``layers`` (default: all of tiny-llama's)."""
    return {
        n: lin.weight
        for layer in (LAYERS if layers is None else layers)
        for n, lin in prunable_weights(model, layer).items()
    }


def split(data: bytes) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A payload's metadata, kept values and masks, read with safetensors and numpy only."""
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = header["__metadata__"]
    shapes = {n: tuple(e["shape"]) for n, e in json.loads(metadata["matrices"]).items()}
    loaded = safetensors.torch.load(data)
    masks, values = {}, {}
    for name, shape in shapes.items():
        bits = np.unpackbits(loaded[f"mask/{name}"].numpy())[: math.prod(shape)]
        masks[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
        if f"values/{name}" in loaded:
            values[name] = loaded[f"values/{name}"]
    return metadata, values, masks


def forge(values: dict[str, torch.Tensor] | None, masks: dict[str, torch.Tensor]) -> bytes:
    """A payload in the wire format with whatever values (NaN, inf, any dtype) it is given."""
    entries, described = {}, {}
    for name, mask in masks.items():
        entries[f"mask/{name}"] = torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))
        described[name] = {"shape": list(mask.shape)}
        if values is not None:
            entries[f"values/{name}"] = values[name].contiguous()
            described[name]["dtype"] = str(values[name].dtype).removeprefix("torch.")
    metadata = {
        "format": "fedspallm-masked-layers",
        "version": "1",
        "values": "true" if values is not None else "false",
        "matrices": json.dumps(described),
    }
    return safetensors.torch.save(entries, metadata=metadata)


def semantic_attacks(data: bytes, model, nm: bool) -> dict[str, bytes]:
    """Well-formed payloads that lie about what they are: the attacks of issue 15."""
    _, values, masks = split(data)
    parameters = dict(model.named_parameters())
    weights = {n: parameters[n].detach() for n in masks}
    first = next(iter(masks))
    attacks = {}
    if values:
        attacks["x1000"] = forge({n: v * 1000 for n, v in values.items()}, masks)
        attacks["1e30"] = forge({n: v * 1e30 for n, v in values.items()}, masks)
        generator = torch.Generator().manual_seed(0)
        attacks["random"] = forge(
            {n: torch.randn(v.shape, generator=generator) * v.std() for n, v in values.items()},
            masks,
        )
        largest = {}
        for name, weight in weights.items():
            keep = torch.zeros(weight.numel(), dtype=torch.bool)
            keep[weight.abs().reshape(-1).argsort(descending=True)[: int(masks[name].sum())]] = True
            largest[name] = keep.reshape(weight.shape)
        if not nm:
            attacks["sign-flip-largest"] = forge(
                {n: -weights[n][largest[n]] for n in masks}, largest
            )
        flipped = {n: v.clone() for n, v in values.items()}
        raw = flipped[first].view(torch.int32)
        raw[0] ^= 1 << 30  # one exponent bit of one kept value
        attacks["exponent-bit"] = forge(flipped, masks)
        nan = {n: v.clone() for n, v in values.items()}
        nan[first][3] = float("nan")
        attacks["nan"] = forge(nan, masks)
        attacks["float16-values"] = forge({n: v.half() for n, v in values.items()}, masks)
        attacks["mask-only"] = forge(None, masks)
    else:
        attacks["values-in-mask-only-run"] = forge(
            {n: weights[n][m] for n, m in masks.items()}, masks
        )
    keep_all = {n: torch.ones_like(m) for n, m in masks.items()}
    keep_none = {n: torch.zeros_like(m) for n, m in masks.items()}
    attacks["keep-all"] = forge(
        {n: weights[n].reshape(-1) for n in masks} if values else None, keep_all
    )
    attacks["keep-none"] = forge(
        {n: torch.zeros(0, dtype=v.dtype) for n, v in values.items()} if values else None,
        keep_none,
    )
    one_more = {n: m.clone() for n, m in masks.items()}
    position = int((~one_more[first]).reshape(-1).nonzero()[0])
    one_more[first].view(-1)[position] = True
    attacks["one-more-kept"] = forge(
        {n: weights[n][one_more[n]] for n in masks} if values else None, one_more
    )
    if nm:  # same count per row, but 4 kept in one group and 0 in the next
        broken = {n: m.clone() for n, m in masks.items()}
        broken[first][0, :8] = torch.tensor([True] * 4 + [False] * 4)
        attacks["breaks-2:4"] = forge(
            {n: weights[n][broken[n]] for n in masks} if values else None, broken
        )
    return attacks


# ------------------------------------------------------------------- lying records
def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def lying_records(data: bytes) -> dict[str, RecordDict]:
    """Reply contents whose Flower records or Arrays lie (the crash of issue 15)."""

    def with_array(array: Array, extra: dict | None = None) -> RecordDict:
        return RecordDict({PAYLOAD_KEY: ArrayRecord({PAYLOAD_KEY: array, **(extra or {})})})

    n = len(data)
    huge = npy(np.zeros(4, dtype=np.uint8)).replace(b"(4,)", b"(1099511627776,)")
    return {
        "not-npy": with_array(Array("uint8", (n,), "numpy.ndarray", data)),
        "empty-data": with_array(Array("uint8", (n,), "numpy.ndarray", b"")),
        "torch-stype": with_array(
            Array("uint8", (n,), "torch.Tensor", npy(np.frombuffer(data, np.uint8)))
        ),
        "pickled-object": with_array(
            Array("uint8", (3,), "numpy.ndarray", npy(np.array([{"a": 1}, 2, "x"], dtype=object)))
        ),
        "claims-2**40": with_array(Array("uint8", (2**40,), "numpy.ndarray", huge)),
        "header-2**40": with_array(Array("uint8", (4,), "numpy.ndarray", huge)),
        "float32-declared": with_array(
            Array(np.frombuffer(data[: n // 4 * 4], dtype=np.float32).copy())
        ),
        "2-d": with_array(Array(np.frombuffer(data[: n // 2 * 2], np.uint8).reshape(2, -1).copy())),
        "shape-lies": with_array(
            Array("uint8", (n - 1,), "numpy.ndarray", npy(np.frombuffer(data, np.uint8)))
        ),
        "extra-array": with_array(
            Array(np.frombuffer(data, np.uint8)), {"other": Array(np.zeros(2))}
        ),
        "no-payload": RecordDict({"metrics": MetricRecord({"x": 1})}),
        "trailing-bytes": with_array(
            Array("uint8", (n,), "numpy.ndarray", npy(np.frombuffer(data, np.uint8)) + b"junk")
        ),
    }


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["truncate", "flip", "random", "splice", "header", "extend"])
    raw = bytearray(data)
    if kind == "truncate":
        return bytes(raw[: rng.randrange(len(raw))])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)
    if kind == "random":
        return rng.randbytes(rng.randint(0, 256))
    if kind == "splice":
        cut = rng.randrange(len(raw))
        return bytes(raw[:cut] + rng.randbytes(rng.randint(1, 64)) + raw[cut:])
    if kind == "extend":
        return bytes(raw) + rng.randbytes(rng.randint(1, 4096))
    header_end = 8 + int.from_bytes(raw[:8], "little")
    position = rng.randrange(8, min(header_end, len(raw)))
    raw[position] = rng.choice(b'{}[]":,0123456789abcdef')
    return bytes(raw)
