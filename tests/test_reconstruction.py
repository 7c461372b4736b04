"""``reconstruction``: the run-config key that sets kept values by the exact masked least squares.

The solver itself is tested in ``test_lsq.py``; here, that the key reaches every place values
are set (a client's pruning, the re-solve, ``exact`` on the summed statistics, ``centralized``)
and that one client of a federation gets what pruning its shard alone with ``lsq`` gives.
"""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig, load_shard
from fedspallm_strategy.strategies.layerwise import LayerwiseMerge
from fedspallm_strategy.wire.protocol import request_from_record, request_record
from llm_pruning.engine import prune_model
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.models import load_model
from llm_pruning.pruners import get_pruner
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {
    "model": "tiny-llama",
    "seqlen": 64,
    "calib-samples": 4,
    "eval-windows": 1,
    "reconstruction": "lsq",
    "payload-dtype": "float32",  # compared with a local prune below, value for value
}


def config_of(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **overrides})


def prunable(model) -> dict[str, torch.Tensor]:
    return {
        name: linear.weight.data
        for layer in range(num_layers(model))
        for name, linear in prunable_weights(model, layer).items()
    }


def test_lsq_needs_a_pruner_that_sets_values_and_a_known_name():
    with pytest.raises(ConfigError, match="reconstruction"):
        RunConfig.from_mapping({"reconstruction": "lsq", "pruner": "wanda", "resolve": False})
    with pytest.raises(ConfigError, match="reconstruction"):
        RunConfig.from_mapping({"reconstruction": "admm"})
    received, _ = request_from_record(request_record(RunConfig(reconstruction="lsq"), [0]))
    assert received.reconstruction == "lsq"  # the clients solve as the server asked


@pytest.mark.parametrize("overrides", [{}, {"calibration": "global"}])
def test_one_client_with_lsq_gets_its_own_shard_pruned_with_lsq(tmp_path, overrides):
    config = config_of(tmp_path, **overrides)
    model, tokenizer = load_model(config.model)
    grid = InProcessGrid(client_app, {1: {"partition-id": 0, "num-partitions": 1}}, {})
    strategy = LayerwiseMerge(model, config, node_budgets={1: None}, rule=config.strategy)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)
    assert strategy.accounting.rejected == []
    alone, _ = load_model(config.model)
    segments = load_shard(config, NodeConfig(partition_id=0, num_partitions=1), tokenizer)
    sparsegpt = get_pruner("sparsegpt")
    prune_model(alone, segments, sparsegpt, config.sparsity_pattern, reconstruction="lsq")
    found, expected = prunable(strategy.model), prunable(alone)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["exact", "centralized"])
def test_exact_and_centralized_solve_with_lsq_at_the_exact_sparsity(tmp_path, strategy):
    config = config_of(tmp_path, strategy=strategy, sparsity=0.6)
    run_dir = run_federation(InProcessGrid.simulation(client_app, 2, {}), config, run_id=71)
    report = json.loads((run_dir / "report.json").read_text())
    assert report.get("rejected", []) == []  # centralized reads the shards: no replies
    model, _ = load_model(str(run_dir / "model"))
    for name, weight in prunable(model).items():
        assert int((weight == 0).sum()) == int(np.ceil(0.6 * weight.numel() - 1e-9)), name
