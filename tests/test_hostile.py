"""A hostile organisation: no reply crashes the server, nothing out of spec is accepted.

Replies are built from honest ones (real clients pruning tiny-llama on their shards) and
driven through the strategies' real ``aggregate_train``: lying Flower Arrays, broken bytes,
well-formed payloads at the wrong sparsity, poisoned values, forged statistics. Every one is
either rejected with a reason (and the model is then bit-identical to the honest-only one),
or it is within spec by an independent check written here, not with the server's code.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from client_app.exact_task import exact_statistics
from client_app.task import prune_layers
from fedspallm_strategy.config import NodeConfig, RunConfig
from fedspallm_strategy.merge.aggregation import robust_centre
from fedspallm_strategy.merge.plausibility import change_bound, relative_change
from fedspallm_strategy.strategies.exact import Exact
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from fedspallm_strategy.wire.payload import encode
from fedspallm_strategy.wire.stats_payload import decode_statistics, encode_statistics
from llm_pruning.models import load_model
from llm_pruning.pruners import num_to_prune
from server_app.inprocess import _set_task_identity

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # shared with the bench
from attacks import (  # noqa: E402
    LAYERS,
    forge,
    lying_records,
    matrices,
    mutate,
    payload_content,
    reply,
    semantic_attacks,
    split,
)

# float32 on the wire: the attacks and the expected merges are written for the model's dtype.
BASE = {
    "model": "tiny-llama",
    "seqlen": 64,
    "calib-samples": 2,
    "resolve": False,
    "payload-dtype": "float32",
}
RULES = ("fedspallm", "fedavg", "fedprllm", "standalone")


def config_of(**overrides) -> RunConfig:
    return RunConfig.from_mapping({**BASE, **overrides})


@pytest.fixture(scope="module")
def model():
    _set_task_identity(1)
    model, _ = load_model("tiny-llama")
    return model


@pytest.fixture(scope="module")
def dense(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def honest_payloads(config: RunConfig, nodes: int) -> dict[int, bytes]:
    return {
        node: prune_layers(
            config, NodeConfig(partition_id=node - 1, num_partitions=nodes), LAYERS
        ).payload
        for node in range(1, nodes + 1)
    }


@pytest.fixture(scope="module")
def honest():
    """Honest replies: SparseGPT (values), Wanda (mask-only), SparseGPT 2:4; three nodes."""
    return {
        "sparsegpt": honest_payloads(config_of(), 3),
        "wanda": honest_payloads(config_of(pruner="wanda"), 3),
        "2:4": honest_payloads(config_of(pattern="2:4"), 3),
    }


def aggregate(model, dense, config: RunConfig, contents: dict[int, RecordDict], tmp_path=None):
    """One round of a fresh strategy over ``contents`` (node -> reply content), on the dense
    model; returns the strategy and the resulting weights."""
    for name, parameter in model.named_parameters():
        parameter.data.copy_(dense[name])
    strategy = MergeStrategy(model, config, rule=config.strategy, reply_dir=tmp_path)
    strategy.assignments = {node: LAYERS for node in contents}
    strategy.aggregate_train(1, [reply(node, c) for node, c in contents.items()])
    return strategy, {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------- the independent oracle
def in_spec(data: bytes, model, config: RunConfig, dense) -> bool:
    """What the server may accept, checked with safetensors and numpy only."""
    try:
        metadata, values, masks = split(data)
    except Exception:
        return False
    weights = matrices(model)
    pattern = config.sparsity_pattern
    if set(masks) != set(weights) or bool(values) != (config.pruner == "sparsegpt"):
        return False
    for name, mask in masks.items():
        numel = mask.numel()
        if tuple(mask.shape) != tuple(weights[name].shape):
            return False
        if int(mask.sum()) != numel - num_to_prune(numel, pattern.sparsity):
            return False
        if pattern.is_nm and bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) != 2).any()):
            return False
        if values:
            kept = values[name]
            if kept.dtype != torch.float32 or kept.numel() != int(mask.sum()):
                return False
            if not bool(torch.isfinite(kept).all()):
                return False
            bound = change_bound(pattern, config.max_relative_change)
            if relative_change(kept, dense[name][mask]) > bound:
                return False
    return True


# ------------------------------------------------------------------- the fuzz
def hostile_cases(honest, model) -> list[tuple[str, str, RecordDict]]:
    """(pruner setting, label, reply content) for the hostile node 3."""
    rng = random.Random(15)
    cases = []
    for setting, payloads in honest.items():
        data = payloads[3]
        for label, content in lying_records(data).items():
            cases.append((setting, label, content))
        for label, forged in semantic_attacks(data, model, setting == "2:4").items():
            cases.append((setting, label, payload_content(forged)))
        for index in range(25):
            cases.append((setting, f"mutated-{index}", payload_content(mutate(data, rng))))
    return cases


SETTINGS = {"sparsegpt": {}, "wanda": {"pruner": "wanda"}, "2:4": {"pattern": "2:4"}}


@pytest.mark.parametrize("rule", RULES)
def test_fuzzed_hostile_replies_never_crash_and_never_pass_out_of_spec(
    rule, honest, model, dense, tmp_path
):
    outcomes = {"rejected": 0, "accepted": 0}
    honest_only = {}
    for setting, label, content in hostile_cases(honest, model):
        config = config_of(strategy=rule, **SETTINGS[setting])
        if setting not in honest_only:
            good = {n: payload_content(honest[setting][n]) for n in (1, 2)}
            honest_only[setting] = aggregate(model, dense, config, good)[1]
        contents = {n: payload_content(honest[setting][n]) for n in (1, 2)}
        contents[3] = content
        strategy, merged = aggregate(model, dense, config, contents, tmp_path / label)
        assert strategy.remaining == [], label  # nodes 1 and 2 still finish every layer
        rejected = [r for r in strategy.accounting.rejected if r["node"] == 3]
        if rejected:
            outcomes["rejected"] += 1
            assert rejected[0]["reason"], label
            assert all(torch.equal(merged[n], honest_only[setting][n]) for n in merged), label
            assert 3 not in strategy.reply_files, label  # no standalone model of a rejected reply
        else:
            outcomes["accepted"] += 1
            data = strategy.reply_files[3][0].read_bytes()
            assert in_spec(data, model, config, dense), f"{label} accepted out of spec"
        assert all(bool(torch.isfinite(t).all()) for t in merged.values()), label
    assert outcomes["rejected"] >= 90  # the attacks do reach the rejection path
    assert outcomes["rejected"] + outcomes["accepted"] >= 100


# ------------------------------------------------------------------- exact
@pytest.fixture(scope="module")
def exact_setup(model, tmp_path_factory):
    config = config_of(strategy="exact", pruner="sparsegpt")
    strategy = Exact(model, config)
    shared = [list(group) for group in strategy.plan.shared]
    cache = str(tmp_path_factory.mktemp("cache"))
    replies = {
        node: exact_statistics(
            config,
            NodeConfig(partition_id=node - 1, num_partitions=3, cache_dir=cache),
            run_id=7,
            layer_ids=[0],
            shared=shared,
            previous_layers=[],
            previous=None,
        ).payload
        for node in (1, 2, 3)
    }
    return config, replies


def forged_statistics(data: bytes) -> dict[str, bytes]:
    kind, entries = decode_statistics(data)
    attacks = {}

    def variant(change) -> bytes:
        copied = {}
        for name, (stats, covers) in entries.items():
            clone = type(stats)(stats.num_inputs)
            clone.xtx, clone.count = stats.xtx.clone(), stats.count
            copied[name] = (clone, covers)
        change(copied)
        return encode_statistics(copied)

    first = next(iter(entries))

    def negative_diagonal(copied):
        copied[first][0].xtx[0, 0] = -1.0

    def cauchy_schwarz(copied):
        copied[first][0].xtx[0, 1] = copied[first][0].xtx[1, 0] = 1e6

    def scaled(copied):
        for stats, _ in copied.values():
            stats.xtx *= 1e30

    def other_count(copied):
        for stats, _ in copied.values():
            stats.count += 64

    attacks["negative-diagonal"] = variant(negative_diagonal)
    attacks["cauchy-schwarz"] = variant(cauchy_schwarz)
    attacks["scaled-1e30"] = variant(scaled)
    attacks["other-token-count"] = variant(other_count)
    return attacks


def run_exact(model, dense, config, contents):
    for name, parameter in model.named_parameters():
        parameter.data.copy_(dense[name])
    strategy = Exact(model, config)
    strategy.assignments = {node: [0] for node in contents}
    strategy.aggregate_train(1, [reply(node, c) for node, c in contents.items()])
    return strategy, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fuzzed_hostile_statistics_never_crash_the_exact_strategy(exact_setup, model, dense):
    config, honest_stats = exact_setup
    _, honest_only = run_exact(
        model, dense, config, {n: payload_content(honest_stats[n]) for n in (1, 2)}
    )
    rng = random.Random(17)
    data = honest_stats[3]
    cases = {**lying_records(data)}
    cases |= {k: payload_content(v) for k, v in forged_statistics(data).items()}
    cases |= {f"mutated-{i}": payload_content(mutate(data, rng)) for i in range(90)}
    rejected_count = 0
    for label, content in cases.items():
        contents = {n: payload_content(honest_stats[n]) for n in (1, 2)}
        contents[3] = content
        strategy, merged = run_exact(model, dense, config, contents)
        rejected = [r for r in strategy.accounting.rejected if r["node"] == 3]
        if rejected:
            rejected_count += 1
            assert all(torch.equal(merged[n], honest_only[n]) for n in merged), label
        assert all(bool(torch.isfinite(t).all()) for t in merged.values()), label
    assert len(cases) >= 100
    assert rejected_count >= 95  # statistics have no slack: a flipped bit is mostly caught
    for label in forged_statistics(data):
        assert label in cases


# ------------------------------------------------------------------- bounded influence
def merged_change(merged, reference, names) -> float:
    num = sum(float((merged[n].double() - reference[n].double()).norm() ** 2) for n in names)
    den = sum(float(reference[n].double().norm() ** 2) for n in names)
    return math.sqrt(num / den)


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_a_poisoner_inside_the_bound_moves_the_model_less_than_dropping_an_honest_member(
    aggregation, honest, model, dense
):
    """Three clients, the third adaptive: its kept values are pushed just inside the bound,
    away from the dense weights. With a robust rule it moves the merged matrices less than
    leaving out one honest member does under the paper's mean."""
    config = config_of(aggregation=aggregation)
    payloads = honest["sparsegpt"]
    names = list(matrices(model))
    _, values, masks = split(payloads[3])
    bound = change_bound(config.sparsity_pattern, config.max_relative_change)
    poisoned = {}
    for name, kept in values.items():
        base = dense[name][masks[name]]
        direction = kept - base
        poisoned[name] = base + direction * (0.95 * bound * base.norm() / direction.norm())
    attack = payload_content(forge(poisoned, masks))
    all_honest = {n: payload_content(payloads[n]) for n in (1, 2, 3)}
    _, reference = aggregate(model, dense, config_of(), all_honest)
    _, without_one = aggregate(model, dense, config_of(), {n: all_honest[n] for n in (1, 2)})
    strategy, attacked = aggregate(
        model, dense, config, {1: all_honest[1], 2: all_honest[2], 3: attack}
    )
    assert strategy.accounting.rejected == []  # inside the bound: accepted
    drop = merged_change(without_one, reference, names)
    assert merged_change(attacked, reference, names) < drop
    # Under the mean, the same attack moves it further than dropping a member.
    _, mean_attacked = aggregate(
        model, dense, config_of(), {1: all_honest[1], 2: all_honest[2], 3: attack}
    )
    assert merged_change(mean_attacked, reference, names) > merged_change(
        attacked, reference, names
    )


def test_robust_rules_equal_the_mean_on_identical_values_and_ignore_one_outlier():
    nan = float("nan")
    values = torch.tensor([[1.0, 2.0, nan, 5.0], [1.0, 4.0, nan, nan], [1.0, 1e9, 3.0, nan]])
    # Entry 0: all equal; entry 1: one outlier among 3; entry 2: one keeper; entry 3: one.
    assert robust_centre(values, "median").tolist() == [1.0, 4.0, 3.0, 5.0]
    assert robust_centre(values, "trimmed-mean").tolist() == [1.0, 4.0, 3.0, 5.0]
    # Seven keepers, two outliers: trim-fraction 0.25 cuts ceil(1.75) = 2 at each end.
    seven = torch.tensor([[-1e9], [1.0], [2.0], [3.0], [4.0], [5.0], [1e9]])
    assert robust_centre(seven, "trimmed-mean").item() == 3.0
    two = torch.tensor([[1.0], [3.0]])  # two keepers: nothing can be cut, their mean
    assert robust_centre(two, "trimmed-mean").item() == 2.0
    assert robust_centre(two, "median").item() == 2.0
    assert robust_centre(torch.full((3, 2), nan), "median").tolist() == [0.0, 0.0]


def test_mean_aggregation_is_bit_identical_to_before(honest, model, dense):
    """The default keeps the paper's streamed l0 mean: a robust rule is opt-in."""
    config = config_of()
    assert config.aggregation == "mean"
    contents = {n: payload_content(honest["sparsegpt"][n]) for n in (1, 2, 3)}
    _, merged = aggregate(model, dense, config, contents)
    _, values, masks = zip(*(split(honest["sparsegpt"][n]) for n in (1, 2, 3)), strict=True)
    for name in matrices(model):
        total = sum(
            torch.zeros(m[name].shape, dtype=torch.float64).masked_scatter_(
                m[name], v[name].double()
            )
            for v, m in zip(values, masks, strict=True)
        )
        count = sum(m[name].to(torch.int64) for m in masks)
        mean = (total / count.clamp_min(1)).float()
        kept = merged[name] != 0
        assert torch.equal(merged[name][kept], mean[kept])


def test_encode_refuses_what_a_client_should_never_send():
    with pytest.raises(ValueError, match="finite"):
        encode({"w": torch.tensor([[float("inf"), 1.0]])}, {"w": torch.tensor([[True, False]])})


def test_an_oversized_reply_is_rejected_before_it_is_parsed(honest, model, dense):
    """32 MiB of valid-looking bytes: refused on the Array's declared size, unread."""
    config = config_of()
    big = payload_content(b"\0" * (32 * 2**20))
    contents = {1: payload_content(honest["sparsegpt"][1]), 2: big}
    strategy, _ = aggregate(model, dense, config, contents)
    (rejection,) = strategy.accounting.rejected
    assert rejection["node"] == 2 and "this reply may hold" in rejection["reason"]


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_robust_aggregation_runs_end_to_end_with_sampling_and_resolve(aggregation, tmp_path):
    """Few keepers per entry (layer-fraction 0.5 over 3 nodes) and the re-solve round: the run
    completes at exactly the target sparsity, with the rule in the report's config."""
    import json

    from client_app.app import app as client_app
    from server_app.federation import run_federation
    from server_app.inprocess import InProcessGrid

    config = RunConfig.from_mapping(
        {
            **BASE,
            "resolve": True,
            "aggregation": aggregation,
            "layer-fraction": 0.5,
            "eval-windows": 1,
            "output-dir": str(tmp_path),
        }
    )
    run_dir = run_federation(InProcessGrid.simulation(client_app, 3, {}), config, run_id=5)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rejected"] == [] and report["config"]["aggregation"] == aggregation
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-9)


def test_clipping_scales_each_change_down_to_the_median_norm():
    from fedspallm_strategy.merge.aggregation import clip_to_median_norm

    nan = float("nan")
    dense = torch.tensor([1.0, 1.0, 1.0])
    values = torch.tensor(
        [[2.0, 1.0, nan], [1.0, 3.0, 1.0], [101.0, 1.0, 1.0]]  # changes of norm 1, 2, 100
    )
    clipped = clip_to_median_norm(values, dense)
    assert clipped[0, :2].tolist() == [2.0, 1.0] and math.isnan(clipped[0, 2])  # under: kept
    assert clipped[1].tolist() == [1.0, 3.0, 1.0]  # the median itself
    assert clipped[2].tolist() == pytest.approx([3.0, 1.0, 1.0])  # 100 -> 2, same direction
    unchanged = torch.ones(2, 3)  # mask-only clients keep the dense values: nothing to clip
    assert torch.equal(clip_to_median_norm(unchanged, dense), unchanged)
