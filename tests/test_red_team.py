"""Red-team findings: replies and settings that got through the server's checks.

1. one kept value with a flipped exponent bit, inside the whole-matrix bound;
2. every kept value zeroed (a relative change of exactly 1.0, the bound at 50 %);
3. ``exact`` statistics scaled ×1e6 / ×1e30 / to float32-max (finite, Cauchy-Schwarz-clean);
4. an unknown ``calib-data`` name, found only after every node loaded the model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from client_app.app import app as client_app
from client_app.exact_task import exact_statistics
from client_app.task import prune_layers
from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig
from fedspallm_strategy.merge.plausibility import (
    change_bound,
    check_kept_values,
    entry_factor,
    relative_change,
)
from fedspallm_strategy.strategies.exact import Exact
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from fedspallm_strategy.wire.stats_payload import decode_statistics, encode_statistics
from llm_pruning.models import load_model
from llm_pruning.pruners import HessianStats, SparsityPattern, get_pruner
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid, _set_task_identity

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # shared with the bench
from attacks import LAYERS, forge, payload_content, reply, split  # noqa: E402

# float32 on the wire: the attacks and the expected merges are written for the model's dtype.
BASE = {
    "model": "tiny-llama",
    "seqlen": 64,
    "calib-samples": 2,
    "resolve": False,
    "payload-dtype": "float32",
}


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


@pytest.fixture(scope="module")
def honest():
    """Honest SparseGPT 50 % replies of two nodes (tiny-llama, every layer)."""
    config = config_of()
    return {
        node: prune_layers(
            config, NodeConfig(partition_id=node - 1, num_partitions=2), LAYERS
        ).payload
        for node in (1, 2)
    }


def aggregate(model, dense, config, contents):
    """One fedspallm round over ``contents`` on the dense model: (strategy, weights)."""
    for name, parameter in model.named_parameters():
        parameter.data.copy_(dense[name])
    strategy = MergeStrategy(model, config, rule=config.strategy)
    strategy.assignments = {node: LAYERS for node in contents}
    strategy.aggregate_train(1, [reply(node, c) for node, c in contents.items()])
    return strategy, {n: p.detach().clone() for n, p in model.named_parameters()}


def rejections(strategy, node: int) -> list[str]:
    return [r["reason"] for r in strategy.accounting.rejected if r["node"] == node]


# ------------------------------------------------------------- 1. one entry's exponent bit
def test_one_flipped_exponent_bit_inside_the_matrix_bound_is_rejected(honest, model, dense):
    """As found on SmolLM2 (-0.050 -> -0.796, dense max 0.077): exponent bit 2 (x16) of one
    kept value. The matrix's relative change stays inside its bound: only a per-entry bound
    sees it."""
    config = config_of()
    _, values, masks = split(honest[2])
    name = "model.layers.1.mlp.down_proj.weight"
    kept, dense_kept = values[name].clone(), dense[name][masks[name]]
    raw = kept.view(torch.int32)
    candidates = [
        i
        for i in range(kept.numel())
        if 0.5 * dense_kept.abs().max() < kept[i].abs() < 0.8 * dense_kept.abs().max()
        and not raw[i] & (1 << 25)
    ]
    index = candidates[0]
    raw[index] ^= 1 << 25  # exponent + 4: the value x16
    assert kept[index].abs() > 8 * dense_kept.abs().max()
    bound = change_bound(config.sparsity_pattern, config.max_relative_change)
    assert relative_change(kept, dense_kept) <= bound  # the matrix bound lets it through
    values[name] = kept
    contents = {1: payload_content(honest[1]), 2: payload_content(forge(values, masks))}
    strategy, _ = aggregate(model, dense, config, contents)
    (reason,) = rejections(strategy, 2)
    assert name in reason and "entry" in reason
    assert rejections(strategy, 1) == []


@pytest.mark.parametrize(
    ("pattern", "moved_rms", "refused"),
    [("unstructured", 30.0, True), ("2:4", 30.0, False), ("2:4", 45.0, True)],
)
def test_the_per_entry_bound_is_wider_under_n_m(pattern, moved_rms, refused):
    """6,400 kept values of +-1 (RMS 1; the matrix bound is 1 at 50 %), one moved by
    ``moved_rms``: the matrix changes by moved / sqrt(6400), 30 / 80 = 0.375 or 45 / 80 = 0.56,
    inside its bound, so only the per-entry bound decides: 20 RMS unstructured refuses 30,
    N:M's 40 lets 30 through and refuses 45."""
    parsed = SparsityPattern.parse(pattern, 0.5)
    assert entry_factor(parsed) == (40.0 if parsed.m else 20.0)
    dense_kept = torch.ones(6400)
    dense_kept[::2] = -1.0
    kept = dense_kept.clone()
    kept[7] += moved_rms
    bound = change_bound(parsed, 1.0)
    assert bound == 1.0
    if refused:
        with pytest.raises(PayloadError, match="kept entry 7 moved"):
            check_kept_values("w", kept, dense_kept, bound, entry_factor(parsed))
    else:
        check_kept_values("w", kept, dense_kept, bound, entry_factor(parsed))


def test_honest_replies_pass_the_per_entry_bound(honest, model, dense):
    contents = {n: payload_content(honest[n]) for n in (1, 2)}
    strategy, _ = aggregate(model, dense, config_of(), contents)
    assert strategy.accounting.rejected == []


# ------------------------------------------------------------------ 2. kept values zeroed
@pytest.mark.parametrize("factor", [0.0, 1e-6])
def test_kept_values_zeroed_or_vanishing_are_rejected(factor, honest, model, dense):
    config = config_of()
    _, values, masks = split(honest[2])
    name = next(iter(values))
    # Exactly 1.0 (zeroed) or just under: inside the inclusive bound of 1.0 at 50 %.
    assert relative_change(values[name] * factor, dense[name][masks[name]]) <= 1.0
    vanished = {n: v * factor for n, v in values.items()}
    contents = {1: payload_content(honest[1]), 2: payload_content(forge(vanished, masks))}
    strategy, _ = aggregate(model, dense, config, contents)
    reasons = rejections(strategy, 2)
    assert len(reasons) == 1 and "vanish" in reasons[0]
    assert rejections(strategy, 1) == []


def test_the_plausibility_check_itself_refuses_zeroed_kept_values():
    dense_kept = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.02
    bound = change_bound(SparsityPattern.parse("unstructured", 0.5), 1.0)
    with pytest.raises(PayloadError, match="vanish"):
        check_kept_values("w", torch.zeros(1000), dense_kept, bound)
    check_kept_values("w", dense_kept * 1.05, dense_kept, bound)  # an honest-like change


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_an_honest_reply_with_dead_input_columns_is_still_accepted(pattern):
    """SparseGPT zeroes the weights of an input that is always 0; where the pattern keeps
    some of them (2:4 with three dead inputs in a group; a block more than half dead at
    50 %) the reply holds exact zeros among its kept values."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 64, generator=generator) * 0.02
    inputs = torch.randn(256, 64, generator=generator)
    dead = [0, 1, 2] if pattern == "2:4" else list(range(0, 64, 3)) + list(range(1, 40, 3))
    inputs[:, dead] = 0.0
    stats = HessianStats(64)
    stats.add(inputs)
    sparsity_pattern = SparsityPattern.parse(pattern, 0.5)
    pruned, keep = get_pruner("sparsegpt").prune(weight, stats, sparsity_pattern)
    kept = pruned[keep]
    assert int((kept == 0).sum()) > 0  # dead inputs among the kept entries
    check_kept_values("w", kept, weight[keep], change_bound(sparsity_pattern, 1.0))


# ------------------------------------------------------------------ 3. scaled statistics
@pytest.fixture(scope="module")
def exact_stats(model, tmp_path_factory):
    """Honest layer-0 statistics of three nodes, per pruner."""
    cache = str(tmp_path_factory.mktemp("cache"))
    out = {}
    for pruner in ("sparsegpt", "wanda"):
        config = config_of(strategy="exact", pruner=pruner)
        shared = [list(group) for group in Exact(model, config).plan.shared]
        out[pruner] = {
            node: exact_statistics(
                config,
                NodeConfig(partition_id=node - 1, num_partitions=3, cache_dir=cache),
                run_id=11,
                layer_ids=[0],
                shared=shared,
                previous_layers=[],
                previous=None,
            ).payload
            for node in (1, 2, 3)
        }
    return out


def forged(data: bytes, change) -> bytes:
    _, entries = decode_statistics(data)
    for stats, _covers in entries.values():
        if isinstance(stats, HessianStats):
            stats.xtx = change(stats.xtx)
        else:
            stats.sq_norm = change(stats.sq_norm)
    return encode_statistics(entries)


def run_exact(model, dense, config, contents):
    for name, parameter in model.named_parameters():
        parameter.data.copy_(dense[name])
    strategy = Exact(model, config)
    strategy.assignments = {node: [0] for node in contents}
    strategy.aggregate_train(1, [reply(node, c) for node, c in contents.items()])
    return strategy, {n: p.detach().clone() for n, p in model.named_parameters()}


ATTACKS = {
    "x1e6": lambda sums: sums * 1e6,
    "x1e30": lambda sums: sums * 1e30,
    "float32-max": lambda sums: torch.full_like(sums, torch.finfo(torch.float32).max),
}


@pytest.mark.parametrize("pruner", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("clients", [2, 3])
def test_exact_statistics_out_of_scale_are_rejected_and_the_round_goes_on(
    clients, attack, pruner, exact_stats, model, dense
):
    config = config_of(strategy="exact", pruner=pruner)
    stats = exact_stats[pruner]
    honest_nodes = list(range(1, clients))
    contents = {n: payload_content(stats[n]) for n in honest_nodes}
    _, honest_only = run_exact(model, dense, config, dict(contents))
    contents[clients] = payload_content(forged(stats[clients], ATTACKS[attack]))
    strategy, merged = run_exact(model, dense, config, contents)
    reasons = rejections(strategy, clients)
    assert len(reasons) == 1 and "per token" in reasons[0], reasons
    assert all(rejections(strategy, n) == [] for n in honest_nodes)
    assert strategy.contributors[1] == honest_nodes  # the round went on without it
    assert all(torch.equal(merged[n], honest_only[n]) for n in merged)


@pytest.mark.parametrize("pruner", ["sparsegpt", "wanda"])
def test_honest_exact_statistics_all_pass_the_scale_check(pruner, exact_stats, model, dense):
    config = config_of(strategy="exact", pruner=pruner)
    contents = {n: payload_content(exact_stats[pruner][n]) for n in (1, 2, 3)}
    strategy, _ = run_exact(model, dense, config, contents)
    assert strategy.accounting.rejected == []
    assert strategy.contributors[1] == [1, 2, 3]


# ------------------------------------------------------------------- 4. unknown calib-data
@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def test_an_unknown_calib_data_name_fails_before_any_node_works(offline, tmp_path):
    grid = InProcessGrid.simulation(client_app, 2, {})
    config = RunConfig.from_mapping(
        {
            **BASE,
            "eval-windows": 1,
            "output-dir": str(tmp_path),
            "calib-data": "nonexistent-dataset",
        }
    )
    with pytest.raises(ConfigError, match="^calib-data: .*nonexistent-dataset"):
        run_federation(grid, config, run_id=1)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]


def test_a_hub_dataset_the_server_cannot_verify_fails_on_the_nodes_naming_calib_data(
    offline, tmp_path
):
    """``owner/name`` may be a hub dataset: offline, the server lets it through, and the
    nodes' error names the key."""
    grid = InProcessGrid.simulation(client_app, 2, {})
    config = RunConfig.from_mapping(
        {
            **BASE,
            "eval-windows": 1,
            "output-dir": str(tmp_path),
            "calib-data": "someone/no-such-dataset",
        }
    )
    with pytest.raises(RuntimeError, match="calib-data: could not load the dataset"):
        run_federation(grid, config, run_id=1)
