"""Any decoder-only family, with no table entry: the generic finder, pruning, calibration and
whole federations on tiny random models of each family; `ignore`; mixtures of experts refused.

Every model is built from its transformers config class (hidden 32, 2 layers, a 257-token
byte vocabulary), no hub access. Sliding windows of 4 tokens on 16-token segments make
Gemma's and Qwen2's sliding and global layers receive different attention masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers as hf
from flwr.app import ConfigRecord

from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.wire.protocol import request_from_record, request_record
from llm_pruning.engine import LayerwiseCalibrator, prune_model
from llm_pruning.evaluate import perplexity
from llm_pruning.families import family_of, num_layers, prunable_weights
from llm_pruning.models import load_model
from llm_pruning.pruners import SparsityPattern, get_pruner
from llm_pruning.tiny import byte_tokenizer
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

VOCAB = 257  # byte_tokenizer(): 256 bytes + EOS
SEQLEN = 16
_IDS = dict(pad_token_id=256, bos_token_id=256, eos_token_id=256)
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    **_IDS,
)
_GQA = dict(num_key_value_heads=2)
_SLIDING = ["sliding_attention", "full_attention"]


def make_config(family: str):
    if family == "llama":
        return hf.LlamaConfig(**_COMMON, **_GQA)
    if family == "mistral":
        return hf.MistralConfig(**_COMMON, **_GQA, sliding_window=4)
    if family == "qwen2":  # layer 0 full attention, layer 1 sliding (max_window_layers=1)
        return hf.Qwen2Config(
            **_COMMON, **_GQA, use_sliding_window=True, sliding_window=4, max_window_layers=1
        )
    if family == "qwen3":
        return hf.Qwen3Config(**_COMMON, **_GQA, head_dim=8)
    if family == "phi3":
        return hf.Phi3Config(**_COMMON, **_GQA)
    if family == "gemma2":  # sliding then global layers, final logit soft-capping at 30
        return hf.Gemma2Config(**_COMMON, **_GQA, head_dim=8, sliding_window=4)
    if family == "gemma3_text":
        return hf.Gemma3TextConfig(
            **_COMMON, **_GQA, head_dim=8, sliding_window=4, layer_types=_SLIDING
        )
    if family == "opt":
        return hf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **_IDS,
        )
    if family == "gpt_neox":
        return hf.GPTNeoXConfig(**_COMMON)
    raise KeyError(family)


_LLAMA_LIKE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# family -> (decoder-layer list, its prunable Linears, the final norm before the LM head)
EXPECTED = {
    "llama": ("model.layers", _LLAMA_LIKE, "model.norm"),
    "mistral": ("model.layers", _LLAMA_LIKE, "model.norm"),
    "qwen2": ("model.layers", _LLAMA_LIKE, "model.norm"),
    "qwen3": ("model.layers", _LLAMA_LIKE, "model.norm"),
    "phi3": (
        "model.layers",
        ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        "model.norm",
    ),
    "gemma2": ("model.layers", _LLAMA_LIKE, "model.norm"),
    "gemma3_text": ("model.layers", _LLAMA_LIKE, "model.norm"),
    "opt": (
        "model.decoder.layers",
        (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ),
        "model.decoder.final_layer_norm",
    ),
    "gpt_neox": (
        "gpt_neox.layers",
        (
            "attention.query_key_value",
            "attention.dense",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        ),
        "gpt_neox.final_layer_norm",
    ),
}
FAMILY_NAMES = sorted(EXPECTED)


def build(family: str) -> hf.PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = hf.AutoModelForCausalLM.from_config(make_config(family), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> a local model directory (save_pretrained + the byte tokenizer), built once."""
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for family in FAMILY_NAMES:
        folders[family] = root / family
        build(family).save_pretrained(folders[family])
        byte_tokenizer().save_pretrained(folders[family])
    return folders


@pytest.fixture
def segments() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, SEQLEN), generator=generator)  # (N, T)


# --- (a) the generic finder ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_finder_returns_each_familys_decoder_layers_and_linears(family):
    model = build(family)
    layers_path, linears, norm = EXPECTED[family]
    found = family_of(model)
    assert found.layers == layers_path and found.linears == linears
    layers = found.layers_of(model)
    assert layers is model.get_submodule(layers_path) and len(layers) == 2
    assert num_layers(model) == 2
    weights = prunable_weights(model, 1)
    assert list(weights) == [f"{layers_path}.1.{name}.weight" for name in linears]
    parameters = dict(model.named_parameters())
    assert all(weights[name].weight is parameters[name] for name in weights)
    if family != "gemma2":  # Gemma 2 soft-caps its logits: not a module the table could run
        assert found.final_modules(model)[0] is model.get_submodule(norm)


def test_gemma2_final_modules_fail_naming_the_soft_capping():
    with pytest.raises(ValueError, match="gemma2.*soft-caps its logits"):
        family_of(build("gemma2")).final_modules(build("gemma2"))


# --- (b) exact sparsity per matrix ------------------------------------------------------------


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruning_any_family_gives_exact_sparsity_per_matrix(family, pruner, segments):
    model = build(family)
    dense = {n: lin.weight.detach().clone() for n, lin in prunable_weights(model, 0).items()}
    result = prune_model(model, segments, get_pruner(pruner), SparsityPattern(0.5), progress=False)
    expected = {name for index in range(2) for name in prunable_weights(model, index)}
    assert set(result.masks) == expected
    for index in range(2):
        for name, linear in prunable_weights(model, index).items():
            keep = result.masks[name]
            assert int((~keep).sum()) == keep.numel() // 2, name
            assert torch.all(linear.weight[~keep] == 0), name
    if pruner != "sparsegpt":  # the others keep the dense values
        for name, weight in dense.items():
            keep = result.masks[name]
            assert torch.equal(prunable_weights(model, 0)[name].weight[keep], weight[keep])


# --- (c) layer-0 capture reproduces the model's own hidden states ------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layer_by_layer_calibration_reproduces_the_models_hidden_states(family, segments):
    """Gemma's scaled embeddings, rotary tables, and per-layer masks (sliding vs global) all
    reach each layer as the model's own forward gives them."""
    model = build(family)
    with torch.no_grad():
        expected = model(
            input_ids=segments, output_hidden_states=True, use_cache=False
        ).hidden_states  # embeddings, one per layer; the last one after the final norm
    calibrator = LayerwiseCalibrator(model, segments)
    torch.testing.assert_close(calibrator.hidden, expected[0])
    calibrator.advance(0)
    torch.testing.assert_close(calibrator.hidden, expected[1])
    calibrator.advance(1)
    norm = model.get_submodule(EXPECTED[family][2])
    with torch.no_grad():
        torch.testing.assert_close(norm(calibrator.hidden), expected[2])


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen2"])
def test_sliding_and_global_layers_get_their_own_arguments(family, segments):
    calls = LayerwiseCalibrator(build(family), segments).layer_calls
    first, second = (call.kwargs["attention_mask"] for call in calls)
    assert first is not second  # reusing layer 0's mask would be wrong for layer 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_lazy_model_scores_the_perplexity_of_the_eager_one(family, model_dirs):
    """Layer-by-layer evaluation runs the model's own head (Gemma 2's soft-capping too)."""
    tokens = torch.randint(0, 256, (3 * SEQLEN,), generator=torch.Generator().manual_seed(1))
    eager, _ = load_model(str(model_dirs[family]))
    lazy, _ = load_model(str(model_dirs[family]), lazy=True)
    expected = perplexity(eager, tokens, seqlen=SEQLEN)
    assert perplexity(lazy, tokens, seqlen=SEQLEN) == pytest.approx(expected, rel=1e-5)


# --- mixtures of experts ------------------------------------------------------------------------


def _mixtral():
    config = hf.MixtralConfig(**_COMMON, **_GQA, num_local_experts=4, num_experts_per_tok=2)
    return hf.AutoModelForCausalLM.from_config(config)


def _qwen3_moe():
    config = hf.Qwen3MoeConfig(
        **_COMMON, **_GQA, head_dim=8, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    return hf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("build_moe", "model_type"), [(_mixtral, "mixtral"), (_qwen3_moe, "qwen3_moe")]
)
def test_a_mixture_of_experts_is_refused_naming_the_model_type_and_why(build_moe, model_type):
    with pytest.raises(ValueError, match=f"'{model_type}'.*mixture-of-experts.*routed"):
        family_of(build_moe())


def test_loading_a_mixture_of_experts_fails_at_load(tmp_path):
    _mixtral().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    for lazy in (False, True):
        with pytest.raises(ValueError, match="'mixtral'.*mixture-of-experts"):
            load_model(str(tmp_path), lazy=lazy)


# --- ignore ---------------------------------------------------------------------------------


def test_ignored_linears_stay_dense_and_out_of_the_masks(model_dirs, segments):
    model, _ = load_model(str(model_dirs["gemma3_text"]), ignore=("mlp.down_proj", "*.k_proj"))
    family = family_of(model)
    assert family.ignored == ("self_attn.k_proj", "mlp.down_proj")
    assert family.linears == tuple(n for n in _LLAMA_LIKE if n not in family.ignored)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    result = prune_model(
        model, segments, get_pruner("sparsegpt"), SparsityPattern(0.5), progress=False
    )
    assert set(result.masks) == {
        f"model.layers.{i}.{name}.weight" for i in range(2) for name in family.linears
    }
    after = model.state_dict()
    for index in range(2):
        for name in family.ignored:
            key = f"model.layers.{index}.{name}.weight"
            assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (("mlp.nothing",), r"ignore: pattern\(s\) \['mlp.nothing'\] match no prunable Linear"),
        (("model.layers.0.mlp.down_proj",), "relative to a decoder layer"),
        (("*",), "leave no Linear to prune"),
    ],
)
def test_an_ignore_pattern_that_matches_nothing_fails_at_load(model_dirs, patterns, message):
    with pytest.raises(ValueError, match=message):
        load_model(str(model_dirs["phi3"]), ignore=patterns)


def test_ignore_is_parsed_validated_and_reaches_the_clients():
    config = RunConfig.from_mapping({"ignore": "mlp.down_proj, *.k_proj"})
    assert config.ignore == ("mlp.down_proj", "*.k_proj")
    assert RunConfig.from_mapping({}).ignore == ()
    received, _ = request_from_record(ConfigRecord(dict(request_record(config, [0]))))
    assert received.ignore == config.ignore
    for bad in ("mlp down_proj", "mlp/down_proj", "mlp.down_proj;rm"):
        with pytest.raises(ConfigError, match="ignore"):
            RunConfig.from_mapping({"ignore": bad})


# --- (d) whole federations --------------------------------------------------------------------


def federate(model_dir: Path, tmp_path: Path, run_id: int, **overrides) -> Path:
    settings = {
        "model": str(model_dir),
        "seqlen": 32,
        "calib-samples": 2,
        "eval-windows": 1,
        "standalone-eval": False,
        "output-dir": str(tmp_path),
        **overrides,
    }
    config = RunConfig.from_mapping(settings)
    return run_federation(InProcessGrid.simulation(client_app, 2, {}), config, run_id=run_id)


def saved_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((run_dir / "model").glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(str(file)))
    return tensors


@pytest.mark.parametrize("family", ["gemma2", "phi3", "gpt_neox"])
def test_a_federation_prunes_a_family_without_a_table_entry(family, model_dirs, tmp_path):
    run_dir = federate(model_dirs[family], tmp_path, run_id=41)
    report = json.loads((run_dir / "report.json").read_text())
    layers_path, linears, _ = EXPECTED[family]
    per_matrix = report["sparsity"]["per_matrix"]
    assert set(per_matrix) == {f"{layers_path}.{i}.{n}.weight" for i in range(2) for n in linears}
    assert all(value >= 0.5 for value in per_matrix.values()), per_matrix
    assert all(value < 0.51 for value in per_matrix.values()), per_matrix
    assert set(report["perplexity"]) >= {"dense", "global"}
    saved = hf.AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert saved.config.model_type == family


def test_a_federation_with_ignore_leaves_those_linears_dense_on_every_side(model_dirs, tmp_path):
    """Clients omit the ignored matrices from their replies and the server expects none:
    the run completes (a reply with a matrix too many or too few would be rejected)."""
    folder = model_dirs["gemma3_text"]
    run_dir = federate(folder, tmp_path, run_id=42, ignore="mlp.down_proj,*.k_proj")
    report = json.loads((run_dir / "report.json").read_text())
    assert not report.get("excluded-nodes")
    per_matrix = report["sparsity"]["per_matrix"]
    assert not [name for name in per_matrix if "down_proj" in name or "k_proj" in name]
    assert len(per_matrix) == 2 * 5 and all(v >= 0.5 for v in per_matrix.values())
    dense = saved_tensors_of_folder(folder)
    saved = saved_tensors(run_dir)
    for index in range(2):
        for name in ("mlp.down_proj", "self_attn.k_proj"):
            key = f"model.layers.{index}.{name}.weight"
            assert torch.equal(saved[key], dense[key]), key


def saved_tensors_of_folder(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "model.safetensors"))


def test_a_federation_refuses_an_ignore_pattern_before_any_client_work(model_dirs, tmp_path):
    grid = InProcessGrid.simulation(client_app, 2, {})
    config = RunConfig.from_mapping(
        {"model": str(model_dirs["phi3"]), "seqlen": 32, "ignore": "mlp.down",
         "output-dir": str(tmp_path)}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="ignore: .*'mlp.down'"):
        run_federation(grid, config, run_id=43)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]
