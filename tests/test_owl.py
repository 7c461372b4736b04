"""OWL layer-wise sparsity: the maths by hand, exact totals, and the federated profile round."""

import json
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig
from fedspallm_strategy.strategies.exact import Exact
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from fedspallm_strategy.strategies.profile_round import checked_counts
from fedspallm_strategy.strategies.registry import STRATEGIES
from fedspallm_strategy.wire.protocol import PROFILE_KEY, request_record, request_sparsities
from fedspallm_strategy.wire.replies import RejectedReply
from llm_pruning.data import calibration_segments
from llm_pruning.engine import prune_model
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.models import load_model
from llm_pruning.owl import (
    check_layer_sparsities,
    largest_remainder,
    layer_outliers,
    matrix_patterns,
    matrix_prune_counts,
    matrix_sizes,
    owl_profile,
    owl_sparsities,
    profile_model,
    profile_patterns,
    uniform_prune_total,
)
from llm_pruning.pruners import ColumnNormStats, SparsityPattern, get_pruner
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {"model": "tiny-llama", "seqlen": 64, "calib-samples": 4, "eval-windows": 2}
OWL = {"sparsity-profile": "owl", "owl-m": 3.0}  # tiny-llama's random weights: m=3 separates


def make_config(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **OWL, **overrides})


def zeros_of(model) -> int:
    return sum(
        int((linear.weight == 0).sum())
        for layer in range(num_layers(model))
        for linear in prunable_weights(model, layer).values()
    )


def layer_sparsity(model, layer: int) -> float:
    linears = prunable_weights(model, layer).values()
    zeros = sum(int((linear.weight == 0).sum()) for linear in linears)
    return zeros / sum(linear.weight.numel() for linear in linears)


# ------------------------------------------------------------------------------ maths


def column_stats(norms: list[float]) -> ColumnNormStats:
    """Statistics of one token row: the normalised column norms are ``|norms|``."""
    stats = ColumnNormStats(len(norms))
    stats.add(torch.tensor([norms]))
    return stats


def test_outliers_count_over_all_matrices_of_a_layer_against_their_joint_mean():
    weights = {"a": torch.tensor([[1.0, 1.0, 1.0, 10.0]]), "b": torch.tensor([[1.0, 1.0]])}
    stats = {"a": column_stats([1, 1, 1, 1]), "b": column_stats([2, 2])}
    # scores 1, 1, 1, 10 and 2, 2: mean 17/6; above 2 x 17/6 = 5.67 only the 10
    assert layer_outliers(weights, stats, 2.0) == (1, 6)
    # above 0.5 x 17/6 = 1.42: the 10 and both 2s (b's column norms make them count)
    assert layer_outliers(weights, stats, 0.5) == (3, 6)


def test_more_outliers_lower_sparsity_linear_in_the_ratio():
    assert owl_sparsities([0.1, 0.2, 0.3], [1, 1, 1], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])


def test_the_shift_makes_the_weighted_mean_the_target_within_lambda():
    # raw 0.6, 0.5, 0.4 over sizes 1, 1, 2 average 0.475: shifting up by 0.025 would take
    # layer 0 to 0.625 > 0.6, so it stays at 0.6 and the others rise by 1/30 (0.6 + 2 x 0.5 ...)
    result = owl_sparsities([0.1, 0.2, 0.3], [1, 1, 2], 0.5, 0.1)
    assert result == pytest.approx([0.6, 0.5 + 1 / 30, 0.4 + 1 / 30], abs=1e-12)
    assert (result[0] + result[1] + 2 * result[2]) / 4 == pytest.approx(0.5, abs=1e-12)


def test_equal_ratios_or_zero_lambda_are_uniform():
    assert owl_sparsities([0.2, 0.2], [3, 5], 0.7, 0.1) == [0.7, 0.7]
    assert owl_sparsities([0.1, 0.3], [3, 5], 0.7, 0.0) == [0.7, 0.7]


def test_largest_remainder_rounds_the_largest_fractions_up_ties_to_the_lower_index():
    assert largest_remainder([1.5, 1.5, 1.0], 4) == [2, 1, 1]
    assert largest_remainder([2.8, 3.5, 4.2], 12) == [3, 4, 5]  # scaled 3.2, 4.0, 4.8


def test_profile_prunes_exactly_the_uniform_total():
    sizes = [[7], [7], [7]]
    assert uniform_prune_total(sizes, 0.5) == 12  # ceil(3.5) = 4 each
    profile = owl_profile([0.3, 0.2, 0.1], sizes, 0.5, 0.1)
    # real 0.4, 0.5, 0.6 -> 2.8, 3.5, 4.2 weights (10.5), scaled to 12 -> 3, 4, 5
    assert profile.sparsities == (3 / 7, 4 / 7, 5 / 7)
    # A layer's count spreads over its matrices by cumulative ceil.
    assert matrix_prune_counts(0.5, [3, 3]) == [2, 1]
    assert matrix_prune_counts(0.4, [10, 10]) == [4, 4]
    patterns = matrix_patterns(4 / 7, {"q": (1, 3), "k": (2, 2)})
    assert [round(p.sparsity * 3 if n == "q" else p.sparsity * 4) for n, p in patterns.items()] == [
        2,
        2,
    ]


def test_layer_sparsities_from_a_message_are_checked():
    assert check_layer_sparsities([0.5, 0], 2) == [0.5, 0.0]
    for bad in ([0.5], [0.5, 1.0], [0.5, float("nan")], [0.5, True], "0.5,0.5", [0.5, -0.1]):
        with pytest.raises(ValueError, match="layer-sparsities"):
            check_layer_sparsities(bad, 2)
    config = RunConfig.from_mapping({**TINY, **OWL})
    record = request_record(config, [1, 3], {1: 0.25, 3: 0.75, 2: 0.5})
    assert request_sparsities(record) == {1: 0.25, 3: 0.75}
    assert request_sparsities(request_record(config, [1, 3])) is None
    record["layer-sparsities"] = [0.25, 1.5]
    with pytest.raises(ValueError, match="not in"):
        request_sparsities(record)


# --------------------------------------------------------------------------- a model


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_an_owl_pruned_model_has_exactly_the_uniform_number_of_zeros(tiny_llama, pruner):
    model, tokenizer = tiny_llama
    segments = calibration_segments("python-docs", tokenizer, seqlen=64, num_segments=4, seed=0)
    profile = profile_model(model, segments, target=0.6, lam=0.08, owl_m=3.0)
    assert max(profile.sparsities) - min(profile.sparsities) > 0.05  # not uniform
    # Within lambda, up to the rounding to the uniform total (< one weight per matrix more).
    assert all(abs(s - 0.6) <= 0.08 + 29 / 36864 for s in profile.sparsities)
    # More outliers, lower sparsity.
    order = sorted(range(4), key=lambda i: profile.ratios[i])
    assert [profile.sparsities[i] for i in order] == sorted(profile.sparsities, reverse=True)
    patterns = profile_patterns(model, profile.sparsities)
    prune_model(
        model, segments, get_pruner(pruner), SparsityPattern(0.6), patterns=patterns, progress=False
    )
    assert zeros_of(model) == uniform_prune_total(matrix_sizes(model), 0.6)
    for layer in range(4):
        assert layer_sparsity(model, layer) == pytest.approx(profile.sparsities[layer], abs=1e-12)


# ---------------------------------------------------------------------- federations


def run(tmp_path, run_id, nodes=2, reply_filter=None, **overrides):
    config = make_config(tmp_path, **overrides)
    grid = InProcessGrid.simulation(client_app, nodes, {}, run_id=run_id, reply_filter=reply_filter)
    run_dir = run_federation(grid, config, run_id=run_id)
    report = json.loads((run_dir / "report.json").read_text())
    model, _ = load_model(str(run_dir / "model"))
    return report, model


def check_profiled(report, model, sparsity):
    profile = report["sparsity-profile"]["per-layer"]
    assert [row["layer"] for row in profile] == [0, 1, 2, 3]
    assert len({row["sparsity"] for row in profile}) > 1
    uniform = uniform_prune_total(matrix_sizes(model), sparsity)
    assert zeros_of(model) == uniform
    # What a uniform run reports (ceil per matrix: 0.7 x 2048 = 1433.6 prunes 1434).
    total = sum(sum(sizes) for sizes in matrix_sizes(model))
    assert report["sparsity"]["overall"] == pytest.approx(uniform / total, abs=1e-12)
    assert report["sparsity"]["overall"] == pytest.approx(sparsity, abs=2e-4)
    for row in profile:
        assert layer_sparsity(model, row["layer"]) == pytest.approx(row["sparsity"], abs=1e-6)
    return [row["sparsity"] for row in profile]


def test_fedspallm_with_resolve_prunes_every_layer_to_the_federations_profile(tmp_path):
    report, model = run(tmp_path, 301, sparsity=0.6, **{"standalone-eval": False})
    check_profiled(report, model, 0.6)
    assert report["layerwise"]["resolve"] is True


def test_global_calibration_with_resolve_hands_down_layers_at_their_own_sparsity(tmp_path):
    overrides = {"calibration": "global", "standalone-eval": False}
    report, model = run(tmp_path, 308, sparsity=0.7, **overrides)
    check_profiled(report, model, 0.7)
    assert report["layerwise"]["rounds"] == 5  # 4 layers, pipelined re-solve


def test_opt_layers_get_their_profile_too(tiny_opt):
    model, tokenizer = tiny_opt
    segments = calibration_segments("python-docs", tokenizer, seqlen=64, num_segments=4, seed=0)
    profile = profile_model(model, segments, target=0.5, lam=0.08, owl_m=3.0)
    patterns = profile_patterns(model, profile.sparsities)
    prune_model(
        model,
        segments,
        get_pruner("wanda"),
        SparsityPattern(0.5),
        patterns=patterns,
        progress=False,
    )
    assert zeros_of(model) == uniform_prune_total(matrix_sizes(model), 0.5)


def test_fedspallm_one_shot_fedavg_and_fedprllm_hit_the_profile(tmp_path):
    for strategy in ("fedspallm", "fedavg", "fedprllm"):
        report, model = run(
            tmp_path / strategy, 302, strategy=strategy, pruner="wanda", sparsity=0.6, resolve=False
        )
        check_profiled(report, model, 0.6)


def test_exact_and_centralized_agree_on_the_pooled_profile(tmp_path):
    exact_report, exact_model = run(tmp_path / "exact", 303, strategy="exact", pruner="wanda")
    central_report, central_model = run(
        tmp_path / "central", 304, strategy="centralized", pruner="wanda"
    )
    exact_profile = check_profiled(exact_report, exact_model, 0.5)
    central_profile = check_profiled(central_report, central_model, 0.5)
    # Same pooled column norms (summed in another order): the same profile.
    assert exact_profile == pytest.approx(central_profile, abs=1e-4)


def test_a_hostile_profile_reply_is_rejected_and_the_run_goes_on(tmp_path):
    def lie(node, reply):
        if node != 2 or reply.metadata.message_type != "train.profile":
            return reply
        record = reply.content.config_records[PROFILE_KEY]
        forged = ConfigRecord({"outliers": [10**9] * 4, "totals": list(record["totals"])})
        content = RecordDict({PROFILE_KEY: forged})
        return Message(content, reply_to=_original(grid, reply))

    config = make_config(tmp_path, strategy="fedspallm", resolve=False, pruner="wanda")
    grid = InProcessGrid.simulation(client_app, 3, {}, run_id=305, reply_filter=lie)
    model, _ = load_model(config.model)
    strategy = MergeStrategy(model, config, rule="fedspallm")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1)
    rejected = strategy.accounting.rejected
    assert [(r["round"], r["node"]) for r in rejected] == [(0, 2)]
    assert "outlier count" in rejected[0]["reason"]
    assert strategy.profile is not None and not strategy.remaining
    assert zeros_of(strategy.model) == uniform_prune_total(matrix_sizes(model), 0.5)


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        (None, "no 'profile' ConfigRecord"),
        ({"outliers": [1, 2, 3, 4]}, "unexpected keys"),
        ({"outliers": [1, 2, 3], "totals": [36864] * 3}, "list of 4 ints"),
        ({"outliers": [1.0, 2.0, 3.0, 4.0], "totals": [36864] * 4}, "not an integer"),
        ({"outliers": [True] * 4, "totals": [36864] * 4}, "not an integer"),
        ({"outliers": [1, 2, 3, 4], "totals": [36863] * 4}, "weight counts"),
        ({"outliers": [-1, 2, 3, 4], "totals": [36864] * 4}, "outside"),
    ],
)
def test_malformed_counts_are_refused(record, fragment):
    content = RecordDict({} if record is None else {PROFILE_KEY: ConfigRecord(record)})
    reply = SimpleNamespace(content=content)  # only its content is read
    with pytest.raises(RejectedReply, match=fragment):
        checked_counts(reply, [36864] * 4)


def test_no_valid_profile_reply_fails_the_run_naming_the_reasons(tmp_path):
    def error(node, reply):
        if reply.metadata.message_type == "train.profile":
            return Message(RecordDict({}), reply_to=_original(grid, reply))
        return reply

    config = make_config(tmp_path, strategy="exact", pruner="wanda")
    grid = InProcessGrid.simulation(client_app, 2, {}, run_id=306, reply_filter=error)
    model, _ = load_model(config.model)
    names = {n: NodeConfig.from_mapping(c.node_config).name for n, c in grid.contexts.items()}
    strategy = Exact(model, config, node_names=names)
    with pytest.raises(
        RuntimeError, match="no valid profile reply.*node 1: reply has no 'payload'"
    ):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)


def _original(grid: InProcessGrid, reply: Message) -> Message:
    """The request ``reply`` answers (to build a forged reply to it)."""
    return next(m for m in grid.sent if m.metadata.message_id == reply.metadata.reply_to_message_id)


def test_standalone_clients_prune_to_their_own_profiles(tmp_path):
    report, _model = run(tmp_path, 307, strategy="standalone", pruner="wanda", sparsity=0.6)
    own = report["sparsity-profile"]["per-client"]
    assert set(own) == {"1", "2"} and own["1"] != own["2"]  # each client's own data
    assert report["rejected"] == []


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"sparsity-profile": "outlier"}, "sparsity-profile must be one of"),
        ({"owl-lambda": 0.5}, r"owl-lambda must be in \[0, min"),
        ({"owl-lambda": -0.01}, "owl-lambda"),
        ({"sparsity": 0.95}, "owl-lambda"),  # 0.08 >= 1 - 0.95
        ({"owl-m": 0}, "owl-m must be positive"),
        ({"pattern": "2:4"}, "fixes every matrix's ratio"),
        ({"strategy": "exact", "secure-aggregation": True}, "secure-aggregation"),
    ],
)
def test_bad_owl_settings_fail_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_mapping({**TINY, **OWL, **overrides})


def test_uniform_runs_ignore_owl_lambda_and_owl_runs_refuse_to_resume():
    RunConfig.from_mapping({**TINY, "sparsity": 0.95})  # uniform: owl-lambda does not apply
    config = RunConfig.from_mapping({**TINY, **OWL, "resolve": False})
    assert "owl" in STRATEGIES["fedspallm"].resume_refusal(config)
    assert STRATEGIES["fedspallm"].resume_refusal(RunConfig(resolve=False)) is None
