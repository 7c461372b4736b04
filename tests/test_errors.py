"""Bad inputs fail before any work, with a message that names the problem."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.run import checkpoint
from llm_pruning.families import prunable_weights
from llm_pruning.pruners import SparsityPattern
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {"model": "tiny-llama", "seqlen": 64, "calib-samples": 2, "eval-windows": 1}
# The one-shot run keeps a checkpoint (layer-wise runs refuse resume-from): 2 rounds of 2 layers.
RESUMABLE = {**TINY, "resolve": False, "num-rounds": 2}
BUDGET_1 = {
    node: {"partition-id": node - 1, "num-partitions": 2, "layer-budget": 1} for node in (1, 2)
}


@pytest.fixture
def gpt2_dir(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    from llm_pruning.tiny import byte_tokenizer

    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Too short to cut one segment from.")
    return path


@pytest.fixture
def bad_paths(tmp_path):
    """Files and folders that are not what the settings naming them need."""
    paths = SimpleNamespace(
        file=tmp_path / "a-file",
        missing=tmp_path / "no-such-corpus.txt",
        latin1=tmp_path / "latin1.txt",
        bad_jsonl=tmp_path / "bad.jsonl",
        empty_model=tmp_path / "empty-model",
        garbled_model=tmp_path / "garbled-model",
    )
    paths.file.write_text("a file, not a folder")
    paths.latin1.write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e. ".encode("latin-1") * 400)
    paths.bad_jsonl.write_text('{"text": "fine"}\n{"text": \n')
    paths.empty_model.mkdir()
    paths.garbled_model.mkdir()
    (paths.garbled_model / "config.json").write_text("{not json")
    return paths


def _cases(gpt2_dir, short_text, bad):
    return {
        "sparsity": ({"sparsity": 1.2}, "sparsity"),
        "nm-sparsity": ({"pattern": "2:4", "sparsity": 0.7}, "2:4"),
        "strategy": ({"strategy": "fedsgd"}, "strategy must be one of"),
        "pruner": ({"pruner": "obs"}, "pruner must be one of"),
        "infinite-payload": ({"max-payload-mb": math.inf}, "max-payload-mb must be a finite"),
        # tiny-llama's 4 layers are about 0.33 MiB of float32 kept values and masks
        "payload-over-cap": ({"max-payload-mb": 0.1}, "max-payload-mb=0.1: a node's reply of 4"),
        "infinite-timeout": ({"round-timeout": -math.inf}, "round-timeout must be a finite"),
        "negative-seed": ({"seed": -1}, r"seed must be in \[0, 2\*\*63\)"),
        "huge-seed": ({"seed": 2**63}, r"seed must be in \[0, 2\*\*63\)"),
        "cuda": ({"device": "cuda"}, "device 'cuda' is not available on the server"),
        "output-dir-under-a-file": (
            {"output-dir": str(bad.file / "runs")},
            "output-dir: cannot create or write the folder",
        ),
        "family": ({"model": str(gpt2_dir)}, "model: .*unsupported model family 'gpt2'"),
        "empty-model-dir": ({"model": str(bad.empty_model)}, "model: could not load"),
        "garbled-model-config": (
            {"model": str(bad.garbled_model)},
            "model: could not load .*config.json",
        ),
        "seqlen": ({"seqlen": 4096}, "seqlen 4096 exceeds the model's context of 2048"),
        # A local calib-data path the server cannot read fails here, though the nodes read
        # the text: the server cannot tell a path only they hold from a typo, and nodes that
        # hold private text say so with their node config data-path instead.
        "missing-calib-data": (
            {"calib-data": str(bad.missing)},
            "calib-data: text file or directory not found.*data-path",
        ),
        "latin1-calib-data": (
            {"calib-data": str(bad.latin1)},
            "calib-data: .*latin1.txt is not UTF-8 text",
        ),
        "short-text": (
            {"calib-data": str(short_text), "partition": "iid"},
            "calib-data.*too short",
        ),
        "few-documents": ({"calib-data": str(short_text)}, "at least one document per client"),
        "missing-eval-data": (
            {"eval-data": f"python-docs, {bad.missing}"},
            "eval-data: text file or directory not found",
        ),
        "malformed-eval-data": ({"eval-data": str(bad.bad_jsonl)}, "eval-data: .*bad.jsonl:2"),
        "offline-hub": (
            {"model": "someone/not-a-real-model"},
            "(?s)model: .*pass its local directory",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "sparsity",
        "nm-sparsity",
        "strategy",
        "pruner",
        "infinite-payload",
        "infinite-timeout",
        "negative-seed",
        "huge-seed",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        "output-dir-under-a-file",
        "family",
        "empty-model-dir",
        "garbled-model-config",
        "seqlen",
        "missing-calib-data",
        "latin1-calib-data",
        "short-text",
        "missing-eval-data",
        "malformed-eval-data",
        "offline-hub",
        "few-documents",
        "payload-over-cap",
    ],
)
def test_bad_input_fails_before_any_client_work(
    case, gpt2_dir, short_text, bad_paths, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable at import: without this it still tries the network
    # (and its retries take most of a minute on a machine without one).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    overrides, message = _cases(gpt2_dir, short_text, bad_paths)[case]
    grid = InProcessGrid.simulation(client_app, 2, {})
    with pytest.raises(ConfigError, match=message):
        config = RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **overrides})
        run_federation(grid, config, run_id=1)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]
    assert not list(tmp_path.glob("*-fedspallm-*"))


def test_garbled_model_weights_fail_before_any_client_work(tiny_cache, tmp_path):
    model_dir = tmp_path / "garbled-weights"
    shutil.copytree(tiny_cache / "models" / "tiny-llama", model_dir)
    (weights,) = model_dir.glob("*.safetensors")
    weights.write_bytes(bytes(range(256)) * 16)
    grid = InProcessGrid.simulation(client_app, 2, {})
    config = RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), "model": str(model_dir)})
    with pytest.raises(ConfigError, match="^model: could not load .*garbled-weights"):
        run_federation(grid, config, run_id=1)
    assert not grid.sent  # not even the resources query: the model loads before any node
    assert not list(tmp_path.glob("*-fedspallm-*"))


# ------------------------------------------------------------------- resume-from checkpoints
class Crash(Exception):
    """Stands for the ServerApp being killed."""


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run folder whose checkpoint holds round 1 of 2: its ServerApp died in round 2."""
    output = tmp_path_factory.mktemp("crashed")

    def crash_in_round_2(node, reply):
        if reply.metadata.message_type == "train" and reply.metadata.group_id == "2":
            raise Crash
        return reply

    config = RunConfig.from_mapping({**RESUMABLE, "output-dir": str(output)})
    with pytest.raises(Crash):
        run_federation(
            InProcessGrid(client_app, BUDGET_1, {}, reply_filter=crash_in_round_2), config, run_id=1
        )
    (run_dir,) = output.iterdir()
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["completed_round"] == 1 and len(state["remaining"]) == 2
    return run_dir


def _edit_state(folder, edit):
    path = folder / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def _edit_matrices(folder, edit):
    path = folder / "round-1.safetensors"
    matrices = load_file(path)
    edit(matrices)
    save_file(matrices, path)


def _first(matrices):
    return min(matrices)


def _pending_layer(folder):
    return json.loads((folder / "state.json").read_text())["remaining"][0]


def _densify(matrices):
    name = _first(matrices)
    matrices[name] = torch.randn_like(matrices[name])


def _poison(matrices):
    name = _first(matrices)
    matrices[name] = matrices[name].clone()
    matrices[name].view(-1)[0] = math.nan


def _rename_to_layer(matrices, layer):
    """Move a matrix to decoder layer ``layer`` (``model.layers.<i>.…``)."""
    name = _first(matrices)
    parts = name.split(".")
    parts[2] = str(layer)
    matrices[".".join(parts)] = matrices.pop(name)


CORRUPTIONS = {
    "state-not-json": (
        lambda folder: (folder / "state.json").write_text("{garbage"),
        "resume-from: .*state.json is not readable JSON",
    ),
    "state-lacks-a-key": (
        lambda folder: _edit_state(folder, lambda state: state.pop("rng")),
        "resume-from: .*state.json lacks 'rng'",
    ),
    "remaining-not-a-list": (
        lambda folder: _edit_state(folder, lambda state: state.update(remaining="all")),
        "resume-from: .*'remaining' must be a JSON list",
    ),
    "remaining-out-of-range": (
        lambda folder: _edit_state(folder, lambda state: state["remaining"].append(99)),
        r"resume-from: state.json: pending layers \[99\] are not in \[0, 4\)",
    ),
    "bad-generator-state": (
        lambda folder: _edit_state(folder, lambda state: state.update(generator="AAAA")),
        "resume-from: .*bad generator",
    ),
    "random-bytes": (
        lambda folder: (folder / "round-1.safetensors").write_bytes(bytes(range(256)) * 4),
        "resume-from: malformed checkpoint file .*round-1.safetensors: SafetensorError",
    ),
    "nan-matrix": (
        lambda folder: _edit_matrices(folder, _poison),
        "resume-from: .*values are not all finite",
    ),
    "dense-matrix": (
        lambda folder: _edit_matrices(folder, _densify),
        "resume-from: .*non-zero entries, more than the .* that sparsity 0.5 keeps",
    ),
    "wrong-dtype": (
        lambda folder: _edit_matrices(folder, lambda m: m.update({_first(m): m[_first(m)].half()})),
        "resume-from: .*torch.float16 .*but the model's is torch.float32",
    ),
    "unknown-layer": (
        lambda folder: _edit_matrices(folder, lambda m: _rename_to_layer(m, 9)),
        "resume-from: the checkpoint holds 'model.layers.9.*not a prunable matrix",
    ),
    "pending-layer": (
        lambda folder: _edit_matrices(
            folder, lambda m: _rename_to_layer(m, _pending_layer(folder))
        ),
        "resume-from: .*is pending in state.json, yet has a matrix",
    ),
    "missing-matrix": (
        lambda folder: _edit_matrices(folder, lambda m: m.pop(_first(m))),
        "resume-from: finished layers lack their matrices",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_bad_checkpoint_fails_before_any_client_work(corruption, checkpointed, tmp_path):
    corrupt, message = CORRUPTIONS[corruption]
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpointed, resumed)
    corrupt(resumed / "checkpoint")
    grid = InProcessGrid(client_app, BUDGET_1, {})
    config = RunConfig.from_mapping(
        {**RESUMABLE, "output-dir": str(tmp_path), "resume-from": str(resumed)}
    )
    with pytest.raises(ConfigError, match=message):
        run_federation(grid, config, run_id=2)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]
    assert not list(tmp_path.glob("*-fedspallm-*"))
    assert not (resumed / "report.json").exists()


def test_an_intact_checkpoint_still_resumes(checkpointed, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpointed, resumed)
    config = RunConfig.from_mapping(
        {**RESUMABLE, "output-dir": str(tmp_path), "resume-from": str(resumed)}
    )
    assert run_federation(InProcessGrid(client_app, BUDGET_1, {}), config, run_id=2) == resumed
    assert (resumed / "report.json").is_file()


def test_checkpointed_matrices_must_keep_the_nm_pattern(tiny_llama):
    model, _ = tiny_llama
    pattern = SparsityPattern.parse("2:4", 0.5)
    matrices = {}
    for name, linear in prunable_weights(model, 0).items():
        weight = linear.weight.detach().clone()
        weight.view(-1, 4)[:, 2:] = 0  # 2 of every 4 kept: 2:4
        matrices[name] = weight
    checkpoint.check_matrices(matrices, model, [1, 2, 3], pattern)
    name = min(matrices)
    rows, columns = matrices[name].shape
    # Half of the entries kept overall, but as the whole left half of every row.
    matrices[name] = torch.cat(
        [torch.ones(rows, columns // 2), torch.zeros(rows, columns // 2)], dim=1
    )
    with pytest.raises(ConfigError, match="a group of 4 input columns keeps 4 entries"):
        checkpoint.check_matrices(matrices, model, [1, 2, 3], pattern)


# ----------------------------------------------------------------------------- node configs
def test_a_node_with_an_unknown_node_config_key_is_left_out(tmp_path, caplog):
    configs = {
        1: {"partition-id": 0, "num-partitions": 2, "layer_budget": 1},  # a typo: layer-budget
        2: {"partition-id": 1, "num-partitions": 2},
    }
    grid = InProcessGrid(client_app, configs, {})
    config = RunConfig.from_mapping({**TINY, "resolve": False, "output-dir": str(tmp_path)})
    run_dir = run_federation(grid, config, run_id=1)
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"} == {2}
    report = json.loads((run_dir / "report.json").read_text())
    reason = report["excluded-nodes"]["1"]
    assert "unknown node-config key(s) layer_budget" in reason, reason
    assert "known keys: " in reason and "layer-budget" in reason, reason
    assert list(report["clients"]) == ["2"] and report["run"]["nodes"] == [2]
    assert "node 1 is left out of the run: " in caplog.text


def test_when_every_node_fails_its_resources_query_no_train_message_is_sent(tmp_path):
    configs = {
        node: {"partition-id": node - 1, "num-partitions": 2, "layer_budget": 1} for node in (1, 2)
    }
    grid = InProcessGrid(client_app, configs, {})
    config = RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path)})
    with pytest.raises(
        RuntimeError,
        match="every node failed the resources query.*node 1: .*layer_budget.*node 2: .*layer_",
    ):
        run_federation(grid, config, run_id=1)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]
    assert not list(tmp_path.glob("*-fedspallm-*"))
