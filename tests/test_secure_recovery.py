"""Recovery rounds under secure aggregation: the server adds the mean of the clients' changes
and never sees one client's.

What the server ends with is the pruned model plus the mean of what each client computed
(within one step of Flower's quantisation grid), with every zero kept; no reply carries a
client's changes in the clear; a node that drops out is left out while the round goes on;
settings SecAgg+ cannot serve fail before any work.
"""

import json

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from test_recovery_rounds import matrices
from test_secure_exact import byte_strings

from client_app import recovery_task
from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.strategies.recovery_rounds import change_limit
from fedspallm_strategy.strategies.secure_recovery import MESSAGE_HEADROOM, parts_of
from fedspallm_strategy.wire.secure_encoding import (
    delta_vectors,
    deltas_from_secure_mean,
    masked_bytes,
    quantization_range,
)
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {
    "model": "tiny-llama",
    "strategy": "exact",
    "secure-aggregation": True,
    "seqlen": 32,
    "calib-samples": 4,
    "eval-windows": 1,
    "standalone-eval": False,
    "recovery-steps": 3,
    "recovery-samples": 4,
    "recovery-lr": 1e-3,
}
RECOVERY_ROUND = 5  # tiny-llama's 4 layers take exact's rounds 1-4


def config_of(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **overrides})


def run(tmp_path, nodes: int, run_id: int, reply_filter=None, **overrides):
    grid = InProcessGrid.simulation(client_app, nodes, {}, run_id=run_id, reply_filter=reply_filter)
    run_dir = run_federation(grid, config_of(tmp_path, **overrides), run_id=run_id)
    return run_dir, json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """The same secure exact run without recovery: the model the recovery round starts from."""
    run_dir, _ = run(tmp_path_factory.mktemp("pruned"), 3, 401, **{"recovery-rounds": 0})
    return matrices(run_dir)


@pytest.fixture
def changes(monkeypatch):
    """Each node's float32 changes as it computed them, by partition."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    fine_tune = recovery_task.fine_tune_global

    def recording(config, node, global_layers, recovery_round):
        result, masks = fine_tune(config, node, global_layers, recovery_round)
        seen[node.partition_id] = {name: delta.clone() for name, delta in result.deltas.items()}
        return result, masks

    monkeypatch.setattr(recovery_task, "fine_tune_global", recording)
    return seen


def test_the_server_adds_the_mean_and_sees_no_clients_changes(tmp_path, pruned, changes):
    replies = []

    def record(node, reply):
        if reply.metadata.group_id == str(RECOVERY_ROUND):
            replies.append(reply)
        return reply

    run_dir, report = run(tmp_path, 3, 402, record, **{"recovery-rounds": 1})
    assert report["rejected"] == []
    (entry,) = report["recovery"]["per-round"]
    assert entry["round"] == RECOVERY_ROUND and entry["clients"] == 3
    assert "loss-first" not in entry  # a client's training loss stays on the client
    assert sorted(changes) == [0, 1, 2]

    # The model: pruned + the clients' mean, to within Flower's grid (2 x range / Q each, far
    # below what an int8 plain reply would carry: a plain round fails this tolerance).
    config = config_of(tmp_path)
    step = 2 * change_limit(config) / quantization_range(3)
    found = matrices(run_dir)
    for name, before in pruned.items():
        keep = before != 0
        assert torch.equal(found[name] != 0, keep), f"{name}: the mask moved"
        mean = sum(changes[p][name] for p in range(3)) / 3
        assert float(mean.abs().max()) > 100 * step  # the round moved this matrix
        torch.testing.assert_close(found[name][keep], before[keep] + mean, rtol=1e-6, atol=1e-7)

    # No reply carries a client's changes, as float32 or as the float64 it encodes.
    blobs = []
    for reply in replies:
        for record_ in reply.content.array_records.values():
            assert all(len(array.data) == 0 for array in record_.values())
        values = [v for rec in reply.content.config_records.values() for v in rec.values()]
        blobs += [blob for value in values for blob in byte_strings(value)]
    masked = [r for r in replies if Key.MASKED_PARAMETERS in r.content[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    for own in changes.values():
        for name, delta in own.items():
            for clear in (delta[:16].numpy(), delta[:16].double().numpy()):
                assert not any(clear.tobytes() in blob for blob in blobs), name

    # Up: one int64 per kept value, plus Flower's .npy headers.
    counts = [int((pruned[name] != 0).sum()) for name in sorted(pruned)]
    up = report["communication"]["per_round"][str(RECOVERY_ROUND)]["bytes_up"]
    assert set(up.values()) == {masked_bytes(counts)}


def test_a_node_that_drops_out_is_left_out_and_the_round_goes_on(tmp_path, pruned, changes):
    def drop_node_3(node, reply):
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        dropped = node == 3 and reply.metadata.group_id == str(RECOVERY_ROUND)
        return None if dropped and Key.MASKED_PARAMETERS in configs else reply

    run_dir, report = run(tmp_path, 3, 403, drop_node_3, **{"recovery-rounds": 1})
    (entry,) = report["recovery"]["per-round"]
    assert entry["clients"] == 2
    rejected = [(r["round"], r["node"]) for r in report["rejected"]]
    assert rejected == [(RECOVERY_ROUND, 3)]
    found = matrices(run_dir)
    for name, before in pruned.items():
        keep = before != 0
        mean = (changes[0][name] + changes[1][name]) / 2  # nodes 1 and 2: partitions 0 and 1
        torch.testing.assert_close(found[name][keep], before[keep] + mean, rtol=1e-6, atol=1e-7)


def test_a_mean_pushed_off_the_range_is_refused_and_the_run_goes_on(tmp_path, pruned):
    """Node 1 adds 2**31 to every masked integer it sends (modulo 2**32, so nothing shows
    before unmasking): with 3 clients a step is 2c / 2**30, so the sum moves by 4c and the
    mean by 4c / 3, past any honest mean."""

    def push(node, reply):
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if node != 1 or Key.MASKED_PARAMETERS not in configs:
            return reply
        if reply.metadata.group_id != str(RECOVERY_ROUND):
            return reply
        arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
        pushed = [arrays[0]] + [(a + 2**31) % 2**32 for a in arrays[1:]]
        configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in pushed]
        return reply

    run_dir, report = run(tmp_path, 3, 405, push, **{"recovery-rounds": 1})
    (entry,) = report["recovery"]["per-round"]
    assert entry["clients"] == 0 and "beyond the range" in entry["refused"]
    assert "perplexity" not in entry  # the model did not change, so it is not scored again
    found = matrices(run_dir)
    assert all(torch.equal(found[name], before) for name, before in pruned.items())


def test_lora_with_secure_aggregation_fails_before_any_client_works(tmp_path):
    with pytest.raises(ConfigError, match="recovery-method='lora' with secure-aggregation"):
        config_of(tmp_path, **{"recovery-rounds": 1, "recovery-method": "lora"})


def test_a_change_beyond_the_range_fails_the_client_naming_the_matrix():
    deltas = {"b": torch.tensor([0.5, -1.0]), "a": torch.tensor([0.25])}
    vectors = delta_vectors(deltas, clip=1.0)  # in name order, float64, values as they are
    assert [v.tolist() for v in vectors] == [[0.25], [0.5, -1.0]]
    assert all(v.dtype == np.float64 for v in vectors)
    with pytest.raises(ValueError, match=r"b: a kept value moved by 1\b.*recovery-lr.*0\.5"):
        delta_vectors(deltas, clip=0.5)
    with pytest.raises(ValueError, match="a: a kept value moved by nan"):
        delta_vectors({"a": torch.tensor([float("nan")])}, clip=1.0)


def test_a_secure_mean_of_other_lengths_or_beyond_the_range_is_refused():
    arrays = [np.array([0.25]), np.array([0.5, -1.0])]
    means = deltas_from_secure_mean(arrays, {"b": 2, "a": 1}, clip=1.0, q=2**30)
    assert means["a"].tolist() == [0.25] and means["b"].tolist() == [0.5, -1.0]
    assert means["a"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"lengths \[1, 2\]; the masks keep \[1, 3\]"):
        deltas_from_secure_mean(arrays, {"a": 1, "b": 3}, clip=1.0, q=2**30)
    # One step of the grid (2 / 4) past the range is rounding; more is not an honest mean.
    deltas_from_secure_mean([np.array([-1.5])], {"a": 1}, clip=1.0, q=4)
    with pytest.raises(ValueError, match="secure mean of a: a change of 1.6, beyond the range 1"):
        deltas_from_secure_mean([np.array([1.6])], {"a": 1}, clip=1.0, q=4)
    with pytest.raises(ValueError, match="secure mean of a: a change of nan"):
        deltas_from_secure_mean([np.array([np.nan])], {"a": 1}, clip=1.0, q=4)


def test_a_matrix_over_max_payload_mb_fails_before_any_client_works(tmp_path):
    """By hand: tiny-llama's largest matrices (128 x 64) keep 4096 weights at 50 %; alone
    their masked upload is Flower's weight and one vector: 136 + 128 + 8 x 4096 = 33032 B =
    0.0315 MiB, over max-payload-mb 0.08 less 64 KiB (83886 - 65536 = 18350 B), while q_proj's
    2048 kept weights take 264 + 8 x 2048 = 16648 B. gate_proj is the first of the large ones
    in a layer's order."""
    grid = InProcessGrid.simulation(client_app, 2, {}, run_id=404)
    config = config_of(tmp_path, **{"recovery-rounds": 1, "max-payload-mb": 0.08})
    refusal = (
        r"masked changes of model\.layers\.0\.mlp\.gate_proj\.weight alone are 0\.03 MiB "
        r"\(8 B for each of its 4096 kept weights\), over max-payload-mb=0\.08 less 64 KiB"
    )
    with pytest.raises(ConfigError, match=refusal):
        run_federation(grid, config, run_id=404)
    assert not [m for m in grid.sent if m.metadata.message_type.startswith("train")]
    assert not list(tmp_path.iterdir())


def test_parts_are_consecutive_matrices_within_the_limit():
    """By hand: a part's masked upload is 136 + (128 + 8 x count) per matrix; a and b (10
    kept each) take 552 B together, 344 alone; c (30 kept) takes 504 alone."""
    counts = {"c": 30, "b": 10, "a": 10}
    assert parts_of(counts, 600) == [["a", "b"], ["c"]]
    assert parts_of(counts, 920) == [["a", "b", "c"]]
    assert parts_of(counts, 400) == [["a"], ["b"], ["c"]]  # c is over the limit alone


def test_a_round_in_parts_adds_the_same_mean_and_leaves_no_changes_behind(
    tmp_path, pruned, changes, monkeypatch
):
    monkeypatch.setenv("FEDSPALLM_CACHE", str(tmp_path / "cache"))
    limit = 0.35  # MiB: over exact's 0.33 a round, under the 0.57 of masked changes
    run_dir, report = run(
        tmp_path / "runs", 3, 406, **{"recovery-rounds": 1, "max-payload-mb": limit}
    )
    (entry,) = report["recovery"]["per-round"]
    counts = {name: int((before != 0).sum()) for name, before in pruned.items()}
    budget = limit * 2**20 - MESSAGE_HEADROOM  # room for the rest of each message
    parts = parts_of(counts, budget)
    assert entry["clients"] == 3 and entry["parts"] == len(parts) > 1
    assert all(masked_bytes([counts[n] for n in part]) <= budget for part in parts)
    up = report["communication"]["per_round"][str(RECOVERY_ROUND)]["bytes_up"]
    assert set(up.values()) == {sum(masked_bytes([counts[n] for n in part]) for part in parts)}
    found = matrices(run_dir)
    for name, before in pruned.items():
        keep = before != 0
        mean = sum(changes[p][name] for p in range(3)) / 3
        torch.testing.assert_close(found[name][keep], before[keep] + mean, rtol=1e-6, atol=1e-7)
    assert not list((tmp_path / "cache").rglob("changes-round-*"))  # the last part removed them


def test_a_node_that_drops_out_of_the_first_part_is_left_out_of_the_rest(
    tmp_path, pruned, changes, monkeypatch
):
    monkeypatch.setenv("FEDSPALLM_CACHE", str(tmp_path / "cache"))
    seen = []

    def drop_node_3_once(node, reply):
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        recovering = reply.metadata.group_id == str(RECOVERY_ROUND)
        if node == 3 and recovering and Key.MASKED_PARAMETERS in configs:
            seen.append(node)
            if len(seen) == 1:
                return None  # its first part's masked vector never arrives
        return reply

    overrides = {"recovery-rounds": 1, "max-payload-mb": 0.35}
    run_dir, report = run(tmp_path / "runs", 3, 407, drop_node_3_once, **overrides)
    (entry,) = report["recovery"]["per-round"]
    assert entry["parts"] > 1 and entry["clients"] == 2
    assert [(r["round"], r["node"]) for r in report["rejected"]] == [(RECOVERY_ROUND, 3)]
    found = matrices(run_dir)
    for name, before in pruned.items():
        keep = before != 0
        mean = (changes[0][name] + changes[1][name]) / 2  # nodes 1 and 2, in both parts
        torch.testing.assert_close(found[name][keep], before[keep] + mean, rtol=1e-6, atol=1e-7)
