"""Clients' pruned layers kept in the run folder (``replies/``).

The server keeps each accepted reply of a client's own pruned layers to score the client's
model after the rounds (the report's ``standalone``), and deletes them once scored unless
``keep-replies`` asks for them.
"""

from __future__ import annotations

from pathlib import Path


def store_reply(folder: Path, files: dict[int, list[Path]], node: int, data: bytes) -> None:
    """Write ``data`` as node ``node``'s next part, and list it in ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"node-{node}-part-{len(files.get(node, []))}.safetensors"
    path.write_bytes(data)
    files.setdefault(node, []).append(path)


def drop_replies(folder: Path | None, files: dict[int, list[Path]]) -> None:
    """Delete the parts listed in ``files`` (and ``folder``, if that leaves it empty)."""
    for paths in files.values():
        for path in paths:
            path.unlink(missing_ok=True)
    files.clear()
    if folder is not None and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
