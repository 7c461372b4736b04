"""Run-config and node-config validation: every bad value fails naming its key."""

import math

import pytest

from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig


def test_defaults_match_pyproject():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    config = RunConfig.from_mapping(declared)
    assert config == RunConfig()
    # Every key a user can set is declared, so `--run-config` can override it.
    assert set(declared) == set(RunConfig().as_dict())


def test_the_config_reference_documents_every_key():
    from pathlib import Path

    reference = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    missing = [key for key in RunConfig().as_dict() if f"| `{key}` |" not in reference]
    assert not missing, f"run-config keys missing from docs/config.md: {missing}"


def test_values_are_coerced():
    config = RunConfig.from_mapping(
        {
            "sparsity": 1 / 2,
            "seqlen": 128.0,
            "eval-data": "a.txt, b.txt",
            "compare-centralized": "true",
        }
    )
    assert config.seqlen == 128 and isinstance(config.seqlen, int)
    assert config.eval_data == ("a.txt", "b.txt")
    assert config.compare_centralized is True


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("sparsity", 1.2, "sparsity"),
        ("sparsity", -0.1, "sparsity"),
        ("sparsity", "half", "sparsity"),
        ("pattern", "3:2", "pattern"),
        ("pattern", "diagonal", "pattern"),
        ("strategy", "fedsgd", "strategy must be one of"),
        ("pruner", "obs", "pruner must be one of"),
        ("partition", "random", "partition must be one of"),
        ("seqlen", 1, "seqlen"),
        ("seqlen", 12.5, "seqlen must be an integer"),
        ("calib-samples", 0, "calib-samples"),
        ("num-rounds", 0, "num-rounds"),
        ("layer-fraction", 0.0, "layer-fraction"),
        ("layer-fraction", 1.5, "layer-fraction"),
        ("eval-windows", -1, "eval-windows"),
        ("device", "gpu", "device"),
        ("round-timeout", 0, "round-timeout"),
        ("max-payload-mb", -1, "max-payload-mb"),
        ("max-payload-mb", math.inf, "max-payload-mb must be a finite number"),
        ("round-timeout", -math.inf, "round-timeout must be a finite number"),
        ("sparsity", math.nan, "sparsity must be a finite number"),
        ("seqlen", math.inf, "seqlen must be an integer"),
        ("seed", -1, r"seed must be in \[0, 2\*\*63\)"),
        ("seed", 2**63, r"seed must be in \[0, 2\*\*63\)"),
        ("compare-centralized", "maybe", "compare-centralized"),
        ("model", "  ", "model"),
        ("eval-data", " , ", "eval-data"),
        ("no-such-key", 1, "unknown run-config key"),
    ],
)
def test_bad_value_names_its_key(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_mapping({key: value})


def test_seed_takes_what_numpy_and_torch_take():
    import numpy as np
    import torch

    largest = RunConfig.from_mapping({"seed": 2**63 - 1}).seed
    np.random.default_rng(largest)
    torch.Generator().manual_seed(largest)


def test_nm_pattern_with_incompatible_sparsity():
    with pytest.raises(ConfigError, match="2:4.*0.5"):
        RunConfig.from_mapping({"pattern": "2:4", "sparsity": 0.7})
    assert RunConfig.from_mapping({"pattern": "2:4", "sparsity": 0.5}).sparsity_pattern.n == 2


def test_node_config():
    node = NodeConfig.from_mapping({"partition-id": 2, "num-partitions": 4, "layer-budget": 3})
    assert (node.partition_id, node.num_partitions, node.layer_budget) == (2, 4, 3)
    assert NodeConfig.from_mapping({}).data_path is None
    with pytest.raises(ConfigError, match="partition-id"):
        NodeConfig.from_mapping({"partition-id": 4, "num-partitions": 4})
    with pytest.raises(ConfigError, match="layer-budget"):
        NodeConfig.from_mapping({"layer-budget": 0})
    with pytest.raises(ConfigError, match="device"):
        NodeConfig.from_mapping({"device": "tpu"})
    # A typo would be lost silently: it fails, naming it and the keys a node config takes.
    with pytest.raises(
        ConfigError, match="unknown node-config key.s. layer_budget; known keys: .*layer-budget"
    ):
        NodeConfig.from_mapping({"partition-id": 0, "num-partitions": 2, "layer_budget": 1})
