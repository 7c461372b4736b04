"""Fuzz the server's input path: mutated replies through `aggregate_train`.

Whatever a client sends, the outcome is one of two: the reply is rejected (logged and
recorded) and the layer is aggregated from the others, or the reply is a valid payload and
is aggregated like any other. Nothing else — no exception, no partial update.
"""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from client_app.task import prune_layers
from fedspallm_strategy.config import NodeConfig, RunConfig
from fedspallm_strategy.merge.plausibility import change_bound, relative_change
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from fedspallm_strategy.wire.payload import decode, encode
from fedspallm_strategy.wire.payload_spec import validate_layer
from fedspallm_strategy.wire.protocol import PAYLOAD_KEY
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from llm_pruning.families import prunable_weights
from llm_pruning.models import load_model
from server_app.inprocess import _set_task_identity

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # shared with the bench
from attacks import mutate  # noqa: E402

# float32 values: the mutations and the oracle's bounds are written for the model's dtype.
CONFIG = RunConfig.from_mapping(
    {"model": "tiny-llama", "seqlen": 64, "calib-samples": 2, "payload-dtype": "float32"}
)
LAYERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def payloads():
    return {
        node: prune_layers(
            CONFIG, NodeConfig(partition_id=node - 1, num_partitions=2), LAYERS
        ).payload
        for node in (1, 2)
    }


def _reply(node: int, data: bytes, message_id: str) -> Message:
    request = Message(RecordDict(), message_type="train", dst_node_id=node, group_id="1")
    request.metadata.__dict__["_message_id"] = message_id
    arrays = ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(data, dtype=np.uint8))})
    return Message(RecordDict({PAYLOAD_KEY: arrays}), reply_to=request)


def _aggregate(datas: dict[int, bytes]) -> tuple[MergeStrategy, dict[str, torch.Tensor]]:
    _set_task_identity(1)
    model, _ = load_model(CONFIG.model)
    strategy = MergeStrategy(model, CONFIG)
    strategy.assignments = {node: LAYERS for node in datas}
    replies = [_reply(node, data, f"m{node}") for node, data in datas.items()]
    strategy.aggregate_train(1, replies)
    return strategy, {n: p.detach().clone() for n, p in model.named_parameters()}


def _valid(data: bytes, model) -> bool:
    try:
        tensors, masks = decode(data)
        expected = {
            name: tuple(lin.weight.shape)
            for layer in LAYERS
            for name, lin in prunable_weights(model, layer).items()
        }
        validate_layer(tensors, masks, expected, require_values=True)
    except PayloadError:
        return False
    weights = dict(model.named_parameters())
    bound = change_bound(CONFIG.sparsity_pattern, CONFIG.max_relative_change)
    return all(  # and close enough to the dense weights (plausibility.py)
        relative_change(tensors[n][m], weights[n].data[m]) <= bound for n, m in masks.items()
    )


def test_mutated_replies_are_rejected_or_aggregated(payloads):
    _, only_first = _aggregate({1: payloads[1]})
    rng = random.Random(2024)
    reference_model, _ = load_model(CONFIG.model)
    outcomes = {"rejected": 0, "aggregated": 0}
    for _ in range(40):
        mutated = mutate(payloads[2], rng)
        strategy, merged = _aggregate({1: payloads[1], 2: mutated})
        assert strategy.remaining == []  # node 1 alone still finishes every layer
        if _valid(mutated, reference_model):
            outcomes["aggregated"] += 1
            _, expected = _aggregate({1: payloads[1], 2: mutated})
            assert all(torch.equal(merged[n], expected[n]) for n in merged)
            assert strategy.accounting.rejected == []
        else:
            outcomes["rejected"] += 1
            assert [r["node"] for r in strategy.accounting.rejected] == [2]
            assert all(torch.equal(merged[n], only_first[n]) for n in merged)
    assert outcomes["rejected"] > 20  # the fuzzer does reach the rejection path


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda d, w: d[:-1], id="truncated"),
        pytest.param(lambda d, w: b"\x80\x04\x95" + d, id="pickle-prefix"),
        pytest.param(lambda d, w: _nan_payload(w), id="nan"),
        pytest.param(lambda d, w: _wrong_layers_payload(w), id="unassigned-layer"),
    ],
)
def test_hostile_reply_is_rejected_with_a_reason(payloads, make_bad):
    model, _ = load_model(CONFIG.model)
    bad = make_bad(payloads[2], model)
    strategy, merged = _aggregate({1: payloads[1], 2: bad})
    (rejection,) = strategy.accounting.rejected
    assert rejection["node"] == 2 and rejection["reason"]
    _, only_first = _aggregate({1: payloads[1]})
    assert all(torch.equal(merged[n], only_first[n]) for n in merged)


def test_duplicate_reply_is_rejected(payloads):
    _set_task_identity(1)
    model, _ = load_model(CONFIG.model)
    strategy = MergeStrategy(model, CONFIG)
    strategy.assignments = {1: LAYERS, 2: LAYERS}
    replies = [
        _reply(1, payloads[1], "a"),
        _reply(2, payloads[2], "b"),
        _reply(2, payloads[2], "c"),
    ]
    strategy.aggregate_train(1, replies)
    assert [(r["node"], r["reason"]) for r in strategy.accounting.rejected] == [
        (2, "duplicate reply")
    ]


def test_superlink_error_reply_is_charged_to_the_node_it_answers_for(payloads):
    """A node that stopped heartbeating gets an error reply from the SuperLink itself (its
    src_node_id is the SuperLink's): it is recorded against the node asked, once."""
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID

    _set_task_identity(1)
    model, _ = load_model(CONFIG.model)
    strategy = MergeStrategy(model, CONFIG)
    strategy.assignments = {7: LAYERS, 9: LAYERS}
    strategy.sent = []
    for node in (7, 9):
        request = Message(RecordDict(), message_type="train", dst_node_id=node, group_id="1")
        request.metadata.__dict__["_message_id"] = f"m{node}"  # what the grid does on push
        strategy.sent.append(request)
    error = Error(code=5, reason="Error: Node Unavailable")
    unavailable = Message(error, reply_to=strategy.sent[1])
    unavailable.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # as the SuperLink sends it
    strategy.aggregate_train(1, [_reply(7, payloads[1], "m7"), unavailable])
    assert strategy.accounting.rejected == [
        {
            "round": 1,
            "node": 9,
            "layers": LAYERS,
            "reason": "client error: Error: Node Unavailable",
        }
    ]
    assert strategy.failed_names == {"9"} and strategy.remaining == []


def _all_matrices(model, layers):
    return {
        name: linear.weight.data.clone()
        for layer in layers
        for name, linear in prunable_weights(model, layer).items()
    }


def _nan_payload(model) -> bytes:
    """A well-formed payload whose first kept value is NaN (encode itself refuses NaN)."""
    weights = _all_matrices(model, LAYERS)
    data = encode(weights, {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()})
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    tensors = safetensors.torch.load(data)
    first = sorted(k for k in tensors if k.startswith("values/"))[0]
    tensors[first][0] = float("nan")
    return safetensors.torch.save(tensors, metadata=header["__metadata__"])


def _wrong_layers_payload(model) -> bytes:
    weights = _all_matrices(model, [0])  # layer 0 only, while 0-3 were assigned
    return encode(weights, {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()})
