"""A member's own model in a run with recovery: it recovers alone, with the federation's steps,
and the report shows it beside the members' pruned models."""

import copy
import dataclasses
import json

import pytest
import torch

from client_app.app import app as client_app
from client_app.own_model import eager_copy, own_perplexities, own_recovered_perplexities
from fedspallm_strategy.config import NodeConfig, RunConfig, load_recovery_shard
from fedspallm_strategy.wire.protocol import STANDALONE_RECOVERED_METRIC
from llm_pruning.data import eval_tokens
from llm_pruning.engine import prune_model
from llm_pruning.evaluate import perplexity
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import layer_tensors
from llm_pruning.models import load_model
from llm_pruning.pruners import SparsityPattern, get_pruner
from llm_pruning.recovery import recover, teacher_targets
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {
    "model": "tiny-llama",
    "seqlen": 32,
    "calib-samples": 4,
    "eval-windows": 1,
    "recovery-rounds": 2,
    "recovery-steps": 3,
    "recovery-samples": 4,
    "recovery-lr": 1e-3,
}


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_a_member_recovers_a_copy_with_every_round_of_steps(tmp_path, distill):
    config = RunConfig.from_mapping(
        {**TINY, "recovery-distill": distill, "output-dir": str(tmp_path)}
    )
    node = NodeConfig(partition_id=1, num_partitions=2)
    model, tokenizer = load_model(config.model, lazy=True)
    windows = load_recovery_shard(config, node, tokenizer)
    prune_model(model, windows, get_pruner("magnitude"), SparsityPattern(0.5), progress=False)
    pruned = _pruned_matrices(model)

    scores = own_recovered_perplexities(model, tokenizer, config, node, "cpu")

    # By hand: the pruned model whole, recovered for 2 rounds x 3 steps on this node's windows.
    alone = eager_copy(model, config, node)
    assert all(torch.equal(t, pruned[n]) for n, t in _pruned_matrices(alone).items())
    by_hand = copy.deepcopy(alone)
    assert config.recovery_settings.steps == 3
    six_steps = dataclasses.replace(config.recovery_settings, steps=6)
    dense, _ = load_model(config.model)
    teacher = teacher_targets(dense, windows, six_steps)  # None without distill
    result = recover(by_hand, windows, six_steps, teacher=teacher)
    assert len(result.losses) == 6
    tokens = eval_tokens(config.eval_data[0], tokenizer)
    expected = perplexity(by_hand, tokens, seqlen=32, max_windows=1)
    assert scores == {STANDALONE_RECOVERED_METRIC.format(0): pytest.approx(expected, rel=1e-6)}
    pruned_score = own_perplexities(alone, tokenizer, config, "cpu")["standalone-perplexity-0"]
    if not distill:  # the NLL on this text falls (the tiny random dense model is no teacher)
        assert scores[STANDALONE_RECOVERED_METRIC.format(0)] < pruned_score
    # The node's own pruned model is left as it was, zeros and values.
    after = _pruned_matrices(model)
    assert all(torch.equal(after[name], pruned[name]) for name in pruned)


def test_the_report_shows_each_members_model_after_its_own_recovery(tmp_path):
    config = RunConfig.from_mapping({**TINY, "recovery-rounds": 1, "output-dir": str(tmp_path)})
    assert config.clients_recover_standalone  # int8 values: the members score their own
    run_dir = run_federation(InProcessGrid.simulation(client_app, 2, {}), config, run_id=3)
    report = json.loads((run_dir / "report.json").read_text())
    standalone = report["perplexity"]["standalone"]
    source = config.eval_data[0]
    pruned = {node: scores[source] for node, scores in standalone["per_client"].items()}
    after = standalone["after-recovery"]
    recovered = {node: scores[source] for node, scores in after["per_client"].items()}
    assert sorted(recovered) == sorted(pruned) and len(recovered) == 2
    assert after["mean"][source] == pytest.approx(sum(recovered.values()) / 2, abs=1e-4)
    assert all(recovered[node] != pruned[node] for node in pruned)


def test_no_member_recovers_without_recovery_rounds_or_standalone_eval():
    assert not RunConfig.from_mapping({**TINY, "recovery-rounds": 0}).clients_recover_standalone
    off = RunConfig.from_mapping({**TINY, "standalone-eval": False})
    assert not off.clients_recover_standalone


def _pruned_matrices(model) -> dict[str, torch.Tensor]:
    """Every prunable matrix of ``model`` (lazy or eager), copied."""
    return {
        name: layer_tensors(model, index)[name].clone()
        for index in range(num_layers(model))
        for name in prunable_weights(model, index)
    }
