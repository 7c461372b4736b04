"""Layer-wise FedSpaLLM: the masked re-solve, global calibration and layers-per-round.

Runs the real ClientApp and ``Strategy.start`` through the in-process Grid and compares with
what can be computed by hand: re-solving under one's own mask gives one's own weights,
identical shards give identical re-solves, one client equals standalone SparseGPT, and
``layers-per-round`` with local calibration changes nothing but the rounds.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from flwr.app import ArrayRecord, Message

from client_app.app import app as client_app
from client_app.running_inputs import state_dir
from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig
from fedspallm_strategy.strategies.layerwise import LayerwiseMerge, ResolveAverage
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from fedspallm_strategy.wire.protocol import RESOLVED_KEY, bytes_record
from fedspallm_strategy.wire.replies import reply_bytes
from fedspallm_strategy.wire.round_plan import plan_rounds
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from fedspallm_strategy.wire.values_payload import Expected, decode_values, encode_values
from llm_pruning.data import calibration_segments
from llm_pruning.engine import prune_model
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import layer_tensors
from llm_pruning.models import load_model
from llm_pruning.pruners import HessianStats, SparsityPattern, get_pruner, sparsegpt_prune
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {
    "model": "tiny-llama",
    "seqlen": 64,
    "calib-samples": 4,
    "eval-windows": 2,
    "resolve": False,
    "payload-dtype": "float32",  # values as SparseGPT left them: compared exactly below
}


def make_config(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **overrides})


def run(tmp_path, node_configs, reply_filter=None, run_id=1, **overrides):
    config = make_config(tmp_path, **overrides)
    model, _ = load_model(config.model)
    grid = InProcessGrid(client_app, node_configs, {}, reply_filter=reply_filter, run_id=run_id)
    budgets = {n: c.get("layer-budget") for n, c in node_configs.items()}
    kind = LayerwiseMerge if config.layerwise else MergeStrategy
    strategy = kind(model, config, node_budgets=budgets, rule=config.strategy)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)
    return strategy, grid


def partitions(count: int, **extra) -> dict[int, dict]:
    return {
        n: {"partition-id": n - 1, "num-partitions": count, **extra} for n in range(1, count + 1)
    }


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.data for name, p in model.named_parameters()}


def prunable_names(model) -> list[str]:
    return [n for layer in range(num_layers(model)) for n in prunable_weights(model, layer)]


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("pattern", [SparsityPattern(0.6), SparsityPattern(0.5, 2, 4)])
def test_resolving_under_its_own_mask_gives_back_sparsegpts_weights(pattern):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator)
    stats = HessianStats(64)
    stats.add(torch.randn(300, 64, generator=generator) @ torch.randn(64, 64, generator=generator))
    pruned, keep = sparsegpt_prune(weight, stats, pattern, block_size=32)
    resolved, same = sparsegpt_prune(weight, stats, pattern, block_size=32, keep_mask=keep)
    assert torch.equal(same, keep)
    torch.testing.assert_close(resolved, pruned, rtol=1e-5, atol=1e-6)


def test_a_given_mask_is_kept_exactly_and_compensated_for():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 64, generator=generator)
    # Correlated inputs, as activations are: that is what compensation exploits.
    mixing = torch.randn(64, 64, generator=generator)
    inputs = torch.randn(400, 64, generator=generator) @ mixing
    stats = HessianStats(64)
    stats.add(inputs)
    keep = torch.rand(32, 64, generator=generator) > 0.5  # any mask, not SparseGPT's own
    resolved, returned = sparsegpt_prune(weight, stats, SparsityPattern(0.5), keep_mask=keep)
    assert torch.equal(returned, keep)
    assert torch.all(resolved[~keep] == 0)
    # Compensating beats zeroing the same entries: lower reconstruction error on the inputs.
    plain = weight * keep

    def error(w):
        return float(((weight - w) @ inputs.T).square().sum())

    assert error(resolved) < 0.9 * error(plain)


def test_a_mask_of_the_wrong_shape_is_refused():
    stats = HessianStats(8)
    stats.add(torch.randn(20, 8))
    with pytest.raises(ValueError, match="keep_mask"):
        sparsegpt_prune(torch.randn(4, 8), stats, SparsityPattern(0.5), keep_mask=torch.ones(8, 4))


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    ("calibration", "resolve", "per_round", "pipelined", "rounds"),
    [
        ("local", True, 0, True, 2),  # one-shot + one re-solve round
        ("local", False, 2, True, 3),  # 5 layers in groups of 2
        ("local", True, 2, True, 6),
        ("global", False, 0, True, 5),  # 0 means 1 with global calibration
        ("global", True, 1, True, 6),  # G + 1
        ("global", True, 1, False, 10),  # 2G
        ("global", True, 2, True, 4),
    ],
)
def test_every_layer_is_pruned_once_resolved_once_and_handed_down_after(
    calibration, resolve, per_round, pipelined, rounds
):
    steps = plan_rounds(
        5, calibration=calibration, resolve=resolve, layers_per_round=per_round, pipelined=pipelined
    )
    assert len(steps) == rounds
    pruned = [layer for step in steps for layer in step.prune]
    assert sorted(pruned) == list(range(5))
    resolved = [layer for step in steps for layer in step.resolve]
    assert sorted(resolved) == (list(range(5)) if resolve else [])
    for r, step in enumerate(steps):
        earlier = steps[:r]
        for layer in step.resolve:  # its mask was fixed by an earlier round
            assert any(layer in s.prune for s in earlier)
        for layer in step.advance:  # handed down only once final
            assert any(layer in s.resolve for s in earlier) or (
                not resolve and any(layer in s.prune for s in earlier)
            )
        if step.start > 0:  # continues from inputs an earlier round kept
            assert steps[r - 1].keep_from == step.start
    assert steps[-1].keep_from is None  # the last round removes the node's inputs


# --------------------------------------------------------------------------- federations


def test_layers_per_round_with_local_calibration_is_bit_identical_to_one_round(tmp_path):
    nodes = {
        1: {"partition-id": 0, "num-partitions": 3, "layer-budget": 2},
        2: {"partition-id": 1, "num-partitions": 3, "layer-budget": 3},
        3: {"partition-id": 2, "num-partitions": 3, "layer-budget": 4},
    }
    one_shot, _ = run(tmp_path, nodes)
    grouped, grid = run(tmp_path, nodes, run_id=2, **{"layers-per-round": 1})
    assert grouped.rounds == 4
    assert grouped.owned == one_shot.accounting.assignments[1]  # the same sampled layers
    expected, found = params(one_shot.model), params(grouped.model)
    assert all(torch.equal(expected[n], found[n]) for n in expected)
    # Each round asked each node for its layers of that round's group only.
    for message in grid.sent:
        layers = message.content.config_records["spec"]["layers"]
        assert len(layers) <= 1
    # The nodes removed their running inputs after the last round.
    for config in nodes.values():
        assert not state_dir(NodeConfig.from_mapping(config), 2, "layerwise").exists()


def resolved_values(reply: Message) -> dict[str, torch.Tensor]:
    """A reply's re-solved values by key (``values/<name>``). The prune round's payload names
    its pruned matrices with no values, only their column norms: those are left out."""
    loaded = safetensors.torch.load(reply_bytes(reply, RESOLVED_KEY, max_bytes=2**30))
    return {k: t for k, t in loaded.items() if k.startswith("values/") and t.numel()}


def record_resolved(store: dict):
    def keep(node: int, reply: Message) -> Message:
        if not reply.has_error() and RESOLVED_KEY in reply.content.array_records:
            store.setdefault(node, {}).update(resolved_values(reply))  # every round's
        return reply

    return keep


@pytest.mark.parametrize("calibration", ["local", "global"])
def test_identical_shards_resolve_to_identical_values_and_the_mean_is_each(tmp_path, calibration):
    nodes = {}
    for node in (1, 2):  # two organisations holding the same text
        text = tmp_path / f"copy-{node}.txt"
        text.write_text(calibration_text(), encoding="utf-8")
        nodes[node] = {"data-path": str(text)}
    resolved: dict[int, dict] = {}
    strategy, _ = run(
        tmp_path,
        nodes,
        reply_filter=record_resolved(resolved),
        resolve=True,
        calibration=calibration,
        **{"layers-per-round": 2 if calibration == "global" else 0},
    )
    assert set(resolved) == {1, 2}
    first, second = resolved[1], resolved[2]
    assert first.keys() == second.keys() == {f"values/{n}" for n in prunable_names(strategy.model)}
    model = params(strategy.model)
    for key, kept in first.items():
        assert torch.equal(kept, second[key])  # same shard, same merged mask: same re-solve
        weight = model[key.removeprefix("values/")]
        assert torch.equal(weight[weight != 0], kept[kept != 0])  # and the mean is that


def calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)[:12])


@pytest.mark.parametrize(
    "overrides",
    [
        {"resolve": True},
        {"calibration": "global"},
        {"calibration": "global", "resolve": True},
        {"calibration": "global", "resolve": True, "resolve-pipelined": False},
        {"resolve": True, "resolve-weighting": "hessian-diagonal"},
    ],
)
def test_one_client_with_resolve_or_global_calibration_equals_standalone_sparsegpt(
    tmp_path, overrides
):
    strategy, _ = run(tmp_path, partitions(1), **overrides)
    assert strategy.accounting.rejected == []
    config = strategy.config
    model, tokenizer = load_model(config.model)
    segments = calibration_segments(
        config.calib_data,
        tokenizer,
        seqlen=config.seqlen,
        num_segments=config.calib_samples,
        seed=config.seed,
        partition=config.partition,
        partition_id=0,
        num_partitions=1,
    )
    prune_model(model, segments, get_pruner("sparsegpt"), config.sparsity_pattern, progress=False)
    expected, found = params(model), params(strategy.model)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-5, atol=1e-6)


def test_global_calibration_with_resolve_gives_the_exact_sparsity_and_a_report(tmp_path):
    config = make_config(
        tmp_path, resolve=True, calibration="global", **{"layers-per-round": 2, "sparsity": 0.6}
    )
    run_dir = run_federation(InProcessGrid.simulation(client_app, 2, {}), config, run_id=31)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["layerwise"]["rounds"] == 3  # 2 groups, pipelined: G + 1
    model, _ = load_model(str(run_dir / "model"))
    for name in prunable_names(model):
        weight = params(model)[name]
        assert int((weight == 0).sum()) == int(np.ceil(0.6 * weight.numel() - 1e-9)), name
    assert report["rejected"] == []
    assert "global" in report["perplexity"]


def test_each_rounds_bytes_are_that_rounds_and_add_up_to_the_totals(tmp_path):
    config = make_config(tmp_path, resolve=True)  # local calibration: prune, then re-solve
    run_dir = run_federation(InProcessGrid.simulation(client_app, 2, {}), config, run_id=32)
    report = json.loads((run_dir / "report.json").read_text())
    communication, rounds = report["communication"], report["layerwise"]["per_round"]
    per_round = communication["per_round"]
    assert sorted(per_round) == ["1", "2"]
    for kind, label in (("bytes_up", "bytes-up"), ("bytes_down", "bytes-down")):
        for node, total in communication[kind].items():
            assert sum(per_round[r][kind].get(node, 0) for r in per_round) == total
        # the round's metric is that round alone, not the running total
        assert [entry[label] for entry in rounds] == [
            sum(per_round[str(entry["round"])][kind].values()) for entry in rounds
        ]
    pruned, resolved = (sum(per_round[r]["bytes_up"].values()) for r in ("1", "2"))
    # round 1 carries mask bits and the kept values (float32 here), round 2 the kept values
    # alone, for 2 clients
    model, _ = load_model("tiny-llama")
    weights = [
        linear.weight
        for layer in range(num_layers(model))
        for linear in prunable_weights(model, layer).values()
    ]
    kept = sum(math.ceil(w.numel() / 2) for w in weights)  # sparsity 0.5: half of each kept
    bits = sum(w.numel() for w in weights) / 8
    headers = 2 * 32 * 1024
    assert 2 * (bits + 4 * kept) <= pruned <= 2 * (bits + 4 * kept) + headers
    assert 2 * 4 * kept <= resolved <= 2 * 4 * kept + headers
    assert communication["total_up"] == pruned + resolved


def test_a_resolve_reply_that_does_not_match_the_sent_mask_is_rejected(tmp_path):
    def drop_one_value(node: int, reply: Message) -> Message:
        if node != 2 or reply.has_error():
            return reply
        values = resolved_values(reply)
        if not values:
            return reply  # the prune round: nothing re-solved yet
        values = {key.removeprefix("values/"): tensor for key, tensor in values.items()}
        name = sorted(values)[0]
        values[name] = values[name][:-1]  # one value short of what the mask keeps
        reply.content[RESOLVED_KEY] = bytes_record(encode_values(values), RESOLVED_KEY)
        return reply

    strategy, _ = run(tmp_path, partitions(3), reply_filter=drop_one_value, resolve=True)
    rejected = strategy.accounting.rejected
    assert [(r["node"], r["round"]) for r in rejected] == [(2, 2)]
    assert "values, but the mask sent keeps" in rejected[0]["reason"]
    assert not strategy.remaining  # the others' re-solves were merged


def test_values_payload_rejects_what_the_masks_do_not_imply():
    values = {"a": torch.arange(5, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)}
    data = encode_values(values)
    both = {"a": Expected(5), "b": Expected(3)}
    decoded, weights = decode_values(data, both)
    assert all(torch.equal(decoded[n], values[n]) for n in values) and weights == {}
    for expected, match in (
        ({"a": Expected(5)}, "not sent"),
        ({**both, "c": Expected(1)}, "lacks values"),
        ({"a": Expected(4), "b": Expected(3)}, "the mask sent keeps 4"),
        ({"a": Expected(5, 7), "b": Expected(3, 2)}, "must hold exactly"),
    ):
        with pytest.raises(PayloadError, match=match):
            decode_values(data, expected)
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decode_values(data, both, max_bytes=10)
    with pytest.raises(PayloadError, match="imply"):
        decode_values(data[:-2], both)
    with pytest.raises(PayloadError):
        decode_values(b"\x00" * 12, {"a": Expected(5)})


def test_column_weights_travel_checked_and_weigh_the_mean_per_column():
    keep = torch.tensor([[True, False, True], [False, True, True]])  # kept columns 0, 2, 1, 2
    weighted = {"w": Expected(4, 3)}
    first = encode_values(
        {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, {"w": torch.tensor([1.0, 0.0, 3.0])}
    )
    second = encode_values(
        {"w": torch.tensor([5.0, 6.0, 7.0, 8.0])}, {"w": torch.tensor([3.0, 0.0, 1.0])}
    )
    average = ResolveAverage({"w": keep}, ["w"])
    for data in (first, second):
        average.add(*decode_values(data, weighted))
    # Column 0: (1*1 + 3*5) / 4; column 2: (3*2 + 1*6) / 4 and (3*4 + 1*8) / 4; column 1 was
    # seen by nobody (weights 0): the plain mean (3 + 7) / 2.
    expected = torch.tensor([4.0, 3.0, 5.0, 5.0], dtype=torch.float64)
    assert torch.equal(average.finish("w"), expected)
    negative = encode_values({"w": torch.ones(4)}, {"w": torch.tensor([1.0, -1.0, 1.0])})
    with pytest.raises(PayloadError, match="must not be negative"):
        decode_values(negative, weighted)
    with pytest.raises(PayloadError, match="column weights"):
        decode_values(first, {"w": Expected(4, 5)})


def test_a_node_lost_mid_run_is_left_out_and_the_run_completes(tmp_path):
    def lose_node_3_in_round_2(node: int, reply: Message):
        if node == 3 and reply.metadata.group_id == "2":
            return None
        return reply

    strategy, grid = run(
        tmp_path, partitions(3), reply_filter=lose_node_3_in_round_2, calibration="global"
    )
    assert strategy.dropped == {3}
    later = [m.metadata.dst_node_id for m in grid.sent if int(m.metadata.group_id) > 2]
    assert later and 3 not in later
    assert not strategy.remaining


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"resolve": True, "pruner": "wanda"}, "resolve=true .* pruner 'wanda'"),
        ({"resolve": True, "pruner": "magnitude"}, "resolve=true .* pruner 'magnitude'"),
        ({"calibration": "everywhere"}, "calibration must be one of local, global"),
        ({"layers-per-round": -1}, "layers-per-round must be at least 0"),
        ({"resolve": True, "resume-from": "/tmp/x"}, "resume-from: runs with resolve"),
        ({"resolve": "maybe"}, "resolve must be true or false"),
        ({"resolve-weighting": "votes"}, "resolve-weighting must be one of uniform"),
    ],
)
def test_bad_combinations_fail_before_any_work_naming_the_keys(overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping({**TINY, **overrides})


def test_budgets_that_cannot_cover_the_model_in_one_pass_fail_before_any_work(tmp_path):
    config = make_config(tmp_path, resolve=True)
    nodes = partitions(2, **{"layer-budget": 1})
    calls = []

    def count(node: int, reply: Message):
        calls.append(reply.metadata.message_type)
        return reply

    grid = InProcessGrid(client_app, nodes, {}, reply_filter=count)
    with pytest.raises(ConfigError, match="cover 2 of 4 layers"):
        run_federation(grid, config, run_id=41)
    assert all(kind == "query" for kind in calls)  # no node pruned anything


def test_resolve_does_not_apply_to_strategies_that_merge_nothing():
    for strategy in ("standalone", "centralized", "exact"):
        config = RunConfig.from_mapping({**TINY, "strategy": strategy, "resolve": True})
        assert not config.layerwise


def test_the_layerwise_model_loads_with_transformers(tmp_path):
    config = make_config(tmp_path, resolve=True, **{"layers-per-round": 2})
    run_dir = run_federation(InProcessGrid.simulation(client_app, 2, {}), config, run_id=43)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(run_dir) / "model")
    assert sum(int((p == 0).sum()) for n, p in model.named_parameters() if "proj" in n) > 0


def _scale_resolved(node_to_poison: int, factor: float):
    """A reply filter that multiplies node ``node_to_poison``'s re-solved values."""

    def poison(node: int, reply: Message) -> Message:
        if node != node_to_poison or reply.has_error():
            return reply
        values = resolved_values(reply)
        if not values:
            return reply  # the prune round: nothing re-solved yet
        values = {key.removeprefix("values/"): t * factor for key, t in values.items()}
        reply.content[RESOLVED_KEY] = bytes_record(encode_values(values), RESOLVED_KEY)
        return reply

    return poison


def test_resolved_values_far_from_the_dense_weights_are_rejected(tmp_path):
    strategy, _ = run(
        tmp_path, partitions(3), reply_filter=_scale_resolved(2, 1000.0), resolve=True
    )
    rejected = strategy.accounting.rejected
    assert [(r["node"], r["round"]) for r in rejected] == [(2, 2)]
    assert "differ from the dense weights" in rejected[0]["reason"]
    assert not strategy.remaining


def test_robust_resolve_average_ignores_one_outlier_of_three():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    honest = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.5, 2.5, 3.5, 4.5])]
    poisoned = torch.tensor([1e6, -1e6, 1e6, 0.0])
    for rule, expected in (
        ("median", [1.5, 2.0, 3.5, 4.0]),
        ("trimmed-mean", [1.5, 2.0, 3.5, 4.0]),
    ):
        average = ResolveAverage({"w": keep}, ["w"], rule)
        for values in (*honest, poisoned):
            average.add({"w": values}, {})
        assert average.finish("w").tolist() == expected, rule
    mean = ResolveAverage({"w": keep}, ["w"])
    for values in (*honest, poisoned):
        mean.add({"w": values}, {})
    assert mean.finish("w")[0] > 1e5  # the paper's mean follows the poisoner


def test_a_lazy_server_holds_no_dense_values_between_prune_and_resolve(tmp_path, monkeypatch):
    """In local calibration every layer is pruned before any is re-solved. A lazily loaded
    server model reads a layer's dense kept values back from its checkpoint at the re-solve,
    where an eager one copies them at the merge (memory that grows with every layer pruned):
    the same merged model either way."""
    held = []
    merge = LayerwiseMerge._merge_pruned

    def counting_merge(self, *args):
        merge(self, *args)
        held.append(len(self.dense_kept))

    monkeypatch.setattr(LayerwiseMerge, "_merge_pruned", counting_merge)
    config = make_config(tmp_path, resolve=True, **{"layers-per-round": 1})
    merged = {}
    for run_id, lazy in ((3, True), (4, False)):
        model, _ = load_model(config.model, lazy=lazy)
        grid = InProcessGrid(client_app, partitions(2), {}, run_id=run_id)
        strategy = LayerwiseMerge(model, config, node_budgets={1: None, 2: None})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)
        merged[lazy] = {
            name: layer_tensors(model, layer)[name].clone()
            for layer in range(num_layers(model))
            for name in prunable_weights(model, layer)
        }
    per_layer = len(prunable_weights(model, 0))
    # 4 prune rounds, then the re-solves: lazy holds nothing, eager one layer's more a round
    # After each round's merge: lazy holds the re-solving layer's only; eager every pruned
    # layer's until its re-solve (4 prune rounds, then 4 re-solve rounds).
    lazy, eager = held[:8], held[8:]
    assert lazy == [0, 0, 0, 0] + [per_layer] * 4
    assert eager == [per_layer * k for k in (1, 2, 3, 4, 4, 3, 2, 1)]
    assert merged[True].keys() == merged[False].keys()
    assert all(torch.equal(merged[True][n], merged[False][n]) for n in merged[True])


@pytest.mark.parametrize(
    "settings, stored",
    [
        ({"standalone-eval": False}, False),  # nobody scores the members' models
        ({"standalone-eval": True}, True),  # float32 values: the server scores them
        ({"standalone-eval": False, "keep-replies": True}, True),  # asked for
    ],
)
def test_replies_go_to_disk_only_where_something_reads_them(tmp_path, settings, stored):
    config = make_config(tmp_path, resolve=True, **{"layers-per-round": 2}, **settings)
    assert not config.clients_score_standalone  # float32 values: the members score nothing
    model, _ = load_model(config.model)
    grid = InProcessGrid(client_app, partitions(2), {}, run_id=5)
    strategy = LayerwiseMerge(
        model, config, node_budgets={1: None, 2: None}, reply_dir=tmp_path / "replies"
    )
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)
    files = sorted((tmp_path / "replies").glob("*.safetensors"))
    # 4 layers in 2 prune rounds, each node's pruned layers stored once a round when stored
    assert len(files) == (4 if stored else 0)
    assert sum(len(paths) for paths in strategy.reply_files.values()) == len(files)
