"""Tests for fedspallm_strategy.payload: bit-exact round trips, size, strict rejection."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest
import safetensors.torch
import torch

from fedspallm_strategy.wire.payload import decode, encode
from fedspallm_strategy.wire.payload_spec import validate_layer
from fedspallm_strategy.wire.safetensors_reader import PayloadError

Q_PROJ = "model.layers.3.self_attn.q_proj.weight"
DOWN_PROJ = "model.layers.3.mlp.down_proj.weight"
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _layer(dtype: torch.dtype = torch.float16, seed: int = 0, sparsity: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    shapes = {Q_PROJ: (16, 24), DOWN_PROJ: (24, 13)}  # 13 columns: d not divisible by 8
    masks = {
        name: torch.rand(shape, generator=generator) >= sparsity for name, shape in shapes.items()
    }
    # where(), not multiplication: -x * 0 is -0.0, but pruned positions decode as +0.0.
    tensors = {
        name: torch.where(masks[name], torch.randn(shape, generator=generator).to(dtype), 0)
        for name, shape in shapes.items()
    }
    return tensors, masks


def _rewrite_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """Apply ``edit`` to the parsed safetensors header and re-serialise it."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + length :]


def _edit_matrices(data: bytes, edit: Callable[[dict], None]) -> bytes:
    def apply(header: dict) -> None:
        matrices = json.loads(header["__metadata__"]["matrices"])
        edit(matrices)
        header["__metadata__"]["matrices"] = json.dumps(matrices)

    return _rewrite_header(data, apply)


def _metadata(matrices: dict, values: bool = True) -> dict[str, str]:
    return {
        "format": "fedspallm-masked-layers",
        "version": "1",
        "values": "true" if values else "false",
        "matrices": json.dumps(matrices),
    }


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    tensors, masks = _layer(dtype)
    tensors[Q_PROJ][0, 0] = -0.0 if masks[Q_PROJ][0, 0] else 0.0  # sign of zero survives too
    decoded, decoded_masks = decode(encode(tensors, masks))
    assert list(decoded) == list(tensors) and list(decoded_masks) == list(masks)
    for name in tensors:
        assert decoded[name].dtype == dtype and decoded_masks[name].dtype == torch.bool
        assert torch.equal(decoded_masks[name], masks[name])
        int_dtype = INT_VIEW[dtype]
        assert torch.equal(decoded[name].view(int_dtype), tensors[name].view(int_dtype))


def test_pruned_positions_decode_as_zero_whatever_was_sent() -> None:
    tensors, masks = _layer(torch.float32)
    dense = {name: tensor + 7.0 for name, tensor in tensors.items()}  # nonzero where pruned
    decoded, _ = decode(encode(dense, masks))
    for name in tensors:
        assert torch.equal(decoded[name][~masks[name]], torch.zeros(int((~masks[name]).sum())))
        assert torch.equal(decoded[name][masks[name]], dense[name][masks[name]])


def test_mask_only_payload() -> None:
    _, masks = _layer()
    data = encode(None, masks)
    decoded, decoded_masks = decode(data)
    assert decoded == {}
    assert all(torch.equal(decoded_masks[name], masks[name]) for name in masks)
    dense_fp16_bytes = sum(mask.numel() * 2 for mask in masks.values())
    assert len(data) <= dense_fp16_bytes / 16 + 800


def test_edge_masks_all_kept_and_all_pruned() -> None:
    masks = {"a": torch.ones(3, 5, dtype=torch.bool), "b": torch.zeros(9, dtype=torch.bool)}
    tensors = {"a": torch.arange(15.0).reshape(3, 5), "b": torch.zeros(9)}
    decoded, decoded_masks = decode(encode(tensors, masks))
    assert torch.equal(decoded["a"], tensors["a"]) and torch.equal(decoded["b"], tensors["b"])
    assert torch.equal(decoded_masks["b"], masks["b"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_size_bound(dtype: torch.dtype, sparsity: float) -> None:
    tensors, masks = _layer(dtype, sparsity=sparsity)
    data = encode(tensors, masks)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    bound = 256 + sum(
        int(masks[name].sum()) * itemsize + math.ceil(masks[name].numel() / 8) + 3 * len(name) + 256
        for name in masks
    )
    assert len(data) <= bound


def test_large_matrix_ratio_matches_design() -> None:
    # DESIGN §2: 0.56x dense fp16 at s = 0.5.
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(512, 1024, generator=generator) >= 0.5
    weight = torch.randn(512, 1024, generator=generator).half()
    ratio = len(encode({"w": weight}, {"w": mask})) / (weight.numel() * 2)
    assert 0.55 < ratio < 0.57


def test_encode_rejects_bad_input() -> None:
    tensors, masks = _layer()
    with pytest.raises(ValueError, match="name different"):
        encode({Q_PROJ: tensors[Q_PROJ]}, masks)
    with pytest.raises(ValueError, match="bool"):
        encode(None, {"w": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="dtype"):
        encode({"w": torch.ones(2, dtype=torch.float64)}, {"w": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        encode({"w": torch.ones(3)}, {"w": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="finite"):
        encode({"w": torch.tensor([float("inf")])}, {"w": torch.ones(1, dtype=torch.bool)})


# --------------------------------------------------------------------------- malformed


def test_max_bytes_checked_before_parsing() -> None:
    data = encode(*_layer())
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decode(data, max_bytes=len(data) - 1)
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decode(b"\x00" * 100, max_bytes=10)  # rejected on length, not on content
    decode(data, max_bytes=len(data))


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 20, 200, -1, -100])
def test_truncated(cut: int) -> None:
    data = encode(*_layer())
    with pytest.raises(PayloadError):
        decode(data[:cut])


def test_random_bytes_and_wrong_type() -> None:
    generator = random.Random(0)
    for length in (0, 5, 8, 64, 4096):
        with pytest.raises(PayloadError):
            decode(bytes(generator.randrange(256) for _ in range(length)))
    with pytest.raises(PayloadError, match="bytes"):
        decode("not bytes")  # type: ignore[arg-type]


def test_header_offsets_that_lie() -> None:
    data = encode(*_layer())

    def shift_offsets(header: dict) -> None:
        start, end = header["values/" + Q_PROJ]["data_offsets"]
        header["values/" + Q_PROJ]["data_offsets"] = [start, end + 2]

    with pytest.raises(PayloadError, match="safetensors"):
        decode(_rewrite_header(data, shift_offsets))

    def lie_about_shape(header: dict) -> None:
        header["values/" + Q_PROJ]["shape"] = [header["values/" + Q_PROJ]["shape"][0] + 1]

    with pytest.raises(PayloadError, match="safetensors"):
        decode(_rewrite_header(data, lie_about_shape))

    with pytest.raises(PayloadError, match="exceeds"):
        decode((10**6).to_bytes(8, "little") + data[8:])


def test_metadata_shape_not_matching_mask() -> None:
    data = encode(*_layer())
    with pytest.raises(PayloadError, match=f"{DOWN_PROJ}: packed mask"):
        decode(_edit_matrices(data, lambda m: m[DOWN_PROJ].update(shape=[24, 14])))
    for bad_shape in ([24, -13], [24, 0], [], "24x13", [24, True], [24.0, 13]):
        with pytest.raises(PayloadError, match="shape"):
            decode(_edit_matrices(data, lambda m, s=bad_shape: m[DOWN_PROJ].update(shape=s)))


def test_missing_and_extra_tensors() -> None:
    tensors, masks = _layer()
    data = encode(tensors, masks)
    extra_matrix = {Q_PROJ: {"shape": [16, 24], "dtype": "float16"}, "ghost": {"shape": [2]}}
    with pytest.raises(PayloadError, match="lacks"):
        decode(_edit_matrices(data, lambda m: m.update(ghost={"shape": [2], "dtype": "float16"})))
    with pytest.raises(PayloadError, match="unexpected tensors"):
        decode(_edit_matrices(data, lambda m: m.pop(DOWN_PROJ)))
    with pytest.raises(PayloadError, match="metadata keys"):
        decode(_edit_matrices(data, lambda m: m.update(extra_matrix)))
    # A values-less payload whose metadata claims values.
    with pytest.raises(PayloadError, match="lacks"):
        decode(_rewrite_header(encode(None, masks), _claim_values))


def _claim_values(header: dict) -> None:
    header["__metadata__"]["values"] = "true"
    matrices = json.loads(header["__metadata__"]["matrices"])
    for entry in matrices.values():
        entry["dtype"] = "float16"
    header["__metadata__"]["matrices"] = json.dumps(matrices)


def _save(tensors: dict[str, torch.Tensor], matrices: dict, values: bool = True) -> bytes:
    return safetensors.torch.save(tensors, metadata=_metadata(matrices, values))


def test_value_count_mismatch_and_padding_bits() -> None:
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)  # 6 kept, 10 entries
    packed = torch.tensor([0b10110010, 0b11000000], dtype=torch.uint8)
    spec = {"w": {"shape": [10], "dtype": "float32"}}
    good = _save({"mask/w": packed, "values/w": torch.arange(6.0)}, spec)
    assert torch.equal(decode(good)[1]["w"], mask)
    with pytest.raises(PayloadError, match="w: 5 values but the mask keeps 6"):
        decode(_save({"mask/w": packed, "values/w": torch.arange(5.0)}, spec))
    padded = torch.tensor([0b10110010, 0b11000001], dtype=torch.uint8)
    with pytest.raises(PayloadError, match="w: padding bits"):
        decode(_save({"mask/w": padded, "values/w": torch.arange(6.0)}, spec))
    with pytest.raises(PayloadError, match="packed mask must be 1-D uint8"):
        decode(_save({"mask/w": packed.to(torch.int8), "values/w": torch.arange(6.0)}, spec))


def test_value_dtypes_and_finiteness() -> None:
    packed = torch.tensor([0b11000000], dtype=torch.uint8)
    with pytest.raises(PayloadError, match="w: value dtype 'int32' is not int8 or a float"):
        decode(
            _save(
                {"mask/w": packed, "values/w": torch.tensor([1, 2], dtype=torch.int32)},
                {"w": {"shape": [2], "dtype": "int32"}},
            )
        )
    with pytest.raises(PayloadError, match="values must be 1-D torch.float16"):
        decode(
            _save(
                {"mask/w": packed, "values/w": torch.tensor([1.0, 2.0])},
                {"w": {"shape": [2], "dtype": "float16"}},
            )
        )
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(PayloadError, match="w: values are not all finite"):
            decode(
                _save(
                    {"mask/w": packed, "values/w": torch.tensor([1.0, bad])},
                    {"w": {"shape": [2], "dtype": "float32"}},
                )
            )


def test_unexpected_tensor_names() -> None:
    packed = torch.tensor([0b11000000], dtype=torch.uint8)
    tensors = {"mask/w": packed, "values/w": torch.ones(2), "evil": torch.ones(1)}
    with pytest.raises(PayloadError, match="unexpected tensors: \\['evil'\\]"):
        decode(_save(tensors, {"w": {"shape": [2], "dtype": "float32"}}))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.pop("__metadata__"), "no __metadata__"),
        (lambda h: h["__metadata__"].update(format="other"), "unsupported payload format"),
        (lambda h: h["__metadata__"].update(version="2"), "unsupported payload format"),
        (lambda h: h["__metadata__"].update(values="maybe"), "'values'"),
        (lambda h: h["__metadata__"].update(matrices="{not json"), "not valid JSON"),
        (lambda h: h["__metadata__"].update(matrices="[]"), "JSON object"),
        (lambda h: h["__metadata__"].pop("matrices"), "metadata keys"),
        (lambda h: h["__metadata__"].update(extra="x"), "metadata keys"),
        (lambda h: h["__metadata__"].update(version=1), "must be strings"),
    ],
)
def test_bad_metadata(edit: Callable[[dict], None], message: str) -> None:
    data = encode(*_layer())
    with pytest.raises(PayloadError, match=message):
        decode(_rewrite_header(data, edit))


def test_bad_header_json_and_duplicate_keys() -> None:
    data = encode(*_layer())
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length]
    broken = data[:8] + b"[" + header[1:] + data[8 + length :]
    with pytest.raises(PayloadError, match="JSON"):
        decode(broken)
    duplicated = header.replace(b'"version":"1"', b'"version":"1","version":"1"', 1)
    assert duplicated != header
    duplicated_data = len(duplicated).to_bytes(8, "little") + duplicated + data[8 + length :]
    with pytest.raises(PayloadError, match="duplicate key"):
        decode(duplicated_data)


# --------------------------------------------------------------------------- validate_layer


def test_validate_layer() -> None:
    tensors, masks = _layer()
    expected = {name: tuple(mask.shape) for name, mask in masks.items()}
    validate_layer(*decode(encode(tensors, masks)), expected, require_values=True)
    validate_layer(*decode(encode(None, masks)), expected, require_values=False)
    with pytest.raises(PayloadError, match="lacks values"):
        validate_layer(*decode(encode(None, masks)), expected, require_values=True)
    with pytest.raises(PayloadError, match=f"lacks masks for matrices \\['{Q_PROJ}'\\]"):
        validate_layer({}, {DOWN_PROJ: masks[DOWN_PROJ]}, expected, require_values=False)
    with pytest.raises(PayloadError, match="unexpected matrices \\['extra'\\]"):
        validate_layer({}, {**masks, "extra": masks[Q_PROJ]}, expected, require_values=False)
    with pytest.raises(PayloadError, match="shape"):
        validate_layer({}, masks, {**expected, Q_PROJ: (24, 16)}, require_values=False)
    with pytest.raises(PayloadError, match="values shape"):
        bad_values = {**tensors, Q_PROJ: tensors[Q_PROJ].T}
        validate_layer(bad_values, masks, expected, require_values=True)


# --------------------------------------------------------------------------- fuzz


def _mutate(data: bytes, generator: random.Random) -> bytes:
    kind = generator.randrange(5)
    header_end = 8 + int.from_bytes(data[:8], "little")
    if kind == 0:  # truncate
        return data[: generator.randrange(len(data))]
    if kind == 1:  # flip bytes anywhere
        mutable = bytearray(data)
        for _ in range(generator.randint(1, 6)):
            mutable[generator.randrange(len(mutable))] ^= 1 << generator.randrange(8)
        return bytes(mutable)
    if kind == 2:  # random bytes
        return bytes(generator.randrange(256) for _ in range(generator.randrange(64)))
    if kind == 3:  # change a digit in the header: shapes, offsets, lengths
        digits = [i for i in range(8, header_end) if chr(data[i]).isdigit()]
        position = generator.choice(digits)
        return data[:position] + str(generator.randrange(10)).encode() + data[position + 1 :]
    # rewrite the length prefix
    new_length = max(0, header_end - 8 + generator.randint(-16, 16))
    return new_length.to_bytes(8, "little") + data[8:]


def _check_consistent(data: bytes, tensors: dict, masks: dict) -> None:
    length = int.from_bytes(data[:8], "little")
    matrices = json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["matrices"])
    assert list(masks) == list(matrices)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and list(mask.shape) == matrices[name]["shape"]
        if tensors:
            assert tensors[name].shape == mask.shape
            assert not tensors[name][~mask].any()
            assert torch.isfinite(tensors[name]).all()


def test_fuzz_raises_only_payload_error() -> None:
    generator = random.Random(1234)
    bases = [
        encode(*_layer(torch.float16, seed=1)),
        encode(*_layer(torch.bfloat16, seed=2)),
        encode(*_layer(torch.float32, seed=3)),
        encode(None, _layer(seed=4)[1]),
    ]
    outcomes = {"rejected": 0, "accepted": 0}
    for _ in range(300):
        data = _mutate(generator.choice(bases), generator)
        try:
            tensors, masks = decode(data)
        except PayloadError:
            outcomes["rejected"] += 1
            continue
        outcomes["accepted"] += 1
        _check_consistent(data, tensors, masks)
    # Both branches must be exercised, or the loop tests less than it claims.
    assert outcomes["rejected"] > 100 and outcomes["accepted"] > 5, outcomes


def test_unexpected_errors_become_payload_error_but_signals_pass(monkeypatch) -> None:
    data = encode(*_layer())

    def explode(error: BaseException):
        def raise_it(*args, **kwargs):
            raise error

        return raise_it

    monkeypatch.setattr("numpy.unpackbits", explode(TypeError("boom")))
    with pytest.raises(PayloadError, match="TypeError: boom"):
        decode(data)
    monkeypatch.setattr("numpy.unpackbits", explode(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        decode(data)
