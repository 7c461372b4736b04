"""Benchmark streaming server-side aggregation of one matrix: time, peak memory, payload size.

For each client count K, a fresh subprocess plays the server for one matrix: for each
client in turn it makes the client's pruned matrix on the fly (a shared dense matrix plus
client noise, about ``s`` of it pruned), encodes the payload, decodes it, and adds it to
an :class:`L0Accumulator`; then it finishes the l0 aggregate and expands the mask. Only
one client's tensors exist at a time, so peak memory should stay flat in K.

Peak memory is the growth of the process's peak RSS (``resource.getrusage``) over its
value once the dense matrix exists: torch's CPU allocations are invisible to tracemalloc,
and a fresh process per K keeps the peaks of different K apart. Workers run with a fixed
glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``): glibc's default raises the threshold
after each large free, so freed tensors of up to 32 MiB go back to its heap, fragment it,
and RSS creeps up per client for small shapes though nothing is held. The growth still
includes one client's transient tensors (generation, payload, decoded copy).

Usage::

    python bench/aggregate.py                      # 4096 x 11008, K = 2 8 32
    python bench/aggregate.py --shape 1024 2752 --clients 2 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from fedspallm_strategy.merge.aggregation import L0Accumulator  # noqa: E402
from fedspallm_strategy.merge.expansion import expand_mask  # noqa: E402
from fedspallm_strategy.wire.payload import decode, encode  # noqa: E402

MIB = 2**20
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _client_matrix(dense: torch.Tensor, client: int, args: argparse.Namespace):
    """One client's pruned matrix and keep-mask, about ``sparsity`` pruned."""
    generator = torch.Generator().manual_seed(args.seed * 10_000 + client + 1)
    # In place and in the matrix dtype: the bench's own tensors should not dominate the peak.
    weight = torch.randn(dense.shape, generator=generator, dtype=dense.dtype).mul_(0.01)
    weight.add_(dense)
    # Scores differ per client so masks overlap only partly, as with private calibration data.
    score = torch.rand(dense.shape, generator=generator, dtype=dense.dtype).add_(0.5)
    score.mul_(weight.abs())
    sample = score.reshape(-1)[:: max(1, score.numel() // 1_000_000)].float()
    keep = score >= torch.quantile(sample, args.sparsity).to(dense.dtype)
    del score
    weight.masked_fill_(~keep, 0)
    return weight, keep


def _warm_up(dtype: torch.dtype) -> None:
    weight = torch.randn(64, 64).to(dtype)
    keep = weight.abs() > 0.5
    tensors, masks = decode(encode({"w": weight}, {"w": keep}))
    accumulator = L0Accumulator(weight.shape)
    accumulator.add(tensors["w"], masks["w"])
    expand_mask(accumulator.finish(), accumulator.prune_votes, 1, 0.5)
    torch.quantile(weight.float().reshape(-1), 0.5)


def run_worker(args: argparse.Namespace) -> dict[str, float]:
    """Aggregate ``args.worker`` clients for one matrix; return timings and sizes."""
    torch.set_num_threads(args.threads) if args.threads else None
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(args.seed)
    dense = torch.randn(tuple(args.shape), generator=generator).to(dtype)
    _warm_up(dtype)  # one-off library and thread-pool allocations are not per-client memory
    baseline = _peak_rss_bytes()
    timings = {"encode": 0.0, "decode": 0.0, "add": 0.0}
    payload_bytes = 0
    accumulator = L0Accumulator(dense.shape)
    for client in range(args.worker):
        weight, keep = _client_matrix(dense, client, args)
        start = time.perf_counter()
        payload = encode({"w": weight}, {"w": keep})
        timings["encode"] += time.perf_counter() - start
        del weight, keep  # the server only ever sees the payload
        start = time.perf_counter()
        tensors, masks = decode(payload)
        timings["decode"] += time.perf_counter() - start
        payload_bytes += len(payload)
        del payload
        start = time.perf_counter()
        accumulator.add(tensors["w"], masks["w"])
        timings["add"] += time.perf_counter() - start
        del tensors, masks
    start = time.perf_counter()
    merged = accumulator.finish()
    keep = expand_mask(merged, accumulator.prune_votes, accumulator.num_clients, args.sparsity)
    timings["expand"] = time.perf_counter() - start
    return {
        **timings,
        "payload_bytes": payload_bytes / args.worker,
        "dense_fp16_bytes": dense.numel() * 2,
        "achieved_sparsity": 1.0 - int(keep.sum()) / keep.numel(),
        "peak_growth_bytes": _peak_rss_bytes() - baseline,
    }


def _spawn(args: argparse.Namespace, num_clients: int) -> dict[str, float]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(num_clients),
        "--shape",
        *map(str, args.shape),
        "--sparsity",
        str(args.sparsity),
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    # A fixed mmap threshold stops glibc from moving large freed blocks onto its heap,
    # where fragmentation would make RSS creep with every client for small shapes.
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(args: argparse.Namespace, rows: dict[int, dict[str, float]]) -> str:
    rows_md = [
        "| K | encode s | decode s | add s | expand s | total s | s / client "
        "| peak RSS growth MiB | payload MiB / client | dense fp16 MiB | payload / dense "
        "| sparsity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, row in rows.items():
        total = row["encode"] + row["decode"] + row["add"] + row["expand"]
        rows_md.append(
            f"| {k} | {row['encode']:.2f} | {row['decode']:.2f} | {row['add']:.2f} "
            f"| {row['expand']:.2f} | {total:.2f} | {total / k:.2f} "
            f"| {row['peak_growth_bytes'] / MIB:.0f} | {row['payload_bytes'] / MIB:.1f} "
            f"| {row['dense_fp16_bytes'] / MIB:.1f} "
            f"| {row['payload_bytes'] / row['dense_fp16_bytes']:.4f} "
            f"| {row['achieved_sparsity']:.6f} |"
        )
    shape = "x".join(map(str, args.shape))
    header = (
        f"Streaming l0 aggregation + expansion of one {shape} {args.dtype} matrix "
        f"at s={args.sparsity} (threads: {args.threads or torch.get_num_threads()})"
    )
    return "\n".join([header, "", *rows_md])


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", type=int, nargs=2, default=[4096, 11008], metavar=("ROWS", "COLS")
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32], help="K values")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=1 << 20,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the workers, bytes (0: glibc's dynamic default, "
        "faster for small shapes but RSS creeps from heap fragmentation)",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: one K
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return
    rows = {}
    for num_clients in args.clients:
        start = time.perf_counter()
        rows[num_clients] = _spawn(args, num_clients)
        print(f"K={num_clients} done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(_table(args, rows))


if __name__ == "__main__":
    main()
