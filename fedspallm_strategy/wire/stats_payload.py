"""Safetensors codec for the pruners' additive statistics, with strict validation.

The ``exact`` strategy moves statistics instead of pruned weights: SparseGPT's ``Σ xᵀx`` and
Wanda's ``Σ x²`` per input column are sums over token rows, so the server can add the clients'
sums and prune once, as if it held every client's text. A payload carries, for each group of
Linears that read the same input (q/k/v, gate/up: their sums are identical, so one is sent):

- ``stats/<name>``: 1-D float32. ``hessian`` kind: the upper triangle of the symmetric
  ``(d, d)`` ``Σ xᵀx``, diagonal included, row-major (``d (d + 1) / 2`` values);
  ``column-norms`` kind: ``Σ x²`` per input column (``d`` values).

``__metadata__`` holds ``format``, ``version``, ``kind`` and ``matrices``: JSON mapping each
group's first weight name to ``inputs`` (d), ``count`` (token rows summed) and ``covers`` (every
weight name the statistics stand for, the key first).

Payloads come from other organisations, so :func:`decode_statistics` trusts nothing: anything
malformed raises :class:`~fedspallm_strategy.payload.PayloadError`, and parsing uses
``safetensors`` only (no pickle). Given the round's groups, it compares the declared kind,
groups, inputs and token count with them before any tensor is read, and then checks that the
sums could come from data at all: sums of squares are not negative, and a Hessian obeys
Cauchy-Schwarz, ``|H_ij| <= sqrt(H_ii H_jj)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import safetensors.torch
import torch
from torch import Tensor

from fedspallm_strategy.wire.safetensors_reader import (
    HEADER_ALLOWANCE,
    HEADER_ALLOWANCE_PER_MATRIX,
    PayloadError,
    check_names,
    parse_guarded,
    read_metadata,
    unique_keys,
)
from llm_pruning.pruners import ColumnNormStats, HessianStats, Stats

FORMAT = "fedspallm-statistics"
VERSION = "1"
STATS_PREFIX = "stats/"
KINDS: dict[str, type] = {"hessian": HessianStats, "column-norms": ColumnNormStats}
_METADATA_KEYS = {"format", "version", "kind", "matrices"}
_ENTRY_KEYS = {"inputs", "count", "covers"}

# Float32 sums of squares obey Cauchy-Schwarz up to their rounding; this is far above it.
_CAUCHY_SCHWARZ_SLACK = 1e-3

# Weight name -> (statistics, every weight name they stand for), the key first.
SharedStats = Mapping[str, tuple[Stats, Sequence[str]]]
# Group key -> (inputs, covers): what a round's reply must hold.
ExpectedGroups = Mapping[str, tuple[int, Sequence[str]]]


def kind_of(stats_class: type) -> str:
    """``hessian`` for SparseGPT's :class:`HessianStats`, ``column-norms`` for Wanda's."""
    for kind, cls in KINDS.items():
        if stats_class is cls:
            return kind
    raise ValueError(f"no statistics payload for {stats_class!r}; only {sorted(KINDS)}")


def statistics_nbytes(kind: str, inputs: int) -> int:
    """Bytes of one group's statistics tensor: ``d (d + 1) / 2 × 4`` or ``d × 4`` (float32)."""
    if kind == "hessian":
        return inputs * (inputs + 1) // 2 * 4
    if kind == "column-norms":
        return inputs * 4
    raise ValueError(f"unknown statistics kind {kind!r}; choose one of {sorted(KINDS)}")


def statistics_limit(kind: str, expected: ExpectedGroups) -> int:
    """The most bytes a valid statistics reply for ``expected`` can take."""
    data = sum(statistics_nbytes(kind, inputs) for inputs, _covers in expected.values())
    return data + 8 + HEADER_ALLOWANCE + HEADER_ALLOWANCE_PER_MATRIX * len(expected)


def same_statistics(first: Stats, second: Stats) -> bool:
    """Bit-identical sums over the same number of rows (what Linears sharing an input give)."""
    return (
        type(first) is type(second)
        and first.count == second.count
        and torch.equal(first.sums, second.sums)
    )


def _upper(size: int, device: torch.device | str = "cpu") -> Tensor:
    # A bool mask rather than triu_indices: 1 byte per entry instead of 16.
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_()


def flat_sums(stats: Stats) -> Tensor:
    """The sums as sent, 1-D float32 on the CPU: a Hessian's upper triangle, row-major."""
    sums = stats.sums.detach().to("cpu", torch.float32)
    if isinstance(stats, HessianStats):
        sums = sums[_upper(stats.num_inputs)]  # (d (d + 1) / 2,)
    return sums


def statistics_from_sums(kind: str, inputs: int, count: int, sums: Tensor) -> Stats:
    """Statistics from :func:`flat_sums` output, validated as a decoded payload is.

    Raises
    ------
    PayloadError
        On a wrong length or dtype, values that are not finite, or a negative sum of squares.
    """
    entry = {"inputs": inputs, "count": count}
    return _stats_from("sums", kind, sums, entry)


# --------------------------------------------------------------------------- encode


def encode_statistics(entries: SharedStats) -> bytes:
    """Serialise shared statistics (see the module docstring for the layout).

    Parameters
    ----------
    entries
        Weight name -> ``(stats, covers)``; ``covers`` lists every weight the statistics
        stand for and starts with the key. All entries must be of one kind.

    Raises
    ------
    ValueError
        On mixed kinds, a ``covers`` that does not start with its key, a name covered twice,
        or sums that are not finite.
    """
    if not entries:
        raise ValueError("no statistics to encode")
    kinds = {kind_of(type(stats)) for stats, _ in entries.values()}
    if len(kinds) != 1:
        raise ValueError(f"statistics of one payload must be of one kind, got {sorted(kinds)}")
    (kind,) = kinds
    tensors: dict[str, Tensor] = {}
    matrices: dict[str, dict] = {}
    covered: set[str] = set()
    for name, (stats, covers) in entries.items():
        covers = list(covers)
        if not covers or covers[0] != name:
            raise ValueError(f"{name}: covers must start with the entry's own name, got {covers}")
        if covered & set(covers) or len(set(covers)) != len(covers):
            raise ValueError(f"{name}: a weight is covered twice in {covers}")
        covered |= set(covers)
        sums = flat_sums(stats)
        if not bool(torch.isfinite(sums).all()):
            raise ValueError(f"{name}: statistics are not all finite")
        tensors[STATS_PREFIX + name] = sums.contiguous()
        matrices[name] = {"inputs": stats.num_inputs, "count": int(stats.count), "covers": covers}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "matrices": json.dumps(matrices),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


# --------------------------------------------------------------------------- decode


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_metadata(metadata: Mapping[str, str]) -> tuple[str, dict[str, dict]]:
    if set(metadata) != _METADATA_KEYS:
        raise PayloadError(f"metadata keys {sorted(metadata)} != {sorted(_METADATA_KEYS)}")
    if metadata["format"] != FORMAT or metadata["version"] != VERSION:
        raise PayloadError(
            f"unsupported statistics format {metadata['format']!r} version "
            f"{metadata['version']!r} (expected {FORMAT!r} {VERSION!r})"
        )
    kind = metadata["kind"]
    if kind not in KINDS:
        raise PayloadError(f"statistics kind {kind!r} is not one of {sorted(KINDS)}")
    try:
        matrices = json.loads(metadata["matrices"], object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError(f"metadata 'matrices' is not valid JSON: {exc}") from exc
    if not isinstance(matrices, dict) or not matrices:
        raise PayloadError("metadata 'matrices' must be a non-empty JSON object")
    covered: set[str] = set()
    for name, entry in matrices.items():
        if not name or not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise PayloadError(f"metadata entry for {name!r} must hold {sorted(_ENTRY_KEYS)}")
        if not _is_int(entry["inputs"]) or entry["inputs"] <= 0:
            raise PayloadError(
                f"{name}: inputs must be a positive integer, got {entry['inputs']!r}"
            )
        if not _is_int(entry["count"]) or entry["count"] < 0:
            raise PayloadError(
                f"{name}: count must be a non-negative integer, got {entry['count']!r}"
            )
        covers = entry["covers"]
        if (
            not isinstance(covers, list)
            or not covers
            or covers[0] != name
            or not all(isinstance(c, str) and c for c in covers)
        ):
            raise PayloadError(f"{name}: covers must be a list of names starting with {name!r}")
        if len(set(covers)) != len(covers) or covered & set(covers):
            raise PayloadError(f"{name}: a weight is covered twice")
        covered |= set(covers)
    return kind, matrices


def _stats_from(name: str, kind: str, sums: Tensor, entry: Mapping) -> Stats:
    inputs, count = entry["inputs"], entry["count"]
    length = statistics_nbytes(kind, inputs) // 4
    if sums.dtype != torch.float32 or sums.dim() != 1 or sums.numel() != length:
        raise PayloadError(
            f"{name}: statistics must be 1-D float32 of {length} values for {inputs} inputs, "
            f"got {sums.dim()}-D {sums.dtype} of {sums.numel()}"
        )
    if not bool(torch.isfinite(sums).all()):
        raise PayloadError(f"{name}: statistics are not all finite")
    if count == 0 and bool(sums.any()):
        raise PayloadError(f"{name}: non-zero statistics over 0 rows")
    stats = KINDS[kind](inputs)
    if kind == "hessian":
        upper = torch.zeros(inputs, inputs, dtype=torch.float32).masked_scatter_(
            _upper(inputs), sums
        )
        stats.xtx = upper + upper.triu(1).T  # (d, d), symmetric
    else:
        stats.sq_norm = sums.clone()
    # Sums of squares: a negative one cannot come from any data.
    diagonal = stats.xtx.diagonal() if kind == "hessian" else stats.sq_norm
    if bool((diagonal < 0).any()):
        raise PayloadError(f"{name}: sums of squares must not be negative")
    stats.count = count
    return stats


def _check_declared(
    kind: str,
    declared: Mapping[str, Mapping],
    expected_kind: str,
    expected: ExpectedGroups,
    tokens: int | None,
) -> None:
    """What a reply declares (kind, groups, inputs, covers, token counts) against the round."""
    if kind != expected_kind:
        raise PayloadError(f"statistics of kind {kind!r}; this run needs {expected_kind!r}")
    check_names("statistics", declared, expected)
    for name, (inputs, covers) in expected.items():
        entry = declared[name]
        if entry["inputs"] != inputs or tuple(entry["covers"]) != tuple(covers):
            raise PayloadError(
                f"{name}: statistics of {entry['inputs']} inputs covering "
                f"{list(entry['covers'])}; expected {inputs} inputs covering {list(covers)}"
            )
    counts = {entry["count"] for entry in declared.values()}
    if len(counts) > 1:  # every Linear of a round sees the same token rows
        raise PayloadError(f"token counts differ between matrices: {sorted(counts)}")
    if tokens is not None and counts != {tokens}:
        raise PayloadError(
            f"statistics over {sorted(counts)} tokens; calib-samples x seqlen is {tokens}"
        )


def _check_cauchy_schwarz(name: str, stats: Stats) -> None:
    """A sum of outer products x xᵀ has ``|H_ij| <= sqrt(H_ii H_jj)``; one that breaks it
    came from no data."""
    if not isinstance(stats, HessianStats):
        return
    xtx = stats.xtx.double()
    root = xtx.diagonal().clamp_min(0).sqrt()
    bound = torch.outer(root, root) * (1 + _CAUCHY_SCHWARZ_SLACK) + 1e-30
    if bool((xtx.abs() > bound).any()):
        raise PayloadError(f"{name}: |H_ij| > sqrt(H_ii H_jj): no data has these statistics")


def _decode_unchecked(
    data: bytes,
    max_bytes: int | None,
    expected: tuple[str, ExpectedGroups, int | None] | None,
) -> tuple[str, dict]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    data = bytes(data)
    kind, matrices = _parse_metadata(read_metadata(data))
    if expected is not None:
        _check_declared(kind, matrices, *expected)
        needed = sum(statistics_nbytes(kind, entry["inputs"]) for entry in matrices.values())
        if len(data) - 8 - int.from_bytes(data[:8], "little") != needed:
            raise PayloadError(f"statistics payload does not carry the {needed} bytes declared")
    try:
        loaded = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError and friends: offsets or shapes that lie
        raise PayloadError(f"invalid safetensors data: {exc}") from exc
    declared = {STATS_PREFIX + name for name in matrices}
    if set(loaded) != declared:
        raise PayloadError(
            f"payload tensors {sorted(loaded)} do not match its metadata {sorted(declared)}"
        )
    entries = {
        name: (_stats_from(name, kind, loaded[STATS_PREFIX + name], entry), tuple(entry["covers"]))
        for name, entry in matrices.items()
    }
    for name, (stats, _covers) in entries.items():
        _check_cauchy_schwarz(name, stats)
    return kind, entries


def decode_statistics(
    data: bytes,
    *,
    max_bytes: int | None = None,
    expected_kind: str | None = None,
    expected: ExpectedGroups | None = None,
    tokens: int | None = None,
) -> tuple[str, dict[str, tuple[Stats, tuple[str, ...]]]]:
    """Parse and validate a payload made by :func:`encode_statistics`.

    Parameters
    ----------
    max_bytes
        Reject longer payloads before parsing anything.
    expected_kind, expected, tokens
        The round's statistics kind, its groups (key -> ``(inputs, covers)``, every one and
        nothing else) and the token rows each client sums (``None``: any, equal across
        groups). Given, they are checked against the header before any tensor is read.

    Returns
    -------
    tuple
        ``(kind, {name: (stats, covers)})``, the Hessians rebuilt as full symmetric matrices.

    Raises
    ------
    PayloadError
        For anything malformed or not what the round asked for; no other exception escapes
        from parsing (except ``MemoryError`` and signals).
    """
    checks = None if expected is None else (expected_kind, expected, tokens)
    return parse_guarded(lambda: _decode_unchecked(data, max_bytes, checks), "statistics")


def validate_statistics(
    kind: str,
    entries: SharedStats,
    *,
    expected_kind: str,
    expected: ExpectedGroups,
) -> None:
    """Check decoded statistics against what the server asked for (as :func:`decode_statistics`
    does with ``expected``).

    Raises
    ------
    PayloadError
        On another kind, a missing or unexpected group, other inputs or covers, or counts
        that differ between groups (every Linear of a round sees the same token rows).
    """
    declared = {
        name: {"inputs": stats.num_inputs, "covers": covers, "count": stats.count}
        for name, (stats, covers) in entries.items()
    }
    _check_declared(kind, declared, expected_kind, expected, None)
