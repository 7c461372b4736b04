"""model/ is a conventional Hugging Face folder: sharded at max-shard-size as save_pretrained
shards (one file by default), written by a lazy model one decoder layer at a time, loadable
with from_pretrained, holding the values the run evaluated."""

from __future__ import annotations

import inspect
import json
import weakref
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, RunConfig
from llm_pruning.engine import prune_model
from llm_pruning.evaluate import sparsity_report
from llm_pruning.families import prunable_weights
from llm_pruning.layer_store import LayerStore, layer_store
from llm_pruning.model_folder import DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, SINGLE_FILE, nbytes
from llm_pruning.models import load_model
from llm_pruning.pruners import SparsityPattern, get_pruner
from server_app import federation
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid
from server_app.report import Evaluator

LIMIT = "100KB"
LIMIT_BYTES = 100_000
SEQLEN = 32


def changed_models(name: str) -> tuple[PreTrainedModel, PreTrainedModel, Tokenizer, dict]:
    """An eager and a lazy copy of ``name`` with the same changes: layer 1 replaced (on disk,
    for the lazy one), layer 2 pruned in memory (resident and pinned, for the lazy one)."""
    eager, tokenizer = load_model(name)
    lazy, _ = load_model(name, lazy=True)
    generator = torch.Generator().manual_seed(0)
    segments = torch.randint(0, 256, (4, SEQLEN), generator=generator)
    replaced = {
        n: torch.randn(w.weight.shape, generator=generator)
        for n, w in prunable_weights(eager, 1).items()
    }
    pruner, half = get_pruner("wanda"), SparsityPattern(0.5)
    for model in (eager, lazy):
        prune_model(model, segments, pruner, half, layer_ids=[2], progress=False)
    for param_name, value in replaced.items():
        eager.get_parameter(param_name).data.copy_(value)
    layer_store(lazy).replace(1, replaced)
    return eager, lazy, tokenizer, replaced


def lazy_tensors(lazy: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Every tensor of a lazy model as it stands: outer ones, layers as the store has them."""
    store = layer_store(lazy)
    state = {k: v for k, v in lazy.state_dict().items() if not v.is_meta}
    for index in range(len(store)):
        if store.is_resident(index):
            state.update({n: lazy.get_parameter(n).detach() for n in store.names(index)})
        else:
            state.update(store.tensors(index))
    return state


def weight_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.safetensors"))


def assert_loads_as(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype, name
        assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_a_lazy_model_shards_as_save_pretrained_and_loads(tiny_cache, tmp_path, name):
    eager, lazy, tokenizer, replaced = changed_models(name)
    store = layer_store(lazy)
    assert store.is_resident(2) and not store.is_resident(1)
    store.save_pretrained(tmp_path / "lazy", tokenizer, max_shard_size=LIMIT)
    eager.save_pretrained(tmp_path / "eager", max_shard_size=LIMIT)

    folder = tmp_path / "lazy"
    files = weight_files(folder)
    count = len(files)
    assert count > 2 and not (folder / SINGLE_FILE).exists()
    assert files == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    index = json.loads((folder / INDEX_FILE).read_text())
    # save_pretrained's split, names and index, byte for byte.
    assert files == weight_files(tmp_path / "eager")
    assert (folder / INDEX_FILE).read_text() == (tmp_path / "eager" / INDEX_FILE).read_text()
    for file in files:
        assert (folder / file).read_bytes() == (tmp_path / "eager" / file).read_bytes(), file

    # The index covers every tensor written, once; total_size is their bytes; the limit holds.
    written: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(folder / file), framework="pt") as handle:
            shard = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        assert all(index["weight_map"][key] == file for key in shard)
        size = sum(nbytes(t) for t in shard.values())
        assert size <= LIMIT_BYTES or len(shard) == 1, (file, size)
        assert not written.keys() & shard.keys()
        written.update(shard)
    assert index["weight_map"].keys() == written.keys()
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in written.values())
    assert index["metadata"]["total_parameters"] == lazy.num_parameters()

    # from_pretrained loads it; its tensors are the lazy model's, changed layers included.
    expected = lazy_tensors(lazy)
    assert_loads_as(folder, {n: expected[n] for n in eager.state_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    for param_name, value in replaced.items():  # the replaced layer's new values, not the base
        assert torch.equal(reloaded.get_parameter(param_name), value), param_name
        assert not torch.equal(store.tensors(1, original=True)[param_name], value)
    pruned = next(iter(prunable_weights(eager, 2)))  # the layer pruned in memory
    assert (reloaded.get_parameter(pruned) == 0).float().mean() >= 0.5
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_the_default_is_one_file_without_an_index(tiny_cache, tmp_path):
    eager, lazy, tokenizer, _ = changed_models("tiny-llama")
    layer_store(lazy).save_pretrained(tmp_path / "model", tokenizer)
    assert weight_files(tmp_path / "model") == [SINGLE_FILE]
    assert not (tmp_path / INDEX_FILE).exists() and not (tmp_path / "model" / INDEX_FILE).exists()
    eager.save_pretrained(tmp_path / "eager")
    single = (tmp_path / "model" / SINGLE_FILE).read_bytes()
    assert single == (tmp_path / "eager" / SINGLE_FILE).read_bytes()
    assert_loads_as(tmp_path / "model", eager.state_dict())
    # A later save with shards leaves no stale single file behind (it would win over the index).
    layer_store(lazy).save_pretrained(tmp_path / "model", max_shard_size=LIMIT)
    assert SINGLE_FILE not in weight_files(tmp_path / "model")
    assert (tmp_path / "model" / INDEX_FILE).is_file()


def test_the_default_is_transformers_default():
    assert RunConfig().max_shard_size == DEFAULT_MAX_SHARD_SIZE == "50GB"
    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"]
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert default.default == DEFAULT_MAX_SHARD_SIZE
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'max-shard-size = "{DEFAULT_MAX_SHARD_SIZE}"' in pyproject


def test_at_most_one_decoder_layer_is_in_memory_while_saving(tiny_cache, tmp_path, monkeypatch):
    _, lazy, tokenizer, _ = changed_models("tiny-llama")
    real = LayerStore._latest
    alive: list[weakref.ref] = []
    reads: list[int] = []

    def latest(self, index):
        assert not [ref for ref in alive if ref() is not None], "an earlier layer is still held"
        tensors = real(self, index)
        alive.extend(weakref.ref(t) for t in tensors.values())
        reads.append(index)
        return tensors

    monkeypatch.setattr(LayerStore, "_latest", latest)
    layer_store(lazy).save_pretrained(tmp_path / "one", tokenizer)  # one file: every layer
    assert sorted(reads) == [0, 1, 2, 3]
    reads.clear()
    layer_store(lazy).save_pretrained(tmp_path / "shards", max_shard_size=LIMIT)
    assert set(reads) == {0, 1, 2, 3}


@pytest.mark.parametrize("value", ["", "50", "5GiB", "GB", "-1MB", "0KB", "infGB", "nanGB", "5 XB"])
def test_a_bad_max_shard_size_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="max-shard-size"):
        RunConfig.from_mapping({"max-shard-size": value})


@pytest.mark.parametrize("value", ["50GB", "500MB", "1.5GB", "100kb", "2TB"])
def test_sizes_save_pretrained_takes_are_accepted(value):
    assert RunConfig.from_mapping({"max-shard-size": value}).max_shard_size == value


@pytest.mark.parametrize("server", ["lazy", "eager"])
def test_a_run_saves_a_folder_that_loads_as_the_model_it_evaluated(
    tiny_cache, tmp_path, monkeypatch, server
):
    if server == "eager":  # the server as before decoder layers stayed on disk
        real = federation.load_model
        monkeypatch.setattr(
            federation, "load_model", lambda spec, **kw: real(spec, **{**kw, "lazy": False})
        )
    settings = {
        "model": "tiny-llama",
        "seqlen": 64,
        "calib-samples": 2,
        "eval-windows": 2,
        "resolve": False,
        "standalone-eval": False,
        "max-shard-size": LIMIT,
        "output-dir": str(tmp_path),
    }
    config = RunConfig.from_mapping(settings)
    grid = InProcessGrid.simulation(client_app, 2, {})
    run_dir = run_federation(grid, config, run_id=71 if server == "lazy" else 72)
    folder = run_dir / "model"
    assert (folder / INDEX_FILE).is_file() and len(weight_files(folder)) > 2
    report = json.loads((run_dir / "report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sparsity_report(model)["overall"] == report["sparsity"]["overall"] >= 0.5
    _, tokenizer = load_model("tiny-llama")
    scores = Evaluator(config, tokenizer)(model, "reloaded")
    assert dict(scores) == report["perplexity"]["global"]
    # The weights on disk are the ones in the index, nothing else.
    on_disk = {}
    for file in weight_files(folder):
        on_disk.update(safetensors.torch.load_file(str(folder / file)))
    index = json.loads((folder / INDEX_FILE).read_text())
    assert on_disk.keys() == index["weight_map"].keys()
