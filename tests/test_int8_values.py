"""int8 kept values (``payload-dtype`` int8, the default): codes and per-row scales computed by
hand, the round-trip error bound, the payload's exact size, and every hostile variant refused
with a PayloadError that names the matrix."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import safetensors.torch
import torch

from client_app.task import encode_pruned, to_wire
from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.config.run_config import PAYLOAD_DTYPES
from fedspallm_strategy.merge.packed_masks import PackedMasks
from fedspallm_strategy.strategies.memory_plan import layer_bytes
from fedspallm_strategy.strategies.reply_specs import matrix_specs
from fedspallm_strategy.wire.int8_values import dequantize_rows, quantize_rows, row_counts
from fedspallm_strategy.wire.payload import decode, encode
from fedspallm_strategy.wire.payload_spec import MatrixSpec, payload_limit
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from fedspallm_strategy.wire.values_payload import (
    Expected,
    decode_values,
    encode_values,
    values_limit,
)
from llm_pruning.families import prunable_weights
from llm_pruning.models import load_model
from llm_pruning.pruners import SparsityPattern, get_pruner

NAME = "model.layers.0.mlp.up_proj.weight"  # a name each refusal must give
STEP = 2.0**-7  # row 0's scale: its largest |value| is 127 steps, exactly
# A 3 x 4 matrix: row 0 keeps 3, row 1 keeps 3, row 2 keeps nothing.
MASK = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
DENSE = torch.tensor(
    [
        [127 * STEP, -0.5, 0.0, 0.001],  # 0.001 is 0.128 steps: code 1, not 0
        [-2.0, 0.0, 0.7, 0.0],  # an exact 0 kept (a dead input) stays 0
        [0.0, 0.0, 0.0, 0.0],
    ]
)
CODES = [127, -64, 1, -127, 0, 44]  # 0.7 / (2 / 127) = 44.45
SCALES = [STEP, 2.0 / 127, 0.0]


def _random_layer(seed: int = 0, shape=(16, 24), sparsity: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.02
    _, mask = get_pruner("magnitude").prune(weight, None, SparsityPattern(sparsity))
    return torch.where(mask, weight, 0.0), mask


# --------------------------------------------------------------------------- the quantiser


def test_codes_and_scales_by_hand() -> None:
    counts = row_counts(MASK)
    assert counts.tolist() == [3, 3, 0]
    codes, scales = quantize_rows(DENSE[MASK], counts)
    assert codes.dtype == torch.int8 and codes.tolist() == CODES
    assert scales.dtype == torch.float32
    assert torch.equal(scales, torch.tensor(SCALES))  # float32: 2 / 127 rounded once
    values = dequantize_rows(NAME, codes, scales, counts)
    steps = torch.tensor(SCALES).repeat_interleave(counts)
    expected = torch.tensor(CODES, dtype=torch.float32) * steps
    assert expected[:3].tolist() == [127 * STEP, -64 * STEP, STEP]  # exact: STEP is 2^-7
    assert values.dtype == torch.float32 and torch.equal(values, expected)


def test_each_value_is_within_half_a_step_and_a_kept_value_never_decodes_to_zero() -> None:
    weight, mask = _random_layer(shape=(64, 96))
    weight[3, mask[3]] *= 1e-4  # one row of tiny values: its own scale, not the matrix's
    kept = weight[mask]
    kept[5] = 1e-30  # far under half a step of its row
    counts = row_counts(mask)
    codes, scales = quantize_rows(kept, counts)
    decoded = dequantize_rows(NAME, codes, scales, counts)
    step = scales.repeat_interleave(counts)
    error = (decoded - kept).abs()
    rounded = kept.abs() >= step / 2
    assert bool((error[rounded] <= step[rounded] / 2 * (1 + 1e-6)).all())
    # Under half a step a nonzero value goes as +-1 code: off by under a step, same sign.
    assert bool((error[~rounded] <= step[~rounded]).all())
    assert torch.equal(decoded != 0, kept != 0) and torch.equal(decoded.sign(), kept.sign())
    assert decoded[5].item() == step[5].item() > 0
    assert int(codes.abs().max()) == 127  # every row's largest goes as 127 exactly


def test_a_row_of_zeros_has_scale_one_and_an_empty_row_scale_zero() -> None:
    counts = torch.tensor([2, 0, 1])
    codes, scales = quantize_rows(torch.tensor([0.0, 0.0, -3.0]), counts)
    assert codes.tolist() == [0, 0, -127]
    assert torch.equal(scales, torch.tensor([1.0, 0.0, 3.0 / 127]))


def test_the_quantiser_refuses_values_that_do_not_fit_the_rows() -> None:
    with pytest.raises(ValueError, match="3 values for rows keeping 2"):
        quantize_rows(torch.ones(3), torch.tensor([1, 1]))


# --------------------------------------------------------------------------- payload codec


def test_a_payload_round_trip_decodes_to_float32_values_of_the_codes() -> None:
    data = encode({NAME: DENSE}, {NAME: MASK}, int8=True)
    codes, scales = quantize_rows(DENSE[MASK], row_counts(MASK))
    values = dequantize_rows(NAME, codes, scales, row_counts(MASK))
    for tensors, masks in (decode(data), decode(data, expected=SPEC)):  # SPEC: 6 of 12 kept
        assert torch.equal(masks[NAME], MASK) and tensors[NAME].dtype == torch.float32
        assert torch.equal(tensors[NAME], torch.zeros(3, 4).masked_scatter_(MASK, values))


def test_the_payload_size_is_kept_bytes_scales_mask_and_header() -> None:
    weight, mask = _random_layer(shape=(16, 24))
    data = encode({"w": weight}, {"w": mask}, int8=True)
    header = int.from_bytes(data[:8], "little")
    kept, rows, mask_bytes = int(mask.sum()), 16, math.ceil(16 * 24 / 8)
    assert len(data) == 8 + header + kept + 4 * rows + mask_bytes
    spec = MatrixSpec((16, 24), SparsityPattern(0.5), torch.int8)
    assert spec.nbytes == kept + 4 * rows + mask_bytes
    assert len(data) <= payload_limit({"w": spec})
    tensors, _ = decode(data, max_bytes=len(data), expected={"w": spec})
    assert tensors["w"].dtype == torch.float32


def test_a_large_matrix_goes_in_under_a_third_of_dense_fp16() -> None:
    weight, mask = _random_layer(shape=(512, 1024))
    ratio = len(encode({"w": weight}, {"w": mask}, int8=True)) / (weight.numel() * 2)
    assert 0.31 < ratio < 0.32  # (1/2 + 1/8 + 4/1024) / 2


def _save_payload(tensors: dict, shape: list[int], dtype: str = "int8") -> bytes:
    matrices = {NAME: {"shape": shape, "dtype": dtype}}
    metadata = {
        "format": "fedspallm-masked-layers",
        "version": "1",
        "values": "true",
        "matrices": json.dumps(matrices),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def _parts(codes=None, scales=None) -> dict[str, torch.Tensor]:
    """MASK's payload tensors, with codes or scales replaced."""
    good_codes, good_scales = quantize_rows(DENSE[MASK], row_counts(MASK))
    packed = torch.from_numpy(np.packbits(MASK.reshape(-1).numpy()))
    return {
        "mask/" + NAME: packed,
        "values/" + NAME: good_codes if codes is None else codes,
        "scales/" + NAME: good_scales if scales is None else scales,
    }


CODES_8 = torch.tensor(CODES, dtype=torch.int8)
HOSTILE = [
    ({"codes": torch.tensor([-128, -64, 1, -127, 0, 44], dtype=torch.int8)}, "code -128"),
    ({"scales": torch.tensor([STEP, -0.1, 0.0])}, "scale that is not positive"),
    ({"scales": torch.tensor([0.0, 0.1, 0.0])}, "scale that is not positive"),
    ({"scales": torch.tensor([STEP, math.nan, 0.0])}, "scales are not all finite"),
    ({"scales": torch.tensor([math.inf, 0.1, 0.0])}, "scales are not all finite"),
    ({"scales": torch.tensor([STEP, 0.1, 1.0])}, "keeps nothing has a scale other than 0"),
    ({"scales": torch.tensor([3e38, 0.1, 0.0])}, "dequantised values are not all finite"),
    ({"scales": torch.tensor([STEP, 0.1, 0.0, 0.0])}, "the matrix has 3 rows"),
    ({"scales": torch.tensor([STEP, 0.1, 0.0], dtype=torch.float16)}, "scales are"),
    ({"codes": CODES_8[:5]}, "the mask keeps 6"),
    ({"codes": CODES_8.to(torch.int16)}, "codes are"),
]
SPEC = {NAME: MatrixSpec((3, 4), SparsityPattern(0.5), torch.int8)}


@pytest.mark.parametrize(("change", "message"), HOSTILE)
def test_a_hostile_int8_payload_is_refused_naming_the_matrix(change: dict, message: str) -> None:
    data = _save_payload(_parts(**change), [3, 4])
    with pytest.raises(PayloadError, match=f"^{NAME}: .*{message}"):
        decode(data)
    # The server's view: a tensor of another layout is refused before any tensor is read.
    with pytest.raises(PayloadError, match=f"{NAME}: "):
        decode(data, expected=SPEC)


def test_int8_tensors_must_be_exactly_those_declared() -> None:
    parts = _parts()
    scales_key = "scales/" + NAME
    with pytest.raises(PayloadError, match=f"lacks tensors .*{scales_key}"):
        decode(_save_payload({k: v for k, v in parts.items() if k != scales_key}, [3, 4]))
    floats = {**parts, "values/" + NAME: DENSE[MASK]}
    with pytest.raises(PayloadError, match=f"unexpected tensors.*{scales_key}"):
        decode(_save_payload(floats, [3, 4], dtype="float32"))
    with pytest.raises(PayloadError, match=f"{NAME}: codes are 1-D torch.float32"):
        decode(_save_payload(floats, [3, 4]))
    with pytest.raises(PayloadError, match=f"{NAME}: declared .*float16, expected .*int8"):
        decode(encode({NAME: DENSE.half()}, {NAME: MASK}), expected=SPEC)
    float_spec = {NAME: MatrixSpec((3, 4), SparsityPattern(0.5), torch.float16)}
    with pytest.raises(PayloadError, match=f"{NAME}: declared .*int8, expected .*float16"):
        decode(encode({NAME: DENSE}, {NAME: MASK}, int8=True), expected=float_spec)
    with pytest.raises(PayloadError, match=f"{NAME}: value dtype 'uint8' is not int8 or a float"):
        decode(_save_payload(parts, [3, 4], dtype="uint8"))


def test_fuzzed_int8_payloads_raise_only_payload_error() -> None:
    weight, mask = _random_layer(seed=3, shape=(8, 16))
    base = encode({NAME: weight}, {NAME: mask}, int8=True)
    start = 8 + int.from_bytes(base[:8], "little")  # the tensors: mask, codes, scales
    generator = random.Random(7)
    outcomes = {"rejected": 0, "accepted": 0}
    for _ in range(200):
        data = bytearray(base)
        for _ in range(generator.randint(1, 2)):
            data[generator.randrange(start, len(data))] ^= 1 << generator.randrange(8)
        try:
            tensors, masks = decode(bytes(data))
        except PayloadError:
            outcomes["rejected"] += 1
            continue
        outcomes["accepted"] += 1  # a flipped code or scale bit: still a valid payload
        kept = tensors[NAME][masks[NAME]]
        assert torch.isfinite(kept).all() and not tensors[NAME][~masks[NAME]].any()
    assert outcomes["rejected"] > 20 and outcomes["accepted"] > 20, outcomes


# --------------------------------------------------------------------------- values codec


def _expected() -> dict[str, Expected]:
    return {NAME: Expected(6, None, row_counts(MASK))}


def test_resolved_values_round_trip_against_the_masks_row_counts() -> None:
    data = encode_values({NAME: DENSE[MASK]}, int8_masks={NAME: MASK})
    values, weights = decode_values(data, _expected(), max_bytes=values_limit(_expected()))
    codes, scales = quantize_rows(DENSE[MASK], row_counts(MASK))
    assert weights == {} and values[NAME].dtype == torch.float32
    assert torch.equal(values[NAME], dequantize_rows(NAME, codes, scales, row_counts(MASK)))
    header = int.from_bytes(data[:8], "little")
    assert len(data) == 8 + header + 6 + 4 * 3  # six codes, three scales
    # A matrix whose values stay home (count 0, column weights only) still goes as float.
    norms = torch.arange(1.0, 5.0)
    both = encode_values(
        {NAME: DENSE[MASK], "p": torch.zeros(0)}, {"p": norms}, int8_masks={NAME: MASK}
    )
    values, weights = decode_values(both, {**_expected(), "p": Expected(0, 4)})
    assert values["p"].numel() == 0 and torch.equal(weights["p"], norms)
    assert torch.equal(values[NAME], dequantize_rows(NAME, codes, scales, row_counts(MASK)))


def _save_values(tensors: dict, entry: dict) -> bytes:
    metadata = {
        "format": "fedspallm-resolved-values",
        "version": "1",
        "matrices": json.dumps({NAME: entry}),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


@pytest.mark.parametrize(("change", "message"), HOSTILE)
def test_a_hostile_int8_reply_is_refused_naming_the_matrix(change: dict, message: str) -> None:
    parts = _parts(**change)
    codes, scales = parts["values/" + NAME], parts["scales/" + NAME]
    data = _save_values({"values/" + NAME: codes, "scales/" + NAME: scales}, ENTRY)
    sent = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
    if sent == 6 + 4 * 3:  # the size the mask implies: read, and refused naming the matrix
        with pytest.raises(PayloadError, match=f"^{NAME}: .*{message}"):
            decode_values(data, _expected())
    else:  # refused unread, on the total size
        with pytest.raises(PayloadError, match=f"carries {sent} bytes .* imply 18"):
            decode_values(data, _expected())


ENTRY = {"count": 6, "dtype": "int8", "rows": 3}


def test_a_reply_must_be_int8_exactly_when_the_run_sends_int8() -> None:
    floats = encode_values({NAME: DENSE[MASK]})
    with pytest.raises(PayloadError, match=f"{NAME}: metadata entry must hold exactly"):
        decode_values(floats, _expected())  # no rows declared
    int8 = encode_values({NAME: DENSE[MASK]}, int8_masks={NAME: MASK})
    with pytest.raises(PayloadError, match=f"{NAME}: metadata entry must hold exactly"):
        decode_values(int8, {NAME: Expected(6)})  # rows the server did not ask for
    parts = _parts()
    sent = {key: parts[key] for key in ("values/" + NAME, "scales/" + NAME)}
    for entry, message in (
        ({**ENTRY, "dtype": "float16"}, "this run sends int8 values"),
        ({**ENTRY, "rows": 4}, "'int8' values of 4 rows"),
        ({**ENTRY, "count": 5}, "5 values, but the mask sent keeps 6"),
    ):
        with pytest.raises(PayloadError, match=f"{NAME}: .*{message}"):
            decode_values(_save_values(sent, entry), _expected())
    # The size check counts the codes and scales exactly: one byte more is refused unread.
    padded = {**sent, "values/" + NAME: torch.tensor([*CODES, 0], dtype=torch.int8)}
    with pytest.raises(PayloadError, match="the masks sent imply 18"):
        decode_values(_save_values(padded, ENTRY), _expected())
    assert values_limit(_expected()) >= len(int8)


# --------------------------------------------------------------------------- the run's wire


def test_int8_is_the_default_wire_and_makes_each_member_score_its_own_model() -> None:
    assert "int8" in PAYLOAD_DTYPES
    for config in (RunConfig(), RunConfig(payload_dtype="int8")):
        assert config.int8_wire and config.wire_dtype(torch.bfloat16) == torch.int8
        assert config.sends_pruned_values and config.clients_score_standalone
    assert RunConfig(resolve=False).clients_score_standalone  # one-shot: its values went int8
    assert not RunConfig(payload_dtype="float16").clients_score_standalone
    assert not RunConfig(pruner="wanda").clients_score_standalone  # mask only: the dense values
    assert not RunConfig(standalone_eval=False).clients_score_standalone


def test_the_server_expects_int8_replies_and_plans_their_decoded_bytes() -> None:
    model = load_model("tiny-llama")[0]
    config = RunConfig(model="tiny-llama")
    specs = matrix_specs(model, [0], config)
    assert {spec.dtype for spec in specs.values()} == {torch.int8}
    weights = dict(prunable_weights(model, 0))
    masks = {}
    for name, linear in weights.items():
        _, masks[name] = get_pruner("magnitude").prune(
            linear.weight.data, None, config.sparsity_pattern
        )
    weight = linear.weight.data
    assert to_wire(weight, torch.int8) is weight  # as it is: the encoder quantises it
    data = encode_pruned(model, masks, config)
    tensors, _ = decode(data, expected=specs)
    for name, linear in weights.items():
        kept = linear.weight.data[masks[name]]
        step = quantize_rows(kept, row_counts(masks[name]))[1].repeat_interleave(
            row_counts(masks[name])
        )
        assert bool(((tensors[name][masks[name]] - kept).abs() <= step / 2 * 1.000001).all())
    # Decoded values are float32, 4 bytes a value as float32 on the wire, and one reply's
    # codes a byte each while it is decoded: the re-solve round (lean: the larger) counts both.
    lean = {"model": "tiny-llama", "lean_uplink": True}
    float32 = layer_bytes(model, 0, RunConfig(**lean, payload_dtype="float32"), clients=2)
    kept = sum(math.ceil(m.numel() / 2) for m in masks.values())
    assert layer_bytes(model, 0, RunConfig(**lean), clients=2) == float32 + kept


def test_packed_masks_keep_each_rows_count() -> None:
    masks = PackedMasks()
    masks[NAME] = MASK
    assert masks.row_counts(NAME).tolist() == [3, 3, 0] and masks.kept(NAME) == 6
