"""Tests for llm_pruning.lazy: decoder layers from disk, one at a time, bit-identical results."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import client_app.task
from client_app.running_inputs import apply_global_layers
from client_app.task import prune_layers
from fedspallm_strategy.config import NodeConfig, RunConfig
from fedspallm_strategy.wire.payload import encode
from llm_pruning.engine import LayerwiseCalibrator, prune_model
from llm_pruning.evaluate import perplexity, sparsity_report
from llm_pruning.families import family_of, prunable_weights
from llm_pruning.layer_store import INDEX_FILE, LayerNotLoadedError, LayerStore, layer_store
from llm_pruning.lazy import load_lazy, on_device, pin_layer
from llm_pruning.models import _safetensors_folder, load_model
from llm_pruning.pruners import SparsityPattern, get_pruner

FAMILIES = ["tiny-llama", "tiny-opt"]
SEQLEN = 32
HALF = SparsityPattern(0.5)


@pytest.fixture(scope="module")
def segments() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, SEQLEN), generator=generator)  # (N, T)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (5 * SEQLEN + 7,), generator=generator)


def both(name: str, **kwargs):
    """The same model loaded eagerly and lazily."""
    return load_model(name, **kwargs)[0], load_model(name, lazy=True, **kwargs)[0]


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """A safetensors buffer's header (parsed) and its tensor bytes."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def resident_parameters(model) -> int:
    """Decoder-layer parameter entries that hold real storage."""
    family = family_of(model)
    return sum(
        not p.is_meta
        for index, layer in enumerate(family.layers_of(model))
        for p in layer.parameters()
    )


def assert_same_state(eager, lazy) -> None:
    """Every tensor of ``lazy`` (layers read from the store) equals ``eager``'s, dtype too."""
    store = layer_store(lazy)
    lazy_state = {k: v for k, v in lazy.state_dict().items() if not v.is_meta}
    for index in range(len(store)):
        lazy_state.update(store.tensors(index))
    eager_state = eager.state_dict()
    assert lazy_state.keys() == eager_state.keys()
    for name, value in eager_state.items():
        assert lazy_state[name].dtype == value.dtype, name
        assert torch.equal(lazy_state[name], value), name


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FAMILIES)
def test_lazy_load_equals_eager_load_bit_for_bit(tiny_cache, name, dtype):
    eager, lazy = both(name, dtype=dtype)
    store = layer_store(lazy)
    assert layer_store(eager) is None and isinstance(store, LayerStore)
    assert store.resident() == [] and resident_parameters(lazy) == 0
    assert not lazy.training
    # Non-persistent buffers (rotary inv_freq) are real and equal; tied weights are tied.
    eager_buffers, lazy_buffers = dict(eager.named_buffers()), dict(lazy.named_buffers())
    assert eager_buffers.keys() == lazy_buffers.keys()
    for buffer_name, buffer in eager_buffers.items():
        assert torch.equal(lazy_buffers[buffer_name], buffer)
    assert lazy.get_output_embeddings().weight is lazy.get_input_embeddings().weight
    assert_same_state(eager, lazy)
    for index in range(len(store)):
        store.load(index)
    lazy_params = dict(lazy.named_parameters())
    for param_name, param in eager.named_parameters():
        assert torch.equal(lazy_params[param_name], param), param_name
    assert lazy.config.to_dict() == eager.config.to_dict()


def test_a_sharded_checkpoint_loads_lazily(tiny_llama, tmp_path):
    eager, tokenizer = tiny_llama
    eager.save_pretrained(tmp_path, max_shard_size="40KB")
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / INDEX_FILE).is_file() and not (tmp_path / "model.safetensors").exists()
    lazy, _ = load_model(str(tmp_path), lazy=True)
    assert_same_state(eager, lazy)


def test_a_hub_id_not_in_the_local_cache_is_loaded_eagerly():
    # No download is attempted for a lazy load; the eager path then reports the hub error.
    assert _safetensors_folder("nobody-here/no-such-model") is None


def test_a_layer_not_loaded_raises_on_use(tiny_cache):
    lazy, _ = load_model("tiny-llama", lazy=True)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with torch.no_grad(), pytest.raises(LayerNotLoadedError, match="decoder layer 0"):
        lazy(input_ids=ids)
    # A Linear called on its own (meta weights would give uninitialised numbers on the CPU).
    linear = next(iter(prunable_weights(lazy, 2).values()))
    with torch.no_grad(), pytest.raises(LayerNotLoadedError, match="decoder layer 2"):
        linear(torch.ones(1, linear.in_features))
    with pytest.raises(NotImplementedError):  # reading the values: meta tensors have none
        linear.weight.data.to("cpu")
    layer_store(lazy).load(2)
    linear(torch.ones(1, linear.in_features))  # loaded: fine


def test_on_device_loads_then_unloads_unless_pinned(tiny_cache):
    lazy, _ = load_model("tiny-opt", lazy=True)
    store = layer_store(lazy)
    with on_device(lazy, 1, "cpu") as layer:
        assert store.resident() == [1] and layer is family_of(lazy).layers_of(lazy)[1]
    assert store.resident() == []
    with on_device(lazy, 1, "cpu"):
        pin_layer(lazy, 1)  # e.g. pruned inside the block
    assert store.resident() == [1]
    store.unload(1)
    assert store.resident() == [1]  # pinned: stays
    store.unpin(1)
    store.unload(1)
    assert store.resident() == []
    with pytest.raises(RuntimeError, match="not loaded"):
        store.pin(3)


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("pruner_name", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("name", FAMILIES)
def test_lazy_pruning_gives_the_eager_masks_and_weights(tiny_cache, segments, name, pruner_name):
    eager, lazy = both(name)
    pruner = get_pruner(pruner_name)
    layers = [1, 3]
    expected = prune_model(eager, segments, pruner, HALF, layer_ids=layers, progress=False)
    result = prune_model(lazy, segments, pruner, HALF, layer_ids=layers, progress=False)
    assert result.masks.keys() == expected.masks.keys() and len(result.masks) > 0
    for matrix, keep in expected.masks.items():
        assert torch.equal(result.masks[matrix], keep), matrix
    store = layer_store(lazy)
    # Only the pruned layers stay resident (pinned); their weights equal the eager ones.
    assert store.resident() == layers and all(store.is_pinned(i) for i in layers)
    per_layer = sum(1 for _ in family_of(eager).layers_of(eager)[0].parameters())
    assert resident_parameters(lazy) == per_layer * len(layers)
    lazy_params = dict(lazy.named_parameters())
    for param_name, param in eager.named_parameters():
        if not lazy_params[param_name].is_meta:
            assert torch.equal(lazy_params[param_name], param), param_name


def test_calibration_holds_at_most_one_unpinned_layer(tiny_cache, segments, monkeypatch):
    lazy, _ = load_model("tiny-llama", lazy=True)
    store = layer_store(lazy)
    unpinned_counts: list[int] = []
    original_load = LayerStore.load

    def counting_load(self, index, device="cpu"):
        layer = original_load(self, index, device)
        unpinned_counts.append(sum(not self.is_pinned(i) for i in self.resident()))
        return layer

    monkeypatch.setattr(LayerStore, "load", counting_load)
    prune_model(lazy, segments, get_pruner("sparsegpt"), HALF, layer_ids=[0, 2], progress=False)
    # Layers 0..2 were each loaded for their forward passes; never two unpinned at once.
    assert len(unpinned_counts) >= 3
    assert max(unpinned_counts) == 1
    assert store.resident() == [0, 2]


def test_client_payload_is_byte_identical_eager_and_lazy(tiny_cache, monkeypatch):
    config = RunConfig.from_mapping({"model": "tiny-llama", "seqlen": 64, "calib-samples": 2})
    node = NodeConfig(partition_id=0, num_partitions=2)
    lazy_reply = prune_layers(config, node, [1, 2])

    def eager_load(spec, **kwargs):
        return load_model(spec, **{**kwargs, "lazy": False})

    monkeypatch.setattr(client_app.task, "load_model", eager_load)
    eager_reply = prune_layers(config, node, [1, 2])
    # safetensors writes the metadata keys in hash order (two eager runs differ there too):
    # the header must be equal as JSON — tensor names, dtypes, shapes, offsets — and every
    # byte after it identical.
    lazy_header, lazy_data = split_safetensors(lazy_reply.payload)
    eager_header, eager_data = split_safetensors(eager_reply.payload)
    assert lazy_header == eager_header
    assert lazy_data == eager_data and len(lazy_data) > 0


def test_global_layers_reach_a_lazy_model_through_its_store(tiny_cache, segments):
    eager, lazy = both("tiny-opt")
    names = list(prunable_weights(eager, 2))
    values = {name: torch.randn(eager.get_parameter(name).shape) for name in names}
    masks = {name: values[name] > 0 for name in names}
    payload = encode(values, masks)
    apply_global_layers(eager, payload, [2], require_values=True)
    apply_global_layers(lazy, payload, [2], require_values=True)
    assert layer_store(lazy).resident() == []  # written to disk, not held in memory
    assert_same_state(eager, lazy)
    # The calibrator then runs through the global layer exactly as the eager model does.
    calibrators = [LayerwiseCalibrator(m, segments) for m in (eager, lazy)]
    for index in range(3):
        for calibrator in calibrators:
            calibrator.advance(index)
    assert torch.equal(calibrators[0].hidden, calibrators[1].hidden)


# ------------------------------------------------------------------- replace and save


def test_replace_round_trips_through_load(tiny_cache, tmp_path):
    lazy, _ = load_model("tiny-llama", lazy=True)
    store = layer_store(lazy)
    store.work_dir = tmp_path / "global"
    name = next(iter(prunable_weights(lazy, 1)))
    base = store.tensors(1)
    new = torch.randn(base[name].shape, dtype=torch.float64)  # converted to the model dtype
    store.replace(1, {name: new})
    assert (tmp_path / "global" / "layer-00001.safetensors").is_file()
    assert store.resident() == []
    loaded = dict(store.load(1).named_parameters())
    relative = name.removeprefix(family_of(lazy).layer_prefix(1))
    assert torch.equal(loaded[relative], new.float())
    for other, value in base.items():  # the rest of the layer is merged from the base
        if other != name:
            assert torch.equal(store.tensors(1)[other], value)
    assert torch.equal(store.tensors(1, original=True)[name], base[name])
    # A resident layer is updated in place; a second replace keeps the first.
    second = next(n for n in base if n != name)
    store.replace(1, {second: torch.zeros(base[second].shape)})
    assert torch.equal(lazy.get_parameter(second), torch.zeros(base[second].shape))
    store.unload(1)
    assert torch.equal(store.tensors(1)[name], new.float())
    with pytest.raises(ValueError, match="has no tensors"):
        store.replace(1, {"model.layers.2.mlp.up_proj.weight": base[name]})
    with pytest.raises(ValueError, match="shape"):
        store.replace(1, {name: torch.zeros(3, 3)})


@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_equals_an_eager_model_with_the_same_changes(
    tiny_cache, segments, tmp_path, name
):
    eager, lazy = both(name)
    tokenizer = load_model(name)[1]
    # Layer 1 replaced on disk, layer 2 pruned in memory (pinned), the rest untouched.
    replaced = {n: torch.randn(w.weight.shape) for n, w in prunable_weights(eager, 1).items()}
    for model in (eager, lazy):
        prune_model(model, segments, get_pruner("wanda"), HALF, layer_ids=[2], progress=False)
    for param_name, value in replaced.items():
        eager.get_parameter(param_name).data.copy_(value)
    layer_store(lazy).replace(1, replaced)
    eager.save_pretrained(tmp_path / "eager")
    layer_store(lazy).save_pretrained(tmp_path / "lazy", tokenizer)

    # One file, as save_pretrained writes a model under its default shard size.
    files = sorted(path.name for path in (tmp_path / "lazy").glob("*.safetensors"))
    assert files == ["model.safetensors"] and not (tmp_path / "lazy" / INDEX_FILE).exists()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "eager")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "lazy")
    expected_state, saved_state = expected.state_dict(), saved.state_dict()
    assert saved_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(saved_state[key], value), key
    assert json.loads((tmp_path / "lazy" / "config.json").read_text()) == json.loads(
        (tmp_path / "eager" / "config.json").read_text()
    )
    assert (tmp_path / "lazy" / "tokenizer.json").is_file()
    # The folder also loads lazily, and a store never overwrites its own base files.
    assert_same_state(expected, load_model(str(tmp_path / "lazy"), lazy=True)[0])
    reloaded = load_lazy(tmp_path / "lazy")[0]
    with pytest.raises(ValueError, match="own files"):
        layer_store(reloaded).save_pretrained(tmp_path / "lazy")


# ------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("name", FAMILIES)
def test_perplexity_and_sparsity_report_lazy_equal_eager(tiny_cache, segments, tokens, name):
    eager, lazy = both(name)
    for max_windows in (None, 2):
        assert perplexity(lazy, tokens, seqlen=SEQLEN, max_windows=max_windows) == perplexity(
            eager, tokens, seqlen=SEQLEN, max_windows=max_windows
        )
    assert layer_store(lazy).resident() == []
    for model in (eager, lazy):
        prune_model(model, segments, get_pruner("sparsegpt"), HALF, layer_ids=[1], progress=False)
    assert perplexity(lazy, tokens, seqlen=SEQLEN) == perplexity(eager, tokens, seqlen=SEQLEN)
    assert layer_store(lazy).resident() == [1]  # the pinned layer survives evaluation
    report = sparsity_report(lazy)
    assert report == sparsity_report(eager)
    assert report["per_matrix"][next(iter(prunable_weights(lazy, 1)))] == 0.5
    assert report["per_matrix"][next(iter(prunable_weights(lazy, 0)))] == 0.0


def test_a_lazy_model_nobody_uses_is_freed_without_a_garbage_collection():
    # A ClientApp process prunes one model per message: a reference cycle between the model
    # and its store would keep every earlier one alive until the collector happened to run.
    import gc
    import weakref

    model, _ = load_model("tiny-llama", lazy=True)
    with on_device(model, 0, "cpu"):
        pass
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None
    finally:
        gc.enable()
