"""The on-disk cache of converted models, and writes that concurrent readers never see half of."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel


def cache_dir() -> Path:
    """Where converted models live: ``$FEDSPALLM_CACHE`` or ``~/.cache/fedspallm``."""
    root = os.environ.get("FEDSPALLM_CACHE") or Path.home() / ".cache" / "fedspallm"
    return Path(root)


def save_atomically(model: PreTrainedModel, tokenizer, target: Path) -> None:
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
        remove_tree(staging)


def remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
