"""Bad inputs fail before any work, with a message that names the problem."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from client_app.app import app as client_app
from fedspallm_strategy.config import RunConfig
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

TINY = {"model": "tiny-llama", "seqlen": 64, "calib-samples": 2, "eval-windows": 1}


@pytest.fixture
def gpt2_dir(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    from llm_pruning.models import byte_tokenizer

    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Too short to cut one segment from.")
    return path


def _cases(gpt2_dir, short_text):
    return {
        "sparsity": ({"sparsity": 1.2}, "sparsity"),
        "nm-sparsity": ({"pattern": "2:4", "sparsity": 0.7}, "2:4"),
        "strategy": ({"strategy": "fedsgd"}, "strategy must be one of"),
        "pruner": ({"pruner": "obs"}, "pruner must be one of"),
        "family": ({"model": str(gpt2_dir)}, "unsupported model family 'gpt2'"),
        "seqlen": ({"seqlen": 4096}, "seqlen 4096 exceeds the model's context of 2048"),
        "short-text": (
            {"calib-data": str(short_text), "partition": "iid"},
            "calib-data.*too short",
        ),
        "few-documents": ({"calib-data": str(short_text)}, "at least one document per client"),
        "offline-hub": ({"model": "someone/not-a-real-model"}, "pass its local directory"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "sparsity",
        "nm-sparsity",
        "strategy",
        "pruner",
        "family",
        "seqlen",
        "short-text",
        "offline-hub",
        "few-documents",
    ],
)
def test_bad_input_fails_before_any_client_work(case, gpt2_dir, short_text, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides, message = _cases(gpt2_dir, short_text)[case]
    grid = InProcessGrid.simulation(client_app, 2, {})
    with pytest.raises((ValueError, OSError), match=message):
        config = RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **overrides})
        run_federation(grid, config, run_id=1)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]
    assert not list(tmp_path.glob("*-fedspallm-*"))


def test_text_missing_on_the_nodes_fails_the_run_with_their_reasons(tmp_path):
    # The server cannot tell a path that only exists on the nodes from a typo, so this one
    # reaches the clients; the run still ends with an error that carries their reasons.
    config = RunConfig.from_mapping(
        {**TINY, "output-dir": str(tmp_path), "calib-data": "/nonexistent/corpus.txt"}
    )
    grid = InProcessGrid.simulation(client_app, 2, {})
    with pytest.raises(RuntimeError, match="not pruned.*node 1: client error.*not found"):
        run_federation(grid, config, run_id=1)
