"""Server checkpoints: after every round, what a restarted server needs to go on exactly.

A checkpoint folder holds one ``round-<r>.safetensors`` per finished round (the merged
matrices of the layers finished in that round) and ``state.json`` (pending layers, the
sampling and tie-break generators' states, the accounting). ``state.json`` is written last
and atomically, so a server killed mid-write leaves the previous, consistent checkpoint.

A checkpoint read back on ``resume-from`` is trusted no more than a client's reply (DESIGN
§7): :func:`read` checks the state's keys and types, and every matrix's name, shape, dtype,
values and sparsity against the model and the run, before anything is restored; whatever is
wrong raises :class:`ConfigError` ("resume-from: ..."), before any train message is sent.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from fedspallm_strategy.config import ConfigError
from fedspallm_strategy.run.accounting import Accounting
from fedspallm_strategy.wire.safetensors_reader import PayloadError, parse_guarded
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.pruners import SparsityPattern, num_to_prune
from llm_pruning.pruners.masks import nm_group_counts

STATE_FILE = "state.json"
ROUND_FILE = re.compile(r"^round-(\d+)\.safetensors$")
# Every key of state.json and the JSON type it must have (save_round writes them all).
STATE_TYPES: dict[str, type] = {
    "config": dict,
    "remaining": list,
    "failed_names": list,
    "rng": dict,
    "generator": str,
    "accounting": dict,
    "reply_files": dict,
    "completed_round": int,
}
# The bit generators numpy's default_rng may have written (the state names its class).
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


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
    """The state and every finished matrix of a checkpoint folder, checked to parse."""
    state = read_state(folder)
    matrices: dict[str, torch.Tensor] = {}
    for completed, path in _round_files(folder):
        # A round file newer than the state is a round killed before its state was written.
        if completed > state["completed_round"]:
            continue
        found = _read_matrices(path)
        if again := sorted(set(found) & set(matrices)):
            raise _invalid(f"{path.name} repeats matrices of an earlier round: {_few(again)}")
        matrices.update(found)
    return state, matrices


@dataclass
class Restored:
    """A checked checkpoint, parsed into what the strategy continues from."""

    remaining: list[int]
    failed_names: set[str]
    rng: np.random.Generator
    generator: torch.Generator
    accounting: Accounting
    reply_files: dict[int, list[Path]]
    completed_round: int
    matrices: dict[str, torch.Tensor]


def read(
    folder: Path,
    *,
    model: PreTrainedModel,
    pattern: SparsityPattern,
    config: Mapping[str, object],
    complete: bool = True,
) -> Restored:
    """Read and check the checkpoint in ``folder`` for a run on ``model`` at ``pattern``.

    ``config`` is the run's resumable settings, which must equal the checkpoint's;
    ``complete``: whether every finished layer must have its matrices (rules that merge
    nothing, ``standalone``, checkpoint none). Raises :class:`ConfigError` for anything wrong.
    """
    state, matrices = load(folder)
    changed = sorted(
        key
        for key in set(state["config"]) | set(config)
        if state["config"].get(key) != config.get(key)
    )
    if changed:
        raise _invalid(f"the run config differs from the checkpoint's in {changed}")
    check_matrices(matrices, model, state["remaining"], pattern, complete=complete)
    try:
        generator = torch.Generator()
        restore_torch_rng(generator, state["generator"])
        return Restored(
            remaining=list(state["remaining"]),
            failed_names=set(state["failed_names"]),
            rng=restore_numpy_rng(state["rng"]),
            generator=generator,
            accounting=Accounting.from_json(state["accounting"]),
            reply_files={int(n): [Path(p) for p in ps] for n, ps in state["reply_files"].items()},
            completed_round=state["completed_round"],
            matrices=matrices,
        )
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise _invalid(
            f"{folder / STATE_FILE}: bad generator, accounting or reply-file state "
            f"({type(error).__name__}: {error})"
        ) from error


def read_state(folder: Path) -> dict:
    """``state.json``, with every key present and of its JSON type."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise _invalid(f"no checkpoint in {folder} (missing {STATE_FILE})")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not JSON
        raise _invalid(f"{path} is not readable JSON ({error})") from error
    if not isinstance(state, dict):
        raise _invalid(f"{path} must hold a JSON object, got {type(state).__name__}")
    for key, kind in STATE_TYPES.items():
        if key not in state:
            raise _invalid(f"{path} lacks '{key}'")
        if not _is_json(state[key], kind):
            raise _invalid(
                f"{path}: '{key}' must be a JSON {kind.__name__}, got {state[key]!r:.80}"
            )
    if state["completed_round"] < 0:
        raise _invalid(f"{path}: completed_round must be >= 0, got {state['completed_round']}")
    if not all(_is_json(layer, int) for layer in state["remaining"]):
        raise _invalid(f"{path}: 'remaining' must list layer ids, got {state['remaining']!r:.80}")
    if not all(isinstance(name, str) for name in state["failed_names"]):
        raise _invalid(f"{path}: 'failed_names' must list node names")
    for node, files in state["reply_files"].items():
        if not node.isdigit() or not isinstance(files, list):
            raise _invalid(f"{path}: 'reply_files' must map node ids to lists of paths")
        if not all(isinstance(file, str) for file in files):
            raise _invalid(f"{path}: 'reply_files' of node {node} must be paths")
    return state


def check_matrices(
    matrices: Mapping[str, torch.Tensor],
    model: PreTrainedModel,
    remaining: list[int],
    pattern: SparsityPattern,
    *,
    complete: bool = True,
) -> None:
    """Every matrix is one the run would have written: a prunable weight of a finished layer,
    of the model's shape and dtype, finite, at the run's sparsity (and N:M pattern); with
    ``complete``, every finished layer has all its matrices."""
    total = num_layers(model)
    if out := [layer for layer in remaining if not 0 <= layer < total]:
        raise _invalid(f"state.json: pending layers {out} are not in [0, {total})")
    if len(set(remaining)) != len(remaining):
        raise _invalid(f"state.json: pending layers {remaining} repeat a layer")
    weights = {
        name: (layer, linear.weight)
        for layer in range(total)
        for name, linear in prunable_weights(model, layer).items()
    }
    pending = set(remaining)
    for name, matrix in matrices.items():
        if name not in weights:
            raise _invalid(f"the checkpoint holds '{name}', not a prunable matrix of the model")
        layer, weight = weights[name]
        if layer in pending:
            raise _invalid(f"{name}: layer {layer} is pending in state.json, yet has a matrix")
        _check_matrix(name, matrix, weight, pattern)
    if complete:
        finished = (name for name, (layer, _) in weights.items() if layer not in pending)
        if missing := sorted(name for name in finished if name not in matrices):
            raise _invalid(f"finished layers lack their matrices {_few(missing)}")


def _check_matrix(
    name: str, matrix: torch.Tensor, weight: torch.Tensor, pattern: SparsityPattern
) -> None:
    if tuple(matrix.shape) != tuple(weight.shape) or matrix.dtype != weight.dtype:
        raise _invalid(
            f"{name}: {matrix.dtype} {tuple(matrix.shape)}, but the model's is "
            f"{weight.dtype} {tuple(weight.shape)}"
        )
    if not bool(torch.isfinite(matrix).all()):
        raise _invalid(f"{name}: values are not all finite")
    kept, allowed = int(torch.count_nonzero(matrix)), matrix.numel()
    allowed -= num_to_prune(matrix.numel(), pattern.sparsity)
    if kept > allowed:
        raise _invalid(
            f"{name}: {kept} non-zero entries, more than the {allowed} that sparsity "
            f"{pattern.sparsity:g} keeps"
        )
    if pattern.is_nm:
        if (most := int(nm_group_counts(matrix != 0, pattern.m).max())) > pattern.n:
            raise _invalid(
                f"{name}: a group of {pattern.m} input columns keeps {most} entries; "
                f"pattern {pattern.n}:{pattern.m} keeps {pattern.n}"
            )


def _round_files(folder: Path) -> list[tuple[int, Path]]:
    found = (ROUND_FILE.match(path.name) for path in folder.iterdir())
    return sorted((int(match.group(1)), folder / match.group(0)) for match in found if match)


def _read_matrices(path: Path) -> dict[str, torch.Tensor]:
    try:  # a truncated or garbled file raises anything, even a Rust panic: all are refused
        return parse_guarded(lambda: load_file(path), f"checkpoint file {path}")
    except PayloadError as error:
        raise _invalid(str(error)) from error


def _is_json(value: object, kind: type) -> bool:
    """``isinstance`` for JSON values: a bool is no int (Python says it is)."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _invalid(message: str) -> ConfigError:
    return ConfigError(f"resume-from: {message}")


def numpy_rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def restore_numpy_rng(state: dict) -> np.random.Generator:
    # Only a bit generator: the name is looked up in np.random, whose other names are functions.
    if state["bit_generator"] not in _BIT_GENERATORS:
        raise ValueError(f"unknown bit generator {state['bit_generator']!r}")
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def torch_rng_state(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def restore_torch_rng(generator: torch.Generator, encoded: str) -> None:
    raw = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).copy()
    generator.set_state(torch.from_numpy(raw))
