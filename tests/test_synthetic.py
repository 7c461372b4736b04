"""Tests for llm_pruning.synthetic: sharded seeded random LLaMA folders written shard by shard.

Every test writes a tiny config (hidden 64, 2 layers, vocab 300); the 1b/7b shapes are only
counted on the meta device.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm_pruning import models, synthetic
from llm_pruning.builtin import BUILTIN_MODELS, cached_builtin
from llm_pruning.models import load_model
from llm_pruning.synthetic import (
    SYNTHETIC_MODELS,
    parameter_shapes,
    synthetic_config,
    write_synthetic,
)
from llm_pruning.tiny import byte_tokenizer

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # head_dim 16, so k and v project 64 -> 32
    max_position_embeddings=128,
    tie_word_embeddings=True,
)
# One tiny decoder layer, in bf16 (2 bytes a value):
#   q, o: 2 * 64 * 64 = 8192;  k, v: 2 * 64 * 32 = 4096;  gate, up, down: 3 * 64 * 128 = 24576;
#   two RMSNorms: 2 * 64 = 128;  36992 values = 73984 bytes.
LAYER_BYTES = 73984
# The rest, tied: embed_tokens 300 * 64 + final norm 64 = 19264 values = 38528 bytes.
REST_BYTES_TIED = 38528


def tiny_config(**changes) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **changes})


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in shard_files(folder):
        with safe_open(path, framework="pt") as shard:
            tensors.update({name: shard.get_tensor(name) for name in shard.keys()})  # noqa: SIM118
    return tensors


def read_index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("tied", [True, False])
def test_folder_loads_with_every_tensor_taken_from_the_shards(tmp_path: Path, tied: bool):
    config = tiny_config(tie_word_embeddings=tied)
    folder = write_synthetic(config, tmp_path / "model")

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    with torch.device("meta"):
        reference = LlamaForCausalLM(config)
    loaded = model.state_dict()
    assert {name: t.shape for name, t in loaded.items()} == {
        name: t.shape for name, t in reference.state_dict().items()
    }
    stored = read_tensors(folder)
    for name, tensor in stored.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor), name
    head, embedding = model.lm_head.weight, model.model.embed_tokens.weight
    assert ("lm_head.weight" in stored) is not tied
    assert (head.data_ptr() == embedding.data_ptr()) is tied
    assert model.config.dtype == torch.bfloat16
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 257
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("hello").input_ids])).logits
    assert logits.shape == (1, 5, 300) and torch.isfinite(logits).all()


def test_values_follow_the_init_scheme(tmp_path: Path):
    stored = read_tensors(write_synthetic(tiny_config(intermediate_size=1024), tmp_path / "m"))
    assert torch.equal(stored["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(
        stored["model.layers.1.input_layernorm.weight"], torch.ones(64, dtype=torch.bfloat16)
    )
    # 65536 draws: the sample std is within 2% of the target.
    up = stored["model.layers.0.mlp.up_proj.weight"].float()
    assert up.std().item() == pytest.approx(0.02, rel=0.02)
    assert up.mean().abs().item() < 1e-3
    # Residual outputs are scaled by 1/sqrt(2 * layers) = 1/2.
    down = stored["model.layers.0.mlp.down_proj.weight"].float()
    assert down.std().item() == pytest.approx(0.01, rel=0.02)


def test_two_writes_with_one_seed_are_byte_identical_and_seeds_differ(tmp_path: Path):
    first = write_synthetic(tiny_config(), tmp_path / "a" / "model", seed=7)
    second = write_synthetic(tiny_config(), tmp_path / "b" / "model", seed=7)
    other = write_synthetic(tiny_config(), tmp_path / "c" / "model", seed=8)

    names = [path.name for path in shard_files(first)]
    assert names == [path.name for path in shard_files(second)]
    for name in [*names, "model.safetensors.index.json", "config.json"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    a, c = read_tensors(first), read_tensors(other)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(
        a["model.layers.1.self_attn.q_proj.weight"], c["model.layers.1.self_attn.q_proj.weight"]
    )
    assert torch.equal(a["model.norm.weight"], c["model.norm.weight"])  # ones either way


def test_a_tensor_depends_on_seed_and_name_not_on_what_is_drawn_before_it(tmp_path: Path):
    two = read_tensors(write_synthetic(tiny_config(), tmp_path / "two"))
    three = read_tensors(write_synthetic(tiny_config(num_hidden_layers=3), tmp_path / "three"))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(two[name], three[name]), name
    assert not torch.equal(
        two["model.layers.0.self_attn.q_proj.weight"], two["model.layers.1.self_attn.q_proj.weight"]
    )


def test_one_shard_per_layer_plus_one_and_the_index_counts_every_byte(tmp_path: Path):
    folder = write_synthetic(tiny_config(), tmp_path / "model")

    assert [path.name for path in shard_files(folder)] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    index = read_index(folder)
    stored = read_tensors(folder)
    tensor_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert index["metadata"]["total_size"] == tensor_bytes == REST_BYTES_TIED + 2 * LAYER_BYTES
    assert index["metadata"]["total_parameters"] == tensor_bytes // 2
    assert set(index["weight_map"]) == set(stored) == set(parameter_shapes(tiny_config()))
    for name, filename in index["weight_map"].items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            assert filename == f"model-{layer + 2:05d}-of-00003.safetensors", name
        else:
            assert filename == "model-00001-of-00003.safetensors", name
    assert not list(tmp_path.glob("*.tmp-*"))  # the staging folder was renamed away


def test_writing_holds_at_most_one_shard_at_a_time(tmp_path: Path, monkeypatch):
    real_draw, real_save = synthetic._draw, synthetic.save_file
    drawn: list[tuple[weakref.ref, int]] = []  # every tensor drawn so far, and its bytes
    live_peak = 0
    saved_bytes: list[int] = []

    def recording_draw(*args, **kwargs):
        nonlocal live_peak
        tensor = real_draw(*args, **kwargs)
        drawn.append((weakref.ref(tensor), tensor.numel() * tensor.element_size()))
        live_peak = max(live_peak, sum(size for ref, size in drawn if ref() is not None))
        return tensor

    def recording_save(tensors, filename, metadata=None):
        saved_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(synthetic, "_draw", recording_draw)
    monkeypatch.setattr(synthetic, "save_file", recording_save)
    write_synthetic(tiny_config(), tmp_path / "model")

    assert saved_bytes == [REST_BYTES_TIED, LAYER_BYTES, LAYER_BYTES]
    # Live drawn tensors never exceed one layer: a shard is freed before the next is drawn.
    assert live_peak == LAYER_BYTES
    assert all(ref() is None for ref, _ in drawn)


def test_a_failed_write_leaves_neither_the_target_nor_its_staging_folder(
    tmp_path: Path, monkeypatch
):
    real_save = synthetic.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(synthetic, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic(tiny_config(), tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_a_vocab_smaller_than_the_byte_tokenizer_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="vocab_size 200 .* 257"):
        write_synthetic(tiny_config(vocab_size=200), tmp_path / "model")


def test_builtin_synthetic_parameter_counts_match_the_hand_arithmetic():
    # synthetic-1b: embed 128256 * 2048; per layer q, o 2 * 2048^2, k, v 2 * 2048 * 512,
    # MLP 3 * 2048 * 8192, norms 2 * 2048; final norm 2048; tied head.
    layer_1b = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert layer_1b == 60_821_504
    total_1b = 128256 * 2048 + 16 * layer_1b + 2048
    assert total_1b == 1_235_814_400
    # synthetic-7b: embed and head 2 * 32000 * 4096; per layer q, k, v, o 4 * 4096^2,
    # MLP 3 * 4096 * 11008, norms 2 * 4096; final norm 4096.
    layer_7b = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert layer_7b == 202_383_360
    total_7b = 2 * 32000 * 4096 + 32 * layer_7b + 4096
    assert total_7b == 6_738_415_616

    for name, total, layer in [
        ("synthetic-1b", total_1b, layer_1b),
        ("synthetic-7b", total_7b, layer_7b),
    ]:
        config = synthetic_config(name)
        shapes = parameter_shapes(config)
        assert sum(torch.Size(s).numel() for s in shapes.values()) == total, name
        layer_0 = [s for n, s in shapes.items() if n.startswith("model.layers.0.")]
        assert sum(torch.Size(s).numel() for s in layer_0) == layer, name
        with torch.device("meta"):
            assert LlamaForCausalLM(config).num_parameters() == total, name
    assert ("lm_head.weight" in parameter_shapes(synthetic_config("synthetic-1b"))) is False
    assert "lm_head.weight" in parameter_shapes(synthetic_config("synthetic-7b"))


def test_builtin_synthetic_configs_are_bf16_with_byte_tokenizer_ids():
    assert set(SYNTHETIC_MODELS) == {"synthetic-1b", "synthetic-7b"}
    assert set(SYNTHETIC_MODELS) <= set(BUILTIN_MODELS)
    eos = byte_tokenizer().eos_token_id
    for name in SYNTHETIC_MODELS:
        config = synthetic_config(name)
        assert config.dtype == torch.bfloat16
        assert config.bos_token_id == config.eos_token_id == eos == 256
        assert config.vocab_size >= 257
    assert synthetic_config("synthetic-1b").head_dim == 64
    assert synthetic_config("synthetic-7b").head_dim == 128
    with pytest.raises(ValueError, match="synthetic-1b, synthetic-7b"):
        synthetic_config("synthetic-3b")


def test_load_model_writes_a_synthetic_builtin_once_then_reuses_the_cache(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setitem(SYNTHETIC_MODELS, "synthetic-tiny", TINY)
    monkeypatch.setattr(models, "BUILTIN_MODELS", (*BUILTIN_MODELS, "synthetic-tiny"))
    real_write = synthetic.write_synthetic
    writes = []

    def counting_write(name, target, *args, **kwargs):
        writes.append(name)
        return real_write(name, target, *args, **kwargs)

    monkeypatch.setattr(synthetic, "write_synthetic", counting_write)

    model, tokenizer = load_model("synthetic-tiny", dtype=torch.bfloat16, cache=tmp_path)
    assert writes == ["synthetic-tiny"]
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert len(tokenizer) == 257
    assert cached_builtin("synthetic-tiny", tmp_path) == tmp_path / "models" / "synthetic-tiny"
    load_model("synthetic-tiny", dtype=torch.bfloat16, cache=tmp_path)
    assert writes == ["synthetic-tiny"]
