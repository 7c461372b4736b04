"""Server checkpoints: after every round, what a restarted server needs to go on exactly.

A checkpoint folder holds one ``round-<r>.safetensors`` per finished round (the merged
matrices of the layers finished in that round) and ``state.json`` (pending layers, the
sampling and tie-break generators' states, the accounting). ``state.json`` is written last
and atomically, so a server killed mid-write leaves the previous, consistent checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


def save_round(
    folder: Path, completed_round: int, matrices: dict[str, torch.Tensor], state: dict
) -> None:
    """Add one round's finished matrices and replace the state."""
    folder.mkdir(parents=True, exist_ok=True)
    if matrices:
        save_file(
            {k: v.contiguous() for k, v in matrices.items()},
            folder / f"round-{completed_round}.safetensors",
        )
    staging = folder / f"{STATE_FILE}.tmp"
    staging.write_text(json.dumps({**state, "completed_round": completed_round}, indent=1))
    os.replace(staging, folder / STATE_FILE)


def load(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The state and every finished matrix of a checkpoint folder."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"resume-from: no checkpoint in {folder} (missing {STATE_FILE})")
    state = json.loads(state_path.read_text())
    matrices: dict[str, torch.Tensor] = {}
    for completed in range(1, state["completed_round"] + 1):
        path = folder / f"round-{completed}.safetensors"
        if path.is_file():
            matrices.update(load_file(path))
    return state, matrices


def numpy_rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def restore_numpy_rng(state: dict) -> np.random.Generator:
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def torch_rng_state(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def restore_torch_rng(generator: torch.Generator, encoded: str) -> None:
    raw = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).copy()
    generator.set_state(torch.from_numpy(raw))
