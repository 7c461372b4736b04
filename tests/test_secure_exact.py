"""Strategy exact with secure aggregation: the server sees masked vectors and their sum only."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from test_flwr_run import flower_home, flwr_env, flwr_run  # noqa: F401 - a fixture, used by name

import client_app.app as client_module
from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig
from fedspallm_strategy.strategies.exact import Exact
from fedspallm_strategy.strategies.secure_exact import SecureExact
from fedspallm_strategy.wire.secure_encoding import (
    DIGITS,
    count_scale,
    from_digit_sums,
    quantization_range,
    secure_vectors,
    to_digits,
)
from fedspallm_strategy.wire.stats_payload import flat_sums
from llm_pruning.models import load_model
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {"model": "tiny-llama", "seqlen": 64, "calib-samples": 4, "eval-windows": 2}
CLIP = 2.0**24


def make_config(tmp_path, **overrides) -> RunConfig:
    settings = {
        **TINY,
        "strategy": "exact",
        "secure-aggregation": True,
        "output-dir": str(tmp_path),
        **overrides,
    }
    return RunConfig.from_mapping(settings)


def run(config: RunConfig, num_nodes: int, *, run_id: int, reply_filter=None):
    grid = InProcessGrid.simulation(
        client_app, num_nodes, {}, run_id=run_id, reply_filter=reply_filter
    )
    names = {n: NodeConfig.from_mapping(c.node_config).name for n, c in grid.contexts.items()}
    model, _ = load_model(config.model)
    kind = SecureExact if config.secure_aggregation else Exact
    strategy = kind(model, config, node_names=names)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds)
    return strategy, grid


# ------------------------------------------------------------------------- the encoding


def test_digits_carry_float32_sums_exactly_over_a_wide_range():
    generator = torch.Generator().manual_seed(0)
    magnitudes = 10.0 ** torch.randint(-9, 7, (2, 4000), generator=generator)
    sums = (torch.randn(2, 4000, generator=generator) * magnitudes).float()  # two clients
    q = quantization_range(2)
    digits = [to_digits(s.double().numpy(), CLIP, q) for s in sums]
    step = 2 * CLIP / q
    for digit in digits[0] + digits[1]:  # on Flower's grid: its stochastic rounding is a no-op
        assert np.all(np.abs(digit) <= CLIP) and np.all(digit / step == np.round(digit / step))
    total = from_digit_sums([a + b for a, b in zip(*digits, strict=True)], CLIP, q)
    # The exact sum, rounded once to float32, is what float32 addition of two values gives.
    assert torch.equal(torch.from_numpy(total).float(), sums[0] + sums[1])
    # Control: two digits are not enough for the small values.
    two = [d[:2] + [np.zeros_like(d[2])] for d in digits]
    coarse = from_digit_sums([a + b for a, b in zip(*two, strict=True)], CLIP, q)
    assert not torch.equal(torch.from_numpy(coarse).float(), sums[0] + sums[1])


def test_quantization_range_leaves_room_for_every_clients_value():
    for clients in (2, 3, 4, 5, 100):
        q = quantization_range(clients)
        assert clients * q < 2**32 <= 2 * clients * q and q & (q - 1) == 0
    with pytest.raises(ValueError, match="at least 2"):
        quantization_range(1)
    assert count_scale(256) == 2.0**-8 and count_scale(300) == 2.0**-9


def test_values_beyond_the_clipping_range_fail_the_client_naming_the_key():
    with pytest.raises(ValueError, match="secure-clipping-range"):
        to_digits(np.array([1.0, -5.0]), 4.0, 2**30)
    with pytest.raises(ValueError, match="secure-clipping-range"):
        to_digits(np.array([np.nan]), 4.0, 2**30)


# ------------------------------------------------------------------ what the server sees


def byte_strings(value):
    """Every bytes object inside a record value (a bytes, or a list of them)."""
    """Every bytes value inside a record value (lists included)."""
    if isinstance(value, bytes):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from byte_strings(item)


def test_the_server_receives_masked_vectors_and_learns_only_the_sum(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    truth: dict[tuple[int, int], dict] = {}  # (partition, first layer) -> the client's stats
    collect = client_module.collect_statistics

    def recording_collect(**kwargs):
        entries, metrics = collect(**kwargs)
        truth[(kwargs["node"].partition_id, kwargs["layer_ids"][0])] = entries
        return entries, metrics

    monkeypatch.setattr(client_module, "collect_statistics", recording_collect)
    received = []  # every reply the server gets, as it gets it
    summed = {}  # what the strategy prunes with, per round

    def record(node, reply):
        received.append((node, reply))
        return reply

    finish = SecureExact._finish_round

    def recording_finish(self, server_round, layers, sums, accepted, start=None):
        summed[layers[0]] = ({name: flat_sums(stats) for name, stats in sums.items()}, accepted)
        return finish(self, server_round, layers, sums, accepted, start)

    monkeypatch.setattr(SecureExact, "_finish_round", recording_finish)
    strategy, _ = run(config, 3, run_id=301, reply_filter=record)
    assert not strategy.remaining and len(truth) == 3 * 4

    q = quantization_range(3)
    step = 2 * CLIP / q
    masked_seen = 0
    for node, reply in received:
        partition = node - 1
        # No array of any reply carries data: the mod empties the FitRes parameters.
        for record_ in reply.content.array_records.values():
            assert all(len(array.data) == 0 for array in record_.values())
        values = [v for rec in reply.content.config_records.values() for v in rec.values()]
        blobs = [blob for value in values for blob in byte_strings(value)]
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        for layer in range(4):
            entries = truth[(partition, layer)]
            plain = [flat_sums(entries[name][0]).numpy() for name in sorted(entries)]
            digits = secure_vectors(entries, count=4 * 64, clip=CLIP, q=q)
            quantised = [np.round((d + CLIP) / step).astype(np.int64) for d in digits]
            # Neither the float32 sums, nor the digits, nor their quantised integers appear.
            for clear in (plain, digits, quantised):
                needles = [a[:16].tobytes() for a in clear]
                assert not any(needle in blob for needle in needles for blob in blobs)
        if Key.MASKED_PARAMETERS in configs:
            layer = masked_seen // 3
            masked_seen += 1
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            entries = truth[(partition, layer)]
            digits = secure_vectors(entries, count=4 * 64, clip=CLIP, q=q)
            quantised = [np.round((d + CLIP) / step).astype(np.int64) for d in digits]
            assert len(arrays) == 1 + len(quantised)  # Flower's weight, then the digits
            for masked, clear in zip(arrays[1:], quantised, strict=True):
                assert masked.shape == clear.shape and masked.dtype == np.int64
                # Uniform masks modulo 2**32: an entry survives unmasked with chance 2**-32.
                assert np.mean(masked == clear) < 1e-3
    assert masked_seen == 3 * 4  # one masked upload per node and round, and the test saw them

    # The server's sum is the clients' sum: the exact total rounded once to float32.
    for layer, (sums, accepted) in summed.items():
        assert accepted == [1, 2, 3]
        for name, total in sums.items():
            parts = [flat_sums(truth[(p, layer)][name][0]).double() for p in range(3)]
            assert torch.equal(total, sum(parts).float()), (layer, name)


@pytest.mark.parametrize("pruner", ["sparsegpt", "wanda"])
def test_two_clients_give_the_plain_exact_model_bit_for_bit(tmp_path, pruner):
    secure, _ = run(make_config(tmp_path, pruner=pruner), 2, run_id=302)
    plain, _ = run(
        make_config(tmp_path, pruner=pruner, **{"secure-aggregation": False}), 2, run_id=303
    )
    a, b = dict(secure.model.named_parameters()), dict(plain.model.named_parameters())
    assert all(torch.equal(a[name], b[name]) for name in a)
    # Bytes up, as planned: DIGITS int64 values per float32 statistic, plus .npy headers.
    assert secure.accounting.bytes_up == {1: secure.plan.stats_total, 2: secure.plan.stats_total}
    if pruner == "sparsegpt":  # Hessians: the headers are negligible
        ratio = secure.accounting.bytes_up[1] / plain.accounting.bytes_up[1]
        assert 2 * DIGITS * 0.95 < ratio < 2 * DIGITS


def test_a_node_that_drops_out_is_unmasked_away_and_left_out(tmp_path):
    def drop_node_3_in_round_2(node, reply):
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if node == 3 and Key.MASKED_PARAMETERS in configs and reply.metadata.group_id == "2":
            return None  # its masked vector never arrives
        return reply

    config = make_config(tmp_path, pruner="wanda")
    secure, _ = run(config, 3, run_id=304, reply_filter=drop_node_3_in_round_2)
    assert secure.contributors == {1: [1, 2, 3], 2: [1, 2], 3: [1, 2], 4: [1, 2]}
    assert secure.dropped == {3}

    def fail_node_3_in_round_2(node, reply):
        return None if node == 3 and reply.metadata.group_id == "2" else reply

    plain, _ = run(
        make_config(tmp_path, pruner="wanda", **{"secure-aggregation": False}),
        3,
        run_id=305,
        reply_filter=fail_node_3_in_round_2,
    )
    assert plain.contributors == secure.contributors
    a, b = dict(secure.model.named_parameters()), dict(plain.model.named_parameters())
    assert all(torch.equal(a[name], b[name]) for name in a)


# ------------------------------------------------------------------------- bad settings


def test_secure_aggregation_needs_strategy_exact():
    with pytest.raises(ConfigError, match="secure-aggregation needs strategy exact"):
        RunConfig.from_mapping({**TINY, "strategy": "fedspallm", "secure-aggregation": True})


def test_one_node_fails_before_any_client_works(tmp_path):
    grid = InProcessGrid.simulation(client_app, 1, {}, run_id=306)
    with pytest.raises(ConfigError, match="secure-aggregation needs at least 2 nodes"):
        run_federation(grid, make_config(tmp_path), run_id=306)
    assert not [m for m in grid.sent if m.metadata.message_type.startswith("train")]
    assert not list(tmp_path.iterdir())


def test_a_clipping_range_too_small_fails_the_run_naming_the_key(tmp_path):
    config = make_config(tmp_path, **{"secure-clipping-range": 1e-3})
    with pytest.raises(RuntimeError, match="halted.*secure-clipping-range"):
        run(config, 2, run_id=307)


# ------------------------------------------------------------------------- with flwr run


def test_flwr_run_with_secure_aggregation(flower_home, tmp_path):  # noqa: F811
    """Four layer rounds, then a recovery round in parts (max-payload-mb keeps each under
    0.35 MiB), each one SecAgg+ workflow, over a SuperLink: a SuperNode answers every part in a
    new process, from the changes its first part left on disk."""
    output_dir = tmp_path / "runs"
    overrides = (
        "model='tiny-llama' strategy='exact' secure-aggregation=true seqlen=64 calib-samples=4 "
        "recovery-rounds=1 recovery-steps=2 recovery-samples=4 max-payload-mb=0.35 "
        f"eval-windows=2 output-dir='{output_dir}'"
    )
    run_id, status, log = flwr_run(flwr_env(flower_home, tmp_path), overrides, supernodes=3)
    assert status == "finished:completed", log[-3000:]
    (folder,) = output_dir.glob(f"*-exact-{run_id}")
    report = json.loads((folder / "report.json").read_text())
    (recovery,) = report["recovery"]["per-round"]
    assert recovery["parts"] > 1 and recovery["clients"] == 3
    assert log.count("Secure aggregation completed") == 4 + recovery["parts"]
    assert all(len(nodes) == 3 for nodes in report["exact"]["contributors"].values())
    per_round = report["communication"]["per_round"]
    nodes = per_round["1"]["bytes_up"]
    assert {sum(per_round[r]["bytes_up"][n] for r in "1234") for n in nodes} == {
        report["exact"]["statistics_bytes_per_client"]
    }
