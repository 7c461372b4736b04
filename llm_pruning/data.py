"""Calibration and evaluation text: sources -> documents -> private shards -> token segments.

A text source is one of:

- ``python-docs``: Python's own documentation (``pydoc_data.topics``), shipped with CPython.
  Every fifth topic (sorted by name, starting with the third: about 23 % of the text) is held
  out for evaluation and never used to calibrate;
- a local ``.txt`` file (one document), ``.jsonl`` file (one document per line, field
  ``text``), or a directory of them (files in sorted name order);
- ``wikitext2``, ``c4``, ``ptb`` (the loaders used by SparseGPT and Wanda) or any other
  ``datasets`` name with a ``text`` column (needs the network; a federated run takes these as
  ``owner/name`` ids and refuses any other one-word name before a node works).

Shards are deterministic functions of ``(seed, partition_id, num_partitions)``: every node
computes its own without talking to anyone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("python-docs",)
PARTITIONS = ("by-document", "iid")
# python-docs: topics 2, 7, 12, ... (sorted by name) are evaluation-only, ~0.1 M characters.
HELD_OUT_EVERY, HELD_OUT_OFFSET = 5, 2
# The hub datasets loaded by their short names (any other: its `datasets` id, owner/name).
HUB_DATASETS = ("wikitext2", "c4", "ptb")


def load_documents(source: str, *, split: str = "train") -> list[str]:
    """The documents of ``source``; ``split`` is ``train`` (calibration) or ``eval``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if source == "python-docs":
        return _python_docs(split)
    path = Path(source).expanduser()
    if path.exists():
        documents = _local_documents(path)
    elif path.suffix in (".txt", ".jsonl") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"text file or directory not found: {path}")
    else:
        documents = _hub_documents(source, split)
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise ValueError(f"no text found in '{source}'")
    return documents


def _python_docs(split: str) -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    held_out = {
        name for index, name in enumerate(names) if index % HELD_OUT_EVERY == HELD_OUT_OFFSET
    }
    wanted = held_out if split == "eval" else set(names) - held_out
    return [topics[name] for name in names if name in wanted]


def _local_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"directory {path} holds no .txt or .jsonl files")
        return [doc for file in files for doc in _local_documents(file)]
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    return [path.read_text(encoding="utf-8")]


def _jsonl_documents(path: Path) -> list[str]:
    documents = []
    # JSON Lines are separated by "\n" alone: str.splitlines would also split at U+2028, U+2029
    # and U+0085, which json.dumps(..., ensure_ascii=False) leaves unescaped inside strings.
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string field 'text'")
        documents.append(record["text"])
    return documents


def _hub_documents(name: str, split: str) -> list[str]:
    """Standard conventions: WikiText-2 raw (joined by blank lines), C4 shard 0, PTB sentences."""
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=_hub_split(split, "test"))
            return ["\n\n".join(rows["text"])]
        if name == "ptb":
            rows = load_dataset(
                "ptb_text_only", "penn_treebank", split=_hub_split(split, "validation")
            )
            return [" ".join(rows["sentence"])]
        if name == "c4":
            shard = "train" if split == "train" else "validation"
            files = {shard: f"en/c4-{shard}.00000-of-{1024 if shard == 'train' else 8:05d}.json.gz"}
            rows = load_dataset("allenai/c4", data_files=files, split=shard)
            return list(rows["text"][:5000])
        rows = load_dataset(name, split=_hub_split(split, "test"))
        return list(rows["text"])
    except (OSError, ConnectionError, ValueError) as error:
        raise OSError(
            f"could not load the dataset '{name}' ({error}). It is neither a built-in corpus "
            f"({', '.join(BUILTIN_CORPORA)}) nor a local path; if this machine is offline, pass "
            "a local .txt/.jsonl file or a directory of them instead."
        ) from error


def _hub_split(split: str, eval_split: str) -> str:
    return "train" if split == "train" else eval_split


def shard_documents(documents: Sequence[str], partition_id: int, num_partitions: int) -> list[str]:
    """Whole documents round-robin: partition k gets documents k, k+K, k+2K, ..."""
    _check_partition(partition_id, num_partitions)
    if len(documents) < num_partitions:
        raise ValueError(
            f"partition 'by-document' needs at least one document per client: "
            f"{len(documents)} documents for {num_partitions} clients; use partition = 'iid' "
            "or give more documents"
        )
    return list(documents[partition_id::num_partitions])


def _check_partition(partition_id: int, num_partitions: int) -> None:
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id must be in [0, num-partitions): got {partition_id} of {num_partitions}"
        )


def tokenize(documents: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """One long 1-D token stream of the documents joined by blank lines."""
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_segments(
    tokens: torch.Tensor, seqlen: int, count: int, rng: np.random.Generator
) -> torch.Tensor:
    """``count`` windows of ``seqlen`` tokens at random starts (the SparseGPT convention)."""
    if count < 1:
        raise ValueError(f"calib-samples must be at least 1, got {count}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if tokens.numel() < seqlen:
        raise ValueError(
            f"calibration text too short: {tokens.numel()} tokens, but seqlen is {seqlen}; "
            "lower seqlen or give more text"
        )
    if count * seqlen > tokens.numel():  # e.g. fresh recovery windows for many rounds
        log.warning(
            "%d windows of %d tokens need %d tokens, but the text has %d: the windows repeat "
            "text (give more text, or fewer samples or rounds)",
            count,
            seqlen,
            count * seqlen,
            tokens.numel(),
        )
    starts = rng.integers(0, tokens.numel() - seqlen + 1, size=count)
    return torch.stack([tokens[start : start + seqlen] for start in starts.tolist()])  # (N, T)


def calibration_segments(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seqlen: int,
    num_segments: int,
    partition: str = "by-document",
    partition_id: int = 0,
    num_partitions: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """The calibration segments ``(num_segments, seqlen)`` of one client's private shard.

    ``by-document``: the client's whole documents, then random windows from them.
    ``iid``: windows drawn from the whole corpus; client k takes the k-th block of them, so
    shards are disjoint draws of one seeded sample.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}; got {partition!r}")
    _check_partition(partition_id, num_partitions)
    documents = load_documents(source, split="train")
    if partition == "by-document":
        shard = shard_documents(documents, partition_id, num_partitions)
        rng = np.random.default_rng([seed, partition_id])
        return sample_segments(tokenize(shard, tokenizer), seqlen, num_segments, rng)
    pooled = sample_segments(
        tokenize(documents, tokenizer),
        seqlen,
        num_segments * num_partitions,
        np.random.default_rng(seed),
    )
    return pooled[partition_id * num_segments : (partition_id + 1) * num_segments]


def pooled_segments(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_partitions: int,
    **kwargs,
) -> torch.Tensor:
    """The union of every client's shard: what centralized pruning would calibrate on."""
    return torch.cat(
        [
            calibration_segments(
                source, tokenizer, partition_id=k, num_partitions=num_partitions, **kwargs
            )
            for k in range(num_partitions)
        ]
    )


def eval_tokens(source: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The evaluation token stream of ``source`` (held-out topics for ``python-docs``)."""
    return tokenize(load_documents(source, split="eval"), tokenizer)
