"""The re-solve's uplink: int8 values by default, and with ``lean-uplink`` masks only in the
prune round; either way each member scores its own model.

With ``resolve`` (the default) a client's pruned values are replaced by its re-solved ones a
round later. With ``lean-uplink`` the prune round sends the keep-mask alone (one bit per
weight, and its input energy per column) and the re-solve round each kept value: in 16 bits
(``payload-dtype`` float16) ``1/8 + 1/2 x 2 = 1.125`` bytes per weight at 50 % against dense
fp16's 2, 0.5625x plus headers; in int8 (the default) ``1/8 + 1/2 + 4 / columns``, about
0.31x. The server then holds no member's model (or, int8, only a copy within half a step of
each value), so each member scores its own on ``eval-data`` and reports the perplexity.
"""

import json
import math

import pytest
import safetensors.torch
import torch
from flwr.app import Message

from client_app.app import app as client_app
from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.strategies.standalone import reported_perplexities
from fedspallm_strategy.wire.protocol import (
    PAYLOAD_KEY,
    RESOLVED_KEY,
    STANDALONE_METRIC,
    request_from_record,
    request_record,
)
from fedspallm_strategy.wire.replies import reply_bytes
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.models import load_model
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {"model": "tiny-llama", "seqlen": 64, "calib-samples": 4, "eval-windows": 2}
LEAN = {"lean-uplink": True}


def config_of(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **overrides})


def weights_of(model) -> list[torch.Tensor]:
    return [
        linear.weight
        for layer in range(num_layers(model))
        for linear in prunable_weights(model, layer).values()
    ]


def test_only_a_lean_resolving_run_keeps_its_pruned_values_home():
    default = RunConfig(payload_dtype="float16")
    assert default.resolves and default.sends_pruned_values  # they break the merge's ties
    assert not default.clients_score_standalone and not default.sends_column_norms
    assert RunConfig().clients_score_standalone  # int8: the server's copy is not the member's
    lean = RunConfig(lean_uplink=True)
    assert not lean.sends_pruned_values and lean.sends_column_norms
    assert lean.clients_score_standalone
    # the server scores them then
    assert RunConfig(lean_uplink=True, keep_replies=True).sends_pruned_values
    # the values are the merge's input
    assert RunConfig(lean_uplink=True, resolve=False).sends_pruned_values
    assert RunConfig(lean_uplink=True, strategy="fedavg").sends_pruned_values  # no re-solve
    wanda = RunConfig(pruner="wanda", resolve=False)
    assert not wanda.sends_pruned_values and not wanda.clients_score_standalone  # dense values
    # global calibration: no model of its own
    assert not RunConfig(lean_uplink=True, calibration="global").clients_score_standalone


def test_auto_payload_dtype_is_int8_and_an_explicit_one_wins():
    auto = RunConfig()
    for model_dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert auto.wire_dtype(model_dtype) == torch.int8
    assert RunConfig(payload_dtype="float32").wire_dtype(torch.bfloat16) == torch.float32
    assert RunConfig(payload_dtype="float16").wire_dtype(torch.float32) == torch.float16


def test_the_clients_get_the_keys_that_shape_their_reply():
    config = RunConfig.from_mapping(
        {"payload-dtype": "bfloat16", "keep-replies": True, "eval-data": "python-docs,ptb"}
    )
    received, _ = request_from_record(request_record(config, [0]))
    assert received.payload_dtype == "bfloat16" and received.keep_replies
    assert received.eval_data == ("python-docs", "ptb")
    assert received.eval_windows == config.eval_windows


def test_a_reported_perplexity_is_taken_only_if_it_can_be_one():
    config = RunConfig.from_mapping({"eval-data": "a.txt,b.txt,c.txt"})
    metrics = {
        STANDALONE_METRIC.format(0): 12.345678,
        STANDALONE_METRIC.format(1): 0.5,  # below 1: no perplexity is
        STANDALONE_METRIC.format(2): math.inf,
        STANDALONE_METRIC.format(3): 7.0,  # no eval set 3
    }
    assert reported_perplexities(config, metrics) == {"a.txt": 12.3457}


def record_up(store: dict):
    """A reply filter keeping each node's prune-round and re-solve payloads, per round."""

    def keep(node: int, reply: Message) -> Message:
        if not reply.has_error() and PAYLOAD_KEY in reply.content.array_records:
            pruned = reply_bytes(reply, PAYLOAD_KEY, max_bytes=2**30)
            one_shot = RESOLVED_KEY not in reply.content.array_records
            resolved = b"" if one_shot else reply_bytes(reply, RESOLVED_KEY, max_bytes=2**30)
            store.setdefault(node, []).append((pruned, resolved))
        return reply

    return keep


def test_a_lean_run_uploads_masks_then_int8_values_under_0_35_dense_fp16(tmp_path):
    sent: dict[int, list] = {}
    grid = InProcessGrid.simulation(client_app, 2, {}, reply_filter=record_up(sent))
    run_dir = run_federation(grid, config_of(tmp_path, **LEAN), run_id=51)
    report = json.loads((run_dir / "report.json").read_text())
    weights = weights_of(load_model("tiny-llama")[0])
    numel = sum(w.numel() for w in weights)
    kept = sum(math.ceil(w.numel() / 2) for w in weights)  # sparsity 0.5
    rows = sum(w.shape[0] for w in weights)
    for node in (1, 2):
        (pruned, _), (_, resolved) = sent[node]  # round 1 prunes, round 2 re-solves
        masks_only = safetensors.torch.load(pruned)
        assert masks_only and not any(key.startswith("values/") for key in masks_only)
        tensors = safetensors.torch.load(resolved)
        codes = [t for key, t in tensors.items() if key.startswith("values/")]
        scales = [t for key, t in tensors.items() if key.startswith("scales/")]
        assert {t.dtype for t in codes} == {torch.int8} and sum(t.numel() for t in codes) == kept
        assert {t.dtype for t in scales} == {torch.float32}
        assert sum(t.numel() for t in scales) == rows
    per_round = report["communication"]["per_round"]
    headers = 64 * 1024  # safetensors headers and the metadata, generously
    for node in ("1", "2"):
        up1, up2 = per_round["1"]["bytes_up"][node], per_round["2"]["bytes_up"][node]
        assert numel / 8 <= up1 <= numel / 8 + headers  # mask bits
        assert kept + 4 * rows <= up2 <= kept + 4 * rows + headers  # codes, a scale a row
    assert report["communication"]["total_up"] / 2 <= 0.35 * 2 * numel + headers
    # Each member scored its own model; the server stored none.
    standalone = report["perplexity"]["standalone"]
    assert sorted(standalone["per_client"]) == ["1", "2"]
    assert report["standalone-scored-by"] == "clients"
    assert not (run_dir / "replies").exists()


def test_a_members_own_score_is_the_one_the_server_gets_from_its_replies(tmp_path):
    exact = {"payload-dtype": "float32", **LEAN}  # the server's rebuild holds the values
    scored_home = run_federation(
        InProcessGrid.simulation(client_app, 2, {}), config_of(tmp_path, **exact), run_id=52
    )
    kept = run_federation(
        InProcessGrid.simulation(client_app, 2, {}),
        config_of(tmp_path, **exact, **{"keep-replies": True}),
        run_id=53,
    )
    home = json.loads((scored_home / "report.json").read_text())
    server = json.loads((kept / "report.json").read_text())
    assert "standalone-scored-by" not in server
    assert sorted(p.name for p in (kept / "replies").iterdir()) == [
        "node-1-part-0.safetensors",
        "node-2-part-0.safetensors",
    ]
    for node in ("1", "2"):
        for source, value in server["perplexity"]["standalone"]["per_client"][node].items():
            own = home["perplexity"]["standalone"]["per_client"][node][source]
            assert own == pytest.approx(value, rel=1e-4), (node, source)


def _first_payload_values(sent: dict) -> list[torch.Tensor]:
    pruned = safetensors.torch.load(sent[1][0][0])  # node 1's first round: its pruned layers
    return [t for key, t in pruned.items() if key.startswith(("values/", "scales/"))]


@pytest.mark.parametrize("resolve", [True, False])
def test_the_server_scores_float_replies_and_members_their_own_under_int8(tmp_path, resolve):
    float_sent: dict[int, list] = {}
    grid = InProcessGrid.simulation(client_app, 2, {}, reply_filter=record_up(float_sent))
    exact = {"resolve": resolve, "payload-dtype": "float32"}
    float_dir = run_federation(grid, config_of(tmp_path, **exact), run_id=54)
    by_server = json.loads((float_dir / "report.json").read_text())
    assert sorted(by_server["perplexity"]["standalone"]["per_client"]) == ["1", "2"]
    assert "standalone-scored-by" not in by_server
    assert not (float_dir / "replies").exists()  # scored, then dropped
    assert {t.dtype for t in _first_payload_values(float_sent)} == {torch.float32}
    # int8 (the default): the server's copy is not the member's model; each scores its own.
    int8_sent: dict[int, list] = {}
    grid = InProcessGrid.simulation(client_app, 2, {}, reply_filter=record_up(int8_sent))
    int8_dir = run_federation(grid, config_of(tmp_path, resolve=resolve), run_id=55)
    by_clients = json.loads((int8_dir / "report.json").read_text())
    assert by_clients["standalone-scored-by"] == "clients"
    assert not (int8_dir / "replies").exists()
    assert {t.dtype for t in _first_payload_values(int8_sent)} == {torch.int8, torch.float32}
    for node in ("1", "2"):  # the same model as the float32 member's, scored on the same windows
        for source, value in by_server["perplexity"]["standalone"]["per_client"][node].items():
            own = by_clients["perplexity"]["standalone"]["per_client"][node][source]
            assert own == pytest.approx(value, rel=1e-4), (node, source)


def test_a_value_float16_would_flush_to_zero_travels_as_its_least_one():
    from client_app.task import to_wire

    weight = torch.tensor([1e-9, -1e-9, 0.0, 0.5, -3e-8, 1e-7])
    half = to_wire(weight, torch.float16)
    assert torch.equal(half != 0, weight != 0)  # a kept value never reads as pruned
    assert half[0].item() == 2.0**-24 and half[1].item() == -(2.0**-24)
    assert half[3].item() == 0.5 and half[5].item() == weight[5].to(torch.float16).item()
    assert torch.equal(to_wire(weight, torch.bfloat16), weight.to(torch.bfloat16))
