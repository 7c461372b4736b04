"""Federated recovery rounds: the clients fine-tune the global sparse model on their shards and
the server adds the mean of their kept values' changes, keeping every zero.

The fine-tuning itself is tested in ``test_recovery.py``; here, the rounds: what the server
ends with is the pruned model plus the mean of what each client alone computes from it, the
masks do not move (unstructured and 2:4), a hostile or failing client is rejected while the
round goes on, and bad settings fail before any work.
"""

import json

import pytest
import torch
from flwr.app import Message
from safetensors.torch import load

from client_app import recovery_task
from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig, load_recovery_shard
from fedspallm_strategy.strategies.recovery_rounds import ADAM_STEP_BOUND, change_limit
from fedspallm_strategy.wire.protocol import DELTAS_KEY, bytes_record, record_bytes
from fedspallm_strategy.wire.values_payload import Expected, decode_values, encode_values
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.models import load_model
from llm_pruning.recovery import recover, teacher_targets
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {
    "model": "tiny-llama",
    "seqlen": 32,
    "calib-samples": 4,
    "eval-windows": 1,
    "standalone-eval": False,
    "payload-dtype": "float32",  # the server's model is compared value for value below
    "recovery-steps": 3,
    "recovery-samples": 4,
    "recovery-lr": 1e-3,
}


def config_of(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **overrides})


def matrices(run_dir) -> dict[str, torch.Tensor]:
    model, _ = load_model(str(run_dir / "model"))
    return {
        name: linear.weight.data.clone()
        for layer in range(num_layers(model))
        for name, linear in prunable_weights(model, layer).items()
    }


def run(config, grid=None):
    grid = grid or InProcessGrid.simulation(client_app, 2, {})
    run_dir = run_federation(grid, config, run_id=5)
    return run_dir, json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """The same run without recovery: the model the recovery rounds start from."""
    tmp = tmp_path_factory.mktemp("pruned")
    run_dir, _ = run(config_of(tmp, **{"recovery-rounds": 0}))
    return matrices(run_dir)


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_one_round_adds_the_mean_of_what_each_client_computes_alone(tmp_path, pruned, distill):
    config = config_of(tmp_path, **{"recovery-rounds": 1, "recovery-distill": distill})
    run_dir, report = run(config)
    assert report["rejected"] == []
    assert report["recovery"]["per-round"][0]["clients"] == 2
    assert report["recovery"]["distill"] == distill
    # Each client alone: the dense model's targets (where distilling), then the pruned model,
    # its own windows, the same settings.
    deltas = []
    for partition in (0, 1):
        model, tokenizer = load_model(config.model)
        node = NodeConfig(partition_id=partition, num_partitions=2)
        windows = load_recovery_shard(config, node, tokenizer)
        assert windows.shape == (4, 32)
        teacher = teacher_targets(model, windows, config.recovery_settings)
        assert (teacher is None) == (distill == 0)
        with torch.no_grad():
            for layer in range(num_layers(model)):
                for name, linear in prunable_weights(model, layer).items():
                    linear.weight.copy_(pruned[name])
        deltas.append(recover(model, windows, config.recovery_settings, teacher=teacher).deltas)
    found = matrices(run_dir)
    for name, before in pruned.items():
        keep = before != 0
        assert torch.equal(found[name] != 0, keep), f"{name}: the mask moved"
        expected = before[keep] + (deltas[0][name] + deltas[1][name]) / 2
        torch.testing.assert_close(found[name][keep], expected, rtol=1e-5, atol=1e-7)
    moved = sum(float((found[n] - pruned[n]).abs().sum()) for n in pruned)
    assert moved > 0  # recovery changed the model
    assert "global-before-recovery" in report["perplexity"]
    up = report["communication"]["per_round"][str(report["recovery"]["per-round"][0]["round"])]
    kept = sum(int((w != 0).sum()) for w in pruned.values())
    # float32 deltas of every kept weight, plus a safetensors header per matrix
    assert all(4 * kept <= size < 4 * kept + 200 * len(pruned) for size in up["bytes_up"].values())


@pytest.mark.parametrize(
    ("overrides", "groups", "lr"),
    [
        ({"pattern": "2:4", "recovery-method": "lora", "recovery-lr": 1e-2}, 4, 1e-2),
        ({}, None, 1e-3),
        # auto travels to the clients as the word, and each side reads lora's own rate
        ({"recovery-method": "lora", "recovery-lr": "auto"}, None, 1e-3),
    ],
)
def test_recovery_keeps_the_exact_sparsity_and_pattern(tmp_path, overrides, groups, lr):
    config = config_of(tmp_path, **{"recovery-rounds": 2, "payload-dtype": "auto", **overrides})
    run_dir, report = run(config)
    assert report["rejected"] == []
    assert report["recovery"]["lr"] == lr
    assert [r["clients"] for r in report["recovery"]["per-round"]] == [2, 2]
    for name, weight in matrices(run_dir).items():
        kept = weight != 0
        assert int(kept.sum()) == weight.numel() // 2, name  # 50 %: half of every matrix
        if groups:
            per_group = kept.reshape(weight.shape[0], -1, groups).sum(-1)
            assert bool((per_group == 2).all()), f"{name} breaks 2:4"


def tamper(node: int, reply: Message) -> Message | None:
    """Node 1's recovery reply scaled x1000; node 2's lost (it dropped out)."""
    if reply.has_error() or DELTAS_KEY not in reply.content.array_records:
        return reply
    if node == 2:
        return None
    scaled = {
        name.removeprefix("values/"): tensor * 1000
        for name, tensor in load(record_bytes(reply.content, DELTAS_KEY)).items()
    }
    if node == 1:
        reply.content[DELTAS_KEY] = bytes_record(encode_values(scaled), DELTAS_KEY)
    return reply


def test_a_hostile_reply_is_rejected_and_the_round_goes_on(tmp_path, pruned):
    config = config_of(tmp_path, **{"recovery-rounds": 1})
    grid = InProcessGrid.simulation(client_app, 3, {}, reply_filter=tamper)
    run_dir, report = run(config, grid)
    rejected = {r["node"]: r["reason"] for r in report["rejected"]}
    assert "AdamW" in rejected[1]
    assert rejected[2] == "no reply in time"
    assert report["recovery"]["per-round"][0]["clients"] == 1  # node 3's changes only
    assert report["perplexity"]["global"]["python-docs"] < 1e6


def test_the_masked_bound_is_adams_own():
    config = RunConfig(recovery_rounds=1, recovery_lr=1e-4, recovery_steps=10)
    assert change_limit(config) == pytest.approx(ADAM_STEP_BOUND * 1e-3)
    assert ADAM_STEP_BOUND > 0.1 / (1 - 0.999) ** 0.5  # AdamW's bound with default betas


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        ({}, 1e-4),  # auto, masked
        ({"recovery-method": "lora"}, 1e-3),  # auto, lora: ten times masked's
        ({"recovery-lr": "auto", "recovery-method": "lora"}, 1e-3),
        ({"recovery-lr": 3e-4, "recovery-method": "lora"}, 3e-4),  # a number wins
        ({"recovery-lr": 1}, 1.0),  # a TOML integer is a number too
    ],
)
def test_recovery_lr_auto_is_the_methods_own(overrides, lr):
    config = RunConfig.from_mapping({"recovery-rounds": 1, **overrides})
    assert config.recovery_settings.lr == lr
    assert change_limit(config) == pytest.approx(ADAM_STEP_BOUND * lr * config.recovery_steps)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"recovery-rounds": -1}, "recovery-rounds"),
        ({"recovery-method": "qlora"}, "recovery-method"),
        ({"recovery-steps": 0}, "recovery-steps"),
        ({"recovery-samples": 0}, "recovery-samples"),
        ({"recovery-lr": 0.0}, "recovery-lr"),
        ({"recovery-lr": float("nan")}, "recovery-lr"),
        ({"recovery-lr": "fast"}, "recovery-lr"),
        ({"recovery-lr": True}, "recovery-lr"),
        ({"recovery-distill": 1.5}, "recovery-distill"),
        ({"recovery-distill": -0.5}, "recovery-distill"),
        ({"recovery-windows": "new"}, "recovery-windows"),
        ({"recovery-rounds": 1, "dtype": "bfloat16"}, "recovery-method"),
        ({"recovery-rounds": 1, "strategy": "standalone"}, "recovery-rounds"),
    ],
)
def test_bad_recovery_settings_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_mapping(overrides)


def test_deltas_travel_as_values_under_the_known_masks():
    deltas = {"w": torch.tensor([0.5, -0.25, 0.125])}
    decoded, _ = decode_values(encode_values(deltas), {"w": Expected(3)})
    assert torch.equal(decoded["w"], deltas["w"])


def _windows_of_rounds(monkeypatch, config, node, rounds) -> list[torch.Tensor]:
    """The windows a node's recovery trains on when asked for each of ``rounds``."""
    seen = []

    class Captured(Exception):
        pass

    def capture(model, windows, *args, **kwargs):
        seen.append(windows)
        raise Captured

    monkeypatch.setattr(recovery_task, "apply_global_layers", lambda *args, **kwargs: None)
    monkeypatch.setattr(recovery_task, "recover", capture)
    for recovery_round in rounds:
        with pytest.raises(Captured):
            recovery_task.recover_global(config, node, b"", recovery_round)
    return seen


def test_fresh_windows_give_each_round_its_own_block_of_one_draw(tmp_path, monkeypatch):
    """recovery-windows=fresh, 2 rounds of 4 windows: one draw of 8 from the node's shard,
    round 1 on the first 4, round 2 on the last 4. The draw's first 4 are the 4 that
    recovery-windows=same trains on every round (one seeded stream of starts)."""
    node = NodeConfig(partition_id=1, num_partitions=2)
    fresh = config_of(tmp_path, **{"recovery-rounds": 2, "recovery-windows": "fresh"})
    same = config_of(tmp_path, **{"recovery-rounds": 2, "recovery-windows": "same"})
    _, tokenizer = load_model(fresh.model)
    every = load_recovery_shard(fresh, node, tokenizer)
    assert every.shape == (8, 32)
    first, second = _windows_of_rounds(monkeypatch, fresh, node, (1, 2))
    assert torch.equal(first, every[:4]) and torch.equal(second, every[4:])
    assert not torch.equal(first, second)
    for windows in _windows_of_rounds(monkeypatch, same, node, (1, 2)):
        assert torch.equal(windows, every[:4])
    assert torch.equal(load_recovery_shard(same, node, tokenizer), every[:4])
    with pytest.raises(ValueError, match="recovery round 3 is not in 1..2"):
        load_recovery_shard(fresh, node, tokenizer, 3)


def test_the_server_numbers_the_recovery_rounds_from_one(tmp_path, monkeypatch):
    """Each node is asked for recovery rounds 1 and 2, after the pruning's own rounds."""
    asked = []
    real = recovery_task.recover_global

    def record(config, node, global_layers, recovery_round):
        asked.append((node.partition_id, recovery_round))
        return real(config, node, global_layers, recovery_round)

    monkeypatch.setattr("client_app.app.recover_global", record)
    config = config_of(tmp_path, **{"recovery-rounds": 2, "recovery-windows": "fresh"})
    _, report = run(config)
    assert sorted(asked) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert [entry["clients"] for entry in report["recovery"]["per-round"]] == [2, 2]
    assert report["rejected"] == []
