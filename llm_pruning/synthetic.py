"""Built-in synthetic large models: real LLaMA shapes, seeded random weights, no download.

``synthetic-1b`` and ``synthetic-7b`` exist to test the mechanics of scale (memory per node,
message sizes, time per layer) offline. Their weights carry no knowledge; their tokenizer is
the 257-token byte tokenizer of :func:`llm_pruning.models.byte_tokenizer`, so only ids below
257 ever occur, but the embedding keeps its full size so memory figures stay realistic.

Parameter counts (bf16 = 2 bytes each), checked in ``tests/test_synthetic.py``:

``synthetic-1b`` (LLaMA-3.2-1B shape; h = 2048, i = 8192, 16 layers, 32 heads, 8 KV heads of
64, tied head)::

    embed_tokens  128256 * 2048                        =   262,668,288
    one layer     q, o: 2 * 2048 * 2048                =     8,388,608
                  k, v: 2 * 2048 * (8 * 64)            =     2,097,152
                  gate, up, down: 3 * 2048 * 8192      =    50,331,648
                  two RMSNorms: 2 * 2048               =         4,096
                                                         -------------
                                                            60,821,504
    16 layers                                          =   973,144,064
    final norm                                         =         2,048
    total                                              = 1,235,814,400  (2.47 GB in bf16)

``synthetic-7b`` (LLaMA-2-7B shape; h = 4096, i = 11008, 32 layers, 32 heads, no GQA, untied
head)::

    embed_tokens + lm_head  2 * 32000 * 4096           =   262,144,000
    one layer     q, k, v, o: 4 * 4096 * 4096          =    67,108,864
                  gate, up, down: 3 * 4096 * 11008     =   135,266,304
                  two RMSNorms: 2 * 4096               =         8,192
                                                         -------------
                                                           202,383,360
    32 layers                                          = 6,476,267,520
    final norm                                         =         4,096
    total                                              = 6,738,415,616  (13.48 GB in bf16)

:func:`write_synthetic` never holds the whole model: it writes one shard for the embeddings,
final norm and head, then one shard per decoder layer, each freed before the next is drawn.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llm_pruning.cache import remove_tree
from llm_pruning.tiny import byte_tokenizer

log = logging.getLogger(__name__)

SYNTHETIC_MODELS: dict[str, dict] = {
    "synthetic-1b": dict(  # LLaMA-3.2-1B
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    "synthetic-7b": dict(  # LLaMA-2-7B
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}
SYNTHETIC_SEED = 1234
DTYPE = torch.bfloat16
# Values drawn per call in float32 before the cast: 64 MiB of scratch, whatever the tensor.
_CHUNK = 1 << 24
# Output projections of the residual branches, whose std is scaled down with depth.
_RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def synthetic_config(name: str) -> LlamaConfig:
    """The saved config of built-in synthetic model ``name``: bf16, byte-tokenizer EOS ids."""
    if name not in SYNTHETIC_MODELS:
        raise ValueError(
            f"model: unknown synthetic model '{name}'; known: " + ", ".join(SYNTHETIC_MODELS)
        )
    eos = byte_tokenizer().eos_token_id
    return LlamaConfig(**SYNTHETIC_MODELS[name], bos_token_id=eos, eos_token_id=eos, dtype=DTYPE)


def parameter_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored parameter of ``LlamaForCausalLM(config)``, no weights."""
    return {name: tuple(shape) for name, (shape, _) in _parameter_kinds(config).items()}


def write_synthetic(
    name_or_config: str | LlamaConfig, target: Path, seed: int = SYNTHETIC_SEED
) -> Path:
    """Write a seeded random LLaMA model as a sharded Hugging Face folder at ``target``.

    Shard 1 holds the embeddings, the final norm and (when untied) ``lm_head``; shard
    ``k + 2`` holds decoder layer ``k``. Each shard is drawn, saved and freed before the next,
    so memory peaks at about the largest shard plus 64 MiB of float32 scratch (safetensors
    0.8 writes straight from the tensors' memory; older releases add one byte copy), never at
    the model's size. The folder appears atomically: it is written to a sibling
    ``<target>.tmp-<pid>`` and renamed.
    """
    if isinstance(name_or_config, str):
        config = synthetic_config(name_or_config)
        label = name_or_config
    else:
        config = copy.deepcopy(name_or_config)
        config.dtype = DTYPE
        label = f"synthetic llama ({config.num_hidden_layers} layers)"
    config.architectures = ["LlamaForCausalLM"]
    tokenizer = byte_tokenizer()
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"model: synthetic vocab_size {config.vocab_size} is smaller than the byte "
            f"tokenizer's {len(tokenizer)} tokens"
        )
    kinds = _parameter_kinds(config)
    shards = _shard_plan(config, list(kinds))
    element_size = torch.finfo(DTYPE).bits // 8
    total_parameters = sum(math.prod(shape) for shape, _ in kinds.values())
    log.info(
        "Writing %s (%.2f B parameters, %.2f GB in %s, %d shards) to %s (once)",
        label,
        total_parameters / 1e9,
        total_parameters * element_size / 1e9,
        str(DTYPE).removeprefix("torch."),
        len(shards),
        target,
    )

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if staging.exists():  # left by a crashed run of a process that had our pid
        remove_tree(staging)
    staging.mkdir()
    try:
        weight_map: dict[str, str] = {}
        for index, names in enumerate(tqdm(shards, desc=f"writing {label}", unit="shard")):
            filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: _draw(name, *kinds[name], config, seed) for name in names}
            save_file(tensors, staging / filename, metadata={"format": "pt"})
            del tensors  # free this shard before the next one is drawn
            weight_map.update(dict.fromkeys(names, filename))
        index_json = {
            "metadata": {
                "total_parameters": total_parameters,
                "total_size": total_parameters * element_size,
            },
            "weight_map": weight_map,
        }
        (staging / "model.safetensors.index.json").write_text(
            json.dumps(index_json, indent=2, sort_keys=True) + "\n"
        )
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    except BaseException:
        remove_tree(staging)
        raise
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical
        if not (target / "config.json").is_file():
            raise
        remove_tree(staging)
    return target


def _parameter_kinds(config: LlamaConfig) -> dict[str, tuple[torch.Size, type]]:
    """Name -> (shape, owning module type), read from a model built on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    kinds = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the head is the embedding matrix; from_pretrained re-ties it
        module = model.get_submodule(name.rpartition(".")[0])
        kinds[name] = (parameter.shape, type(module))
    return kinds


def _shard_plan(config: LlamaConfig, names: list[str]) -> list[list[str]]:
    """Parameter names per shard: everything outside the layers first, then layer by layer."""
    layers: list[list[str]] = [[] for _ in range(config.num_hidden_layers)]
    rest = []
    for name in names:
        if name.startswith("model.layers."):
            layers[int(name.split(".")[2])].append(name)
        else:
            rest.append(name)
    return [rest, *layers]


def _draw(
    name: str, shape: torch.Size, module_type: type, config: LlamaConfig, seed: int
) -> torch.Tensor:
    """The values of parameter ``name``: a function of ``(seed, name)`` only, in bf16."""
    if module_type is LlamaRMSNorm:
        return torch.ones(shape, dtype=DTYPE)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=DTYPE)
    std = config.initializer_range  # 0.02: embeddings, q/k/v, gate/up and an untied head
    if module_type is nn.Linear and name.split(".")[-2] in _RESIDUAL_OUTPUTS:
        # GPT-2 / Megatron scaled init: each of the 2L residual branches adds its output's
        # variance to the residual stream, so shrinking their output projections by
        # 1/sqrt(2L) keeps that stream's scale independent of depth (no bf16 blow-up at 32).
        std /= math.sqrt(2 * config.num_hidden_layers)
    generator = torch.Generator().manual_seed(_name_seed(seed, name))
    out = torch.empty(shape, dtype=DTYPE)
    flat = out.view(-1)
    scratch = torch.empty(min(_CHUNK, flat.numel()), dtype=torch.float32)
    for start in range(0, flat.numel(), _CHUNK):
        part = scratch[: min(_CHUNK, flat.numel() - start)]
        part.normal_(0.0, std, generator=generator)
        flat[start : start + part.numel()].copy_(part)  # rounds to bf16
    return out


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from ``(seed, name)``, stable across processes and runs
    (unlike ``hash()``, which Python salts per process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
