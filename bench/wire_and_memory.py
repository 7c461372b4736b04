"""Bytes on the wire per client, and peak memory of the server's aggregation and of a client.

(a) **Wire.** For each sparsity (``--sparsities``) and pruner, the up-link payload of one
client that pruned every layer (``fedspallm_strategy.payload.encode`` of all prunable
matrices, one payload as the ClientApp sends it) against the same matrices sent dense.
SparseGPT sends kept values + bit-packed mask; Wanda (and magnitude) send the mask only.
The pruned matrices come from the **magnitude** pruner: a payload's size depends only on the
shapes, the number of kept entries (exact for every pruner: ``num_to_prune`` per matrix,
or N of every M), the value dtype and whether values are sent -- not on which entries
are kept -- so the sizes are those of SparseGPT / Wanda replies. Values are encoded in the
model's dtype (float32 on CPU) and again cast to fp16 (what a fp16 model would send). The
down-link is the train message's ConfigRecord (``request_record(config, layers)``, deflated
as Flower sends it) for all layers: clients already hold the dense model.

(b) **Server memory.** For each K (``--clients``), a fresh subprocess plays the server:
loads the model, builds a ``MergeStrategy``, assigns every layer to K nodes, and feeds
K train replies through ``MergeStrategy.aggregate_train`` -- the code path of a real round:
decode, validate, stream into the l0 accumulators, expand, write into the model. Replies are
made lazily by a generator, each just before the strategy reads it (so neither the bench
nor the strategy ever holds K payloads): client k's keep-mask keeps the largest
``|w| * u`` with ``u ~ U(0.5, 1.5)`` per entry (masks overlap only partly, as with private
data), at exactly the target count per matrix, values = dense * mask (as SparseGPT
replies carry values). Reported: the server's seconds in ``aggregate_train`` (without the
bench's own time making payloads, shown apart), and the peak RSS of the round: once the
model is loaded and the code paths warmed up on a one-layer round, the peak is reset to the
current RSS (``/proc/self/clear_refs``), so the peak after the round (``VmHWM``) is the
round's own; its growth over the RSS before includes the making of one client's payload
(the bench plays the client too). ``resource.getrusage``'s ``ru_maxrss`` is in the JSON as
well, but on Linux a spawned child inherits its parent's high-water mark (folded in at
fork/exec), so it cannot show a child smaller than its parent, and it cannot be reset.
Workers run with a fixed glibc mmap threshold (``--mmap-threshold``, as bench/aggregate.py
does) so freed large blocks go back to the OS; 0 leaves glibc's dynamic default.

(c) **Client memory.** Peak RSS (``VmHWM``, whole process) of a subprocess running
``client_app.task.prune_layers`` (SparseGPT, ``--client-segments`` x ``--client-seqlen``
python-docs segments, partition 0 of 2) on ``--client-layers`` layers (default: all).

    python bench/wire_and_memory.py                                   # everything
    python bench/wire_and_memory.py --clients 2 4 --client-layers 4   # smaller

Writes bench/results/wire_and_memory.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # run from anywhere

from _common import machine, write_results  # noqa: E402

from fedspallm_strategy.config import NodeConfig, RunConfig  # noqa: E402
from fedspallm_strategy.wire.payload import encode  # noqa: E402
from llm_pruning.families import num_layers, prunable_weights  # noqa: E402
from llm_pruning.models import load_model  # noqa: E402
from llm_pruning.pruners import SparsityPattern, get_pruner  # noqa: E402
from llm_pruning.pruners.masks import num_to_prune  # noqa: E402

MIB = 2**20


def maxrss() -> int:
    """``getrusage`` peak RSS. On Linux a spawned child starts from its parent's peak (the
    parent's high-water mark is folded in at fork/exec), so it is only a lower bound's floor."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def peak_rss() -> int:
    """This process's own peak RSS: ``VmHWM`` (Linux), else ``getrusage``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return maxrss()


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pattern_of(column: str) -> SparsityPattern:
    if ":" in column:
        n, m = map(int, column.split(":"))
        return SparsityPattern.parse(column, 1 - n / m)
    return SparsityPattern.parse("unstructured", float(column))


def config_for(args, pattern: SparsityPattern, pruner: str) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "model": args.model,
            "pruner": pruner,
            "sparsity": pattern.sparsity,
            "pattern": f"{pattern.n}:{pattern.m}" if pattern.is_nm else "unstructured",
        }
    )


# ----------------------------------------------------------------- (a) wire


def wire(args) -> list[dict]:
    from fedspallm_strategy.wire.protocol import request_record

    model, _ = load_model(args.model)
    layers = list(range(num_layers(model)))
    weights = {
        name: linear.weight.data
        for layer in layers
        for name, linear in prunable_weights(model, layer).items()
    }
    numel = sum(w.numel() for w in weights.values())
    magnitude = get_pruner("magnitude")
    rows = []
    for column in args.sparsities.split(","):
        pattern = pattern_of(column)
        masks, pruned = {}, {}
        for name, weight in weights.items():
            pruned[name], masks[name] = magnitude.prune(weight, None, pattern)
        kept = sum(int(m.sum()) for m in masks.values())
        for pruner_name in args.pruners.split(","):
            pruner = get_pruner(pruner_name)
            config = config_for(args, pattern, pruner_name)
            row = {
                "sparsity": column,
                "pruner": pruner_name,
                "values": pruner.updates_weights,
                "matrices": len(weights),
                "numel": numel,
                "kept": kept,
                "dense_fp16_bytes": 2 * numel,
                "dense_fp32_bytes": 4 * numel,
                "model_dtype": str(next(iter(weights.values())).dtype).removeprefix("torch."),
                "down_bytes_all_layers": len(request_record(config, layers).deflate()),
            }
            if pruner.updates_weights:
                row["payload_model_dtype_bytes"] = len(encode(pruned, masks))
                half = {name: tensor.half() for name, tensor in pruned.items()}
                row["payload_fp16_bytes"] = len(encode(half, masks))
                del half
            else:
                row["payload_model_dtype_bytes"] = row["payload_fp16_bytes"] = len(
                    encode(None, masks)
                )
            rows.append(row)
            print(f"  wire {column} {pruner_name}: done", file=sys.stderr)
        del masks, pruned
    return rows


def wire_table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [
        f"Up-link payload of one client that pruned all layers ({r0['matrices']} matrices, "
        f"{r0['numel'] / 1e6:.1f} M weights; dense fp16 {r0['dense_fp16_bytes'] / MIB:.1f} MiB, "
        f"dense fp32 {r0['dense_fp32_bytes'] / MIB:.1f} MiB), and the train message down",
        "",
        "| sparsity | pruner | sends | payload MiB, values in "
        f"{r0['model_dtype']} | / dense {r0['model_dtype']} | payload MiB, fp16 values "
        "| / dense fp16 | down-link bytes (all layers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        native_dense = r["numel"] * getattr(torch, r["model_dtype"]).itemsize
        lines.append(
            f"| {r['sparsity']} | {r['pruner']} | {'values + mask' if r['values'] else 'mask'} "
            f"| {r['payload_model_dtype_bytes'] / MIB:.2f} "
            f"| {r['payload_model_dtype_bytes'] / native_dense:.4f} "
            f"| {r['payload_fp16_bytes'] / MIB:.2f} "
            f"| {r['payload_fp16_bytes'] / r['dense_fp16_bytes']:.4f} "
            f"| {r['down_bytes_all_layers']} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------- (b) server memory


class LazyPruned(Mapping):
    """Name -> ``dense * mask``, made when ``encode`` reads it (one matrix at a time)."""

    def __init__(self, dense: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]):
        self.dense, self.masks = dense, masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.dense[name] * self.masks[name]

    def __iter__(self):
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)


class LazyMasks(Mapping):
    """Name -> client ``client``'s keep-mask, made on access and only the latest one kept.

    The mask keeps the largest ``|w| * u``, ``u ~ U(0.5, 1.5)`` per entry, at exactly the
    pruners' count (``num_to_prune`` per matrix, or N of every M).
    """

    def __init__(self, dense, client: int, pattern: SparsityPattern, seed: int):
        self.dense, self.client, self.pattern, self.seed = dense, client, pattern, seed
        self.names = list(dense)
        self.last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.last is None or self.last[0] != name:
            self.last = None  # free the previous mask first
            self.last = (name, self._make(name))
        return self.last[1]

    def _make(self, name: str) -> torch.Tensor:
        from llm_pruning.pruners import lowest_k_mask, nm_keep_mask

        index = self.names.index(name)
        generator = torch.Generator().manual_seed((self.seed * 10_000 + self.client) * 1000 + index)
        weight = self.dense[name]
        score = torch.rand(weight.shape, generator=generator).add_(0.5).mul_(weight.abs())
        if self.pattern.is_nm:
            return nm_keep_mask(score, self.pattern.n, self.pattern.m)
        return lowest_k_mask(score, num_to_prune(score.numel(), self.pattern.sparsity))

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def make_reply(node: int, data: bytes, round_id: int):
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedspallm_strategy.wire.protocol import PAYLOAD_KEY

    request = Message(RecordDict(), message_type="train", dst_node_id=node, group_id=str(round_id))
    request.metadata.__dict__["_message_id"] = f"r{round_id}n{node}"
    arrays = ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(data, dtype=np.uint8))})
    return Message(RecordDict({PAYLOAD_KEY: arrays}), reply_to=request)


def server_worker(args) -> dict:
    """Child process: one round of K clients through ``MergeStrategy.aggregate_train``."""
    from fedspallm_strategy.strategies.one_shot import MergeStrategy
    from server_app.inprocess import _set_task_identity

    if args.threads:
        torch.set_num_threads(args.threads)
    _set_task_identity(1)
    clients = args.server_worker
    pattern = pattern_of(args.server_sparsity)
    config = config_for(args, pattern, "sparsegpt")
    model, _ = load_model(args.model)
    total = num_layers(model)
    layers = list(range(total if not args.server_layers else min(args.server_layers, total)))

    def replies(ids, count, round_id) -> Iterator:
        # The model's own weights, not copies: the strategy writes merged layers into the
        # model only after it has read every reply.
        dense = {
            name: linear.weight.data
            for layer in ids
            for name, linear in prunable_weights(model, layer).items()
        }
        for node in range(1, count + 1):
            start = time.perf_counter()
            masks = LazyMasks(dense, node + 100 * round_id, pattern, args.seed)
            data = encode(LazyPruned(dense, masks), masks)
            del masks
            reply = make_reply(node, data, round_id)
            del data  # the reply's Array holds its own copy, as a received message does
            generating[0] += time.perf_counter() - start
            yield reply

    generating = [0.0]  # seconds the bench spends playing the clients, inside the round

    # Warm-up: a one-layer round on a throwaway strategy touches every code path once.
    warm = MergeStrategy(model, config)
    warm.assignments = {1: [total - 1], 2: [total - 1]}
    warm.aggregate_train(1, replies([total - 1], 2, 0))
    del warm
    baseline_current, baseline_peak = current_rss(), peak_rss()
    reset = reset_peak_rss()  # so that the peak below is the round's own

    strategy = MergeStrategy(model, config)
    strategy.assignments = {node: layers for node in range(1, clients + 1)}
    generating[0] = 0.0
    start = time.perf_counter()
    _, metrics = strategy.aggregate_train(1, replies(layers, clients, 1))
    seconds = time.perf_counter() - start
    rejected = strategy.accounting.rejected
    if rejected or strategy.remaining != [i for i in range(total) if i not in layers]:
        raise RuntimeError(f"aggregation did not accept every reply: {rejected}")
    return {
        "clients": clients,
        "layers": len(layers),
        "seconds": seconds - generating[0],
        "generating_seconds": generating[0],
        "bytes_up_per_client": sum(strategy.accounting.bytes_up.values()) / clients,
        "baseline_rss": baseline_current,
        "baseline_peak_rss": baseline_peak,
        "peak_reset": reset,
        "peak_rss": peak_rss(),
        "peak_growth": peak_rss() - baseline_current,
        "getrusage_maxrss": maxrss(),
        "metrics": dict(metrics),
    }


def client_worker(args) -> dict:
    """Child process: one client prunes its layers with SparseGPT, as the ClientApp does."""
    from client_app.task import prune_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    config = RunConfig.from_mapping(
        {
            "model": args.model,
            "pruner": "sparsegpt",
            "calib-samples": args.client_segments,
            "seqlen": args.client_seqlen,
        }
    )
    total = num_layers(load_model(args.model)[0])  # loads once: in the page cache after
    layers = list(range(min(args.client_layers, total) if args.client_layers else total))
    start = time.perf_counter()
    reply = prune_layers(config, NodeConfig(partition_id=0, num_partitions=2), layers)
    return {
        "layers": len(layers),
        "seconds": time.perf_counter() - start,
        "payload_bytes": len(reply.payload),
        "peak_rss": peak_rss(),
        "getrusage_maxrss": maxrss(),
        "metrics": reply.metrics,
    }


def spawn(args, *flags: str) -> dict:
    command = [sys.executable, __file__, *flags, *args.passthrough]
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"worker {' '.join(flags)} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = time.perf_counter() - start
    return row


def server_table(rows: list[dict], args) -> str:
    lines = [
        f"Server: one round through MergeStrategy.aggregate_train, {args.model}, "
        f"{rows[0]['layers']} layers per client, s={args.server_sparsity}, values + mask "
        f"(glibc mmap threshold {args.mmap_threshold or 'dynamic'}); peak = VmHWM of the "
        "round, reset after the model load and warm-up",
        "",
        "| K | server s (aggregate_train) | server s / client | bench making payloads s "
        "| payload MiB / client | RSS before MiB | peak RSS MiB | peak growth MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['seconds']:.1f} | {r['seconds'] / r['clients']:.1f} "
            f"| {r.get('generating_seconds', float('nan')):.1f} "
            f"| {r['bytes_up_per_client'] / MIB:.1f} | {r['baseline_rss'] / MIB:.0f} "
            f"| {r['peak_rss'] / MIB:.0f} | {r['peak_growth'] / MIB:.0f} |"
        )
    return "\n".join(lines)


def client_table(row: dict, args) -> str:
    return "\n".join(
        [
            f"Client: client_app.task.prune_layers, {args.model}, SparseGPT, "
            f"{args.client_segments} x {args.client_seqlen} python-docs segments",
            "",
            "| layers | seconds | payload MiB | peak RSS MiB |",
            "|---|---|---|---|",
            f"| {row['layers']} | {row['seconds']:.1f} | {row['payload_bytes'] / MIB:.1f} "
            f"| {row['peak_rss'] / MIB:.0f} |",
        ]
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,2:4")
    parser.add_argument("--pruners", default="sparsegpt,wanda")
    parser.add_argument("--clients", type=int, nargs="*", default=[2, 4, 8], help="server K")
    parser.add_argument("--server-sparsity", default="0.5")
    parser.add_argument("--server-layers", type=int, default=0, help="layers per client (0: all)")
    parser.add_argument("--client-layers", type=int, default=0, help="0: all; -1: skip (c)")
    parser.add_argument("--client-segments", type=int, default=8)
    parser.add_argument("--client-seqlen", type=int, default=512)
    parser.add_argument("--skip-wire", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=1 << 20,
        help="MALLOC_MMAP_THRESHOLD_ for the workers, bytes (0: glibc's dynamic default)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "wire_and_memory.json")
    parser.add_argument("--server-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = [
        "--model",
        args.model,
        "--server-sparsity",
        args.server_sparsity,
        "--server-layers",
        str(args.server_layers),
        "--client-layers",
        str(args.client_layers),
        "--client-segments",
        str(args.client_segments),
        "--client-seqlen",
        str(args.client_seqlen),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    return args


def main() -> None:
    args = parse_args()
    if args.server_worker is not None:
        print(json.dumps(server_worker(args)))
        return
    if args.client_worker:
        print(json.dumps(client_worker(args)))
        return
    info = machine()
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable), "
        f"torch {info['torch']} with {info['torch_threads']} threads, "
        f"load average {info['loadavg_at_start']}"
    )
    wall = time.perf_counter()
    results: dict = {}
    if not args.skip_wire:
        results["wire"] = wire(args)
        print("\n" + wire_table(results["wire"]))
    if args.clients:
        results["server"] = []
        for clients in args.clients:
            results["server"].append(spawn(args, "--server-worker", str(clients)))
            print(f"  server K={clients}: done", file=sys.stderr)
        print("\n" + server_table(results["server"], args))
    if args.client_layers >= 0:
        results["client"] = spawn(args, "--client-worker")
        print("\n" + client_table(results["client"], args))
    wall = time.perf_counter() - wall
    print(f"\nbench wall time {wall:.1f} s")
    workers = ("passthrough", "server_worker", "client_worker")
    write_results(args.out, info=info, args=args, skip=workers, results=results, wall_s=wall)


if __name__ == "__main__":
    main()
