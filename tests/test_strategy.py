"""Strategies through an in-process Grid: the real ClientApp and Strategy.start, no Ray."""

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from transformers import AutoModelForCausalLM

from client_app.app import app as client_app
from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.merge.aggregation import l0_aggregate
from fedspallm_strategy.merge.expansion import expand_mask
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from fedspallm_strategy.wire.payload import decode
from fedspallm_strategy.wire.protocol import PAYLOAD_KEY, SPEC_KEY
from llm_pruning.families import prunable_weights
from llm_pruning.models import load_model
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {
    "model": "tiny-llama",
    "seqlen": 64,
    "calib-samples": 4,
    "eval-windows": 2,
    "resolve": False,
    "payload-dtype": "float32",  # the expected merges below are computed in the model's dtype
}


def make_config(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **overrides})


def payload_of(reply: Message) -> bytes:
    return reply.content.array_records[PAYLOAD_KEY][PAYLOAD_KEY].numpy().tobytes()


def with_payload(reply: Message, data: bytes) -> Message:
    """``reply`` with its payload replaced by ``data``."""
    reply.content[PAYLOAD_KEY] = ArrayRecord(
        {PAYLOAD_KEY: Array(np.frombuffer(data, dtype=np.uint8))}
    )
    return reply


class Recorder:
    """Reply filter that keeps every payload and can tamper with chosen nodes' replies."""

    def __init__(self, tamper=None):
        self.payloads: dict[int, bytes] = {}
        self.tamper = tamper or {}

    def __call__(self, node: int, reply: Message):
        if reply.has_error() or reply.metadata.message_type != "train":
            return reply
        self.payloads[node] = payload_of(reply)
        if node in self.tamper:
            return self.tamper[node](reply)
        return reply


def run_strategy(tmp_path, num_nodes=3, node_configs=None, reply_filter=None, **overrides):
    config = make_config(tmp_path, **overrides)
    model, _ = load_model(config.model)
    if node_configs is None:
        grid = InProcessGrid.simulation(client_app, num_nodes, {}, reply_filter=reply_filter)
    else:
        grid = InProcessGrid(client_app, node_configs, {}, reply_filter=reply_filter)
    budgets = {n: c.get("layer-budget") for n, c in grid.contexts.items() for c in [c.node_config]}
    strategy = MergeStrategy(model, config, node_budgets=budgets, rule=config.strategy)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=config.num_rounds)
    return strategy, grid


def expected_fedspallm(payloads, names, sparsity):
    """The global matrices by the pure functions of DESIGN §4, client by client."""
    decoded = [decode(data) for data in payloads]
    expected = {}
    for name in names:
        weights = [tensors[name] for tensors, _ in decoded]
        masks = [masks[name] for _, masks in decoded]
        merged = l0_aggregate(weights, masks)
        votes = sum((~m).int() for m in masks)
        keep = expand_mask(merged, votes, len(masks), sparsity)
        expected[name] = torch.where(keep, merged, torch.zeros(()))
    return expected


def test_global_model_equals_pure_aggregation(tmp_path):
    recorder = Recorder()
    strategy, _ = run_strategy(tmp_path, reply_filter=recorder, sparsity=0.6)
    names = [n for layer in range(4) for n in prunable_weights(strategy.model, layer)]
    expected = expected_fedspallm(recorder.payloads.values(), names, 0.6)
    params = dict(strategy.model.named_parameters())
    for name in names:
        assert torch.equal(params[name].data, expected[name]), name
        assert int((params[name] == 0).sum()) == int(np.ceil(0.6 * params[name].numel() - 1e-9))
    # The clients calibrated on different shards, so their masks differ: the merge did work.
    (_, first), (_, second) = decode(recorder.payloads[1]), decode(recorder.payloads[2])
    assert any(not torch.equal(first[n], second[n]) for n in names)


def test_each_node_prunes_its_budget_and_every_layer_is_covered(tmp_path):
    configs = {
        node: {"partition-id": node - 1, "num-partitions": 3, "layer-budget": budget}
        for node, budget in ((1, 1), (2, 2), (3, 2))
    }
    recorder = Recorder()
    strategy, grid = run_strategy(tmp_path, node_configs=configs, reply_filter=recorder)
    sent = {m.metadata.dst_node_id: m.content.config_records[SPEC_KEY]["layers"] for m in grid.sent}
    assert {node: len(layers) for node, layers in sent.items()} == {1: 1, 2: 2, 3: 2}
    assert set().union(*map(set, sent.values())) == {0, 1, 2, 3}
    for node, layers in sent.items():  # a node uploads exactly its own layers
        _, masks = decode(recorder.payloads[node])
        assert {int(name.split(".")[2]) for name in masks} == set(layers)
    # Train messages carry the spec and layer ids only: no weights go down.
    assert all(not m.content.array_records for m in grid.sent)
    assert not strategy.remaining


def test_malformed_reply_is_rejected_and_the_round_goes_on(tmp_path, caplog):
    # Our loggers hand their lines to Flower's handlers instead of the root logger.
    logging.getLogger("fedspallm_strategy").addHandler(caplog.handler)
    truncate = {2: lambda reply: with_payload(reply, payload_of(reply)[:-100])}
    recorder = Recorder(tamper=truncate)
    strategy, _ = run_strategy(tmp_path, reply_filter=recorder)
    rejected = strategy.accounting.rejected
    assert [(r["node"], r["round"]) for r in rejected] == [(2, 1)]
    assert "the assignment implies" in rejected[0]["reason"]  # caught before safetensors reads it
    assert "rejected reply of node 2" in caplog.text
    # The layers are aggregated from nodes 1 and 3 alone.
    names = [n for layer in range(4) for n in prunable_weights(strategy.model, layer)]
    good = [recorder.payloads[1], recorder.payloads[3]]
    expected = expected_fedspallm(good, names, 0.5)
    params = dict(strategy.model.named_parameters())
    assert all(torch.equal(params[n].data, expected[n]) for n in names)


def test_lost_reply_is_reassigned_to_another_node_next_round(tmp_path):
    lost = []

    def lose_first_reply_of_node_1(node, reply):
        if node == 1 and reply.metadata.message_type == "train" and not lost:
            lost.append(reply)
            return None  # as if node 1 timed out
        return reply

    strategy, grid = run_strategy(
        tmp_path, num_nodes=2, reply_filter=lose_first_reply_of_node_1, **{"num-rounds": 2}
    )
    assert strategy.remaining == []
    rounds = strategy.accounting.assignments
    assert rounds[1] == {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    # Node 2 delivered every layer in round 1, so round 2 had nothing left to ask.
    assert 2 not in rounds
    assert strategy.accounting.rejected == [
        {"round": 1, "node": 1, "layers": [0, 1, 2, 3], "reason": "no reply in time"}
    ]


def test_layers_nobody_delivered_go_to_a_responsive_node_next_round(tmp_path):
    configs = {
        1: {"partition-id": 0, "num-partitions": 2, "layer-budget": 2},
        2: {"partition-id": 1, "num-partitions": 2, "layer-budget": 2},
    }
    seen = []

    def lose_node_1_once(node, reply):
        if node == 1 and reply.metadata.message_type == "train" and not seen:
            seen.append(node)
            return None
        return reply

    strategy, _ = run_strategy(
        tmp_path, node_configs=configs, reply_filter=lose_node_1_once, **{"num-rounds": 3}
    )
    rounds = strategy.accounting.assignments
    lost = rounds[1][1]
    assert rounds[2] == {2: lost}  # node 1 failed, so node 2 takes its layers
    assert strategy.remaining == []


def test_run_fails_naming_layers_nobody_delivered(tmp_path):
    def drop(node, reply):
        return None if reply.metadata.message_type == "train" else reply

    config = make_config(tmp_path)
    grid = InProcessGrid.simulation(client_app, 2, {}, reply_filter=drop)
    with pytest.raises(RuntimeError, match=r"layers \[0, 1, 2, 3\] were not pruned"):
        run_federation(grid, config, run_id=7)


@pytest.mark.parametrize(
    ("strategy", "pruner", "pattern", "sparsity"),
    [
        ("fedspallm", "sparsegpt", "unstructured", 0.5),
        ("fedspallm", "wanda", "2:4", 0.5),
        ("fedavg", "sparsegpt", "unstructured", 0.7),
        ("fedprllm", "wanda", "unstructured", 0.5),
        ("standalone", "sparsegpt", "unstructured", 0.5),
        ("centralized", "sparsegpt", "4:8", 0.5),
    ],
)
def test_every_strategy_writes_a_loadable_sparse_model_and_report(
    tmp_path, strategy, pruner, pattern, sparsity
):
    config = make_config(
        tmp_path, strategy=strategy, pruner=pruner, pattern=pattern, sparsity=sparsity
    )
    grid = InProcessGrid.simulation(client_app, 2, {})
    run_dir = run_federation(grid, config, run_id=3)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["strategy"] == strategy
    assert report["sparsity"]["overall"] == pytest.approx(sparsity, abs=1e-3)
    assert all(v >= sparsity - 1e-6 for v in report["sparsity"]["per_matrix"].values())
    assert "dense" in report["perplexity"]
    expected_key = {"centralized": "centralized", "standalone": "standalone"}.get(
        strategy, "global"
    )
    assert expected_key in report["perplexity"]
    if strategy not in ("centralized",):
        assert set(report["perplexity"]["standalone"]["per_client"]) == {"1", "2"}
        assert report["communication"]["total_up"] > 0
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    zeros = sum(int((lin.weight == 0).sum()) for lin in prunable_weights(model, 0).values())
    total = sum(lin.weight.numel() for lin in prunable_weights(model, 0).values())
    assert zeros / total == pytest.approx(sparsity, abs=1e-3)


def test_mask_only_payloads_for_pruners_that_keep_values(tmp_path):
    sizes = {}
    for pruner in ("sparsegpt", "wanda"):
        recorder = Recorder()
        run_strategy(tmp_path / pruner, num_nodes=1, reply_filter=recorder, pruner=pruner)
        sizes[pruner] = len(recorder.payloads[1])
        tensors, _ = decode(recorder.payloads[1])
        assert bool(tensors) == (pruner == "sparsegpt")
    assert sizes["wanda"] * 8 < sizes["sparsegpt"]


def test_same_seed_gives_bit_identical_models(tmp_path):
    first, _ = run_strategy(tmp_path / "a", num_nodes=2, **{"layer-fraction": 0.5})
    second, _ = run_strategy(tmp_path / "b", num_nodes=2, **{"layer-fraction": 0.5})
    assert first.accounting.assignments == second.accounting.assignments
    for (name, a), (_, b) in zip(
        first.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


class Crash(Exception):
    """Stands for the ServerApp being killed."""


def test_resume_after_a_crash_gives_the_uninterrupted_model(tmp_path):
    configs = {
        node: {"partition-id": node - 1, "num-partitions": 2, "layer-budget": 1} for node in (1, 2)
    }
    settings = {"num-rounds": 2, "seed": 5}
    whole = run_federation(
        InProcessGrid(client_app, configs, {}), make_config(tmp_path / "a", **settings), run_id=1
    )

    def crash_in_round_2(node, reply):
        if reply.metadata.message_type == "train" and reply.metadata.group_id == "2":
            raise Crash
        return reply

    crashed_config = make_config(tmp_path / "b", **settings)
    with pytest.raises(Crash):
        run_federation(
            InProcessGrid(client_app, configs, {}, reply_filter=crash_in_round_2),
            crashed_config,
            run_id=2,
        )
    (crashed,) = (tmp_path / "b").iterdir()
    state = json.loads((crashed / "checkpoint" / "state.json").read_text())
    assert state["completed_round"] == 1 and len(state["remaining"]) == 2

    # Limits may change on resume: they do not change the pruned model.
    limits = {"max-payload-mb": 512.0, "max-stats-mb": 64.0, "round-timeout": 600.0}
    resumed_config = make_config(
        tmp_path / "b", **settings, **limits, **{"resume-from": str(crashed)}
    )
    resumed = run_federation(InProcessGrid(client_app, configs, {}), resumed_config, run_id=3)
    assert resumed == crashed
    first = AutoModelForCausalLM.from_pretrained(whole / "model")
    second = AutoModelForCausalLM.from_pretrained(resumed / "model")
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    report = json.loads((resumed / "report.json").read_text())
    assert set(report["clients"]["1"]["layers"]) == {"1", "2"}  # both rounds are accounted


def test_resume_refuses_a_changed_config(tmp_path):
    configs = {
        node: {"partition-id": node - 1, "num-partitions": 2, "layer-budget": 1} for node in (1, 2)
    }
    run_dir = run_federation(
        InProcessGrid(client_app, configs, {}), make_config(tmp_path, **{"num-rounds": 2}), run_id=1
    )
    changed = make_config(
        tmp_path, **{"num-rounds": 2, "sparsity": 0.6, "resume-from": str(run_dir)}
    )
    with pytest.raises(ValueError, match="sparsity"):
        run_federation(InProcessGrid(client_app, configs, {}), changed, run_id=2)


def test_payload_dtype_float16_halves_the_values_and_rounds_them_once(tmp_path):
    from client_app.task import prune_layers
    from fedspallm_strategy.config import NodeConfig

    node = NodeConfig(partition_id=0, num_partitions=2)
    full = prune_layers(make_config(tmp_path), node, [0, 1]).payload
    half = prune_layers(make_config(tmp_path, **{"payload-dtype": "float16"}), node, [0, 1])
    values32, masks32 = decode(full)
    values16, masks16 = decode(half.payload)
    kept = sum(int(mask.sum()) for mask in masks32.values())
    # Same pruning (seeded), two bytes fewer per kept value; headers differ by a few bytes.
    assert all(torch.equal(masks32[name], masks16[name]) for name in masks32)
    assert len(full) - len(half.payload) == pytest.approx(2 * kept, abs=256)
    for name, tensor in values16.items():
        assert tensor.dtype == torch.float16
        assert torch.equal(tensor, values32[name].to(torch.float16))


def test_payload_dtype_is_validated():
    with pytest.raises(ValueError, match="payload-dtype"):
        RunConfig.from_mapping({"payload-dtype": "int4"})
