"""The server's peak memory with the re-solve, from a 1B to a 7B model (synthesised clients).

The mode: the run config's defaults (``strategy=fedspallm``, ``resolve=true``, local
calibration, kept values as int8 in both rounds, ``layers-per-round=0``, so the server sizes
each round's group of layers from ``memory-budget-gb``), except ``model``, ``dtype=bfloat16``,
a small ``seqlen`` and ``eval-windows`` (the server's dense and final evaluations stay cheap),
``standalone-eval=false`` and a temporary ``output-dir``. ``--budget-gb`` overrides
``memory-budget-gb``.

The server code is the real one: ``server_app.federation.run_federation`` over an
``InProcessGrid`` of 2 nodes, with ``LayerwiseMerge`` and its group size from
``memory_plan.py``; it loads the model, evaluates it dense, runs every round, merges and checks
every reply, evaluates the merged model and saves it (``model/`` and ``report.json``).

The CLIENTS ARE SYNTHESISED (``bench/synthetic_replies.py``): they answer the same messages
with replies of exactly the shape and size an honest SparseGPT client sends in this mode (keep
masks and kept values in the prune rounds, kept values in the re-solve rounds, values in the
wire dtype), made from the dense weights with seeded noise instead of calibration. Real
SparseGPT clients on a 7B model take hours on a small CPU.

Each row runs in its own process (``--row NAME``), which holds the server AND the in-process
clients: a client builds one reply at a time (one decoder layer's tensors at a time), but
``InProcessGrid`` builds every node's reply when the round's messages are pushed and keeps them
until the server pulls them, so a round's replies of both nodes are held while the server
merges. The process's peak RSS (``VmHWM``) is therefore an UPPER BOUND of the server's own.
A sampler thread reads ``VmRSS`` every 0.1 s to say in which stage the peak fell.

Reported per row: peak RSS, wall time, the group size and rounds the server chose (report.json
``layerwise``), the bytes up per client per round (``communication.per_round``) against dense
fp16 of the prunable matrices of the round's layers, and the memory plan's own estimate of the
server's tensors (``memory_plan.fixed_bytes`` + group x max ``layer_bytes``), which leaves the
process itself (Python, torch, Flower) out.

    python bench/server_memory.py --rows synthetic-1b
    python bench/server_memory.py --rows synthetic-7b     # adds its row to the same file
    python bench/server_memory.py --row synthetic-7b      # one row, this process, no file

The synthetic models are written into the model cache on first use (the 7B takes ~13.5 GB of
disk, once), in a separate process, before anything is measured. Writes
bench/results/server_memory.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, proc_status_bytes, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ROWS = ("synthetic-1b", "synthetic-7b")
CLIENTS = 2
GIB = 2**30
ROLE_LIMIT_GB = 8.0  # what one role (server or client process) may take
TIMELINE_SECONDS = 5.0  # the RSS timeline kept in the results: one sample per this many seconds


# ------------------------------------------------------------------------- measuring


class Sampler(threading.Thread):
    """Reads VmRSS every ``interval`` seconds; keeps the peak and a coarse timeline."""

    def __init__(self, interval: float = 0.1, progress: Path | None = None):
        super().__init__(daemon=True)
        self.progress = progress  # a file rewritten every timeline sample: peak so far
        self.interval, self.start_time = interval, time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self.peak, self.peak_at = 0, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        last = -1.0
        while not self._stop_event.is_set():
            now, rss = time.perf_counter() - self.start_time, proc_status_bytes("VmRSS")
            if rss > self.peak:
                self.peak, self.peak_at = rss, now
            if now - last >= TIMELINE_SECONDS:
                self.samples.append((round(now, 1), rss))
                last = now
                if self.progress is not None:
                    self.progress.write_text(
                        json.dumps({"elapsed_s": round(now, 1), "rss": rss, "peak": self.peak})
                    )
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Stages(logging.Handler):
    """The run's stages from its own log lines: each round's start, the report written."""

    MARKS = ("round ", "report written", "perplexity")

    def __init__(self, start_time: float):
        super().__init__(logging.INFO)
        self.start_time = start_time
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.startswith(("fedspallm_strategy", "server_app")) and message.startswith(
            self.MARKS
        ):
            self.events.append((round(time.perf_counter() - self.start_time, 2), message[:120]))


def peak_by_stage(samples, events, end: float) -> list[dict]:
    """The highest sampled RSS between consecutive stage marks (the first: load and dense
    evaluation)."""
    marks = [(0.0, "start: load, checks, dense evaluation"), *events, (end, "end")]
    stages = []
    for (begin, label), (finish, _) in zip(marks, marks[1:], strict=False):
        inside = [rss for t, rss in samples if begin <= t < finish]
        if inside:
            stages.append(
                {"from_s": begin, "to_s": finish, "stage": label, "peak_rss": max(inside)}
            )
    return stages


# ------------------------------------------------------------------------- one row


def ensure_model(name: str) -> Path:
    """The cached folder of ``name``, written first in a separate process if it is missing
    (so that writing it never counts in the measured process's peak)."""
    from llm_pruning.cache import cache_dir

    folder = cache_dir() / "models" / name
    if not (folder / "config.json").is_file():
        code = (
            "from llm_pruning.builtin import cached_builtin; from llm_pruning.cache import "
            f"cache_dir; print(cached_builtin({name!r}, cache_dir()))"
        )
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return folder


def memory_plan_estimate(folder: Path, config, clients: int) -> dict:
    """The plan's own numbers, from the model's shapes on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedspallm_strategy.strategies import memory_plan
    from llm_pruning.families import num_layers, prunable_weights

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(folder), dtype=config.torch_dtype
        )
    layers = num_layers(model)
    per_layer = max(memory_plan.layer_bytes(model, i, config, clients) for i in range(layers))
    fixed = memory_plan.fixed_bytes(model)
    group = memory_plan.planned_layers_per_round(model, config, clients)
    prunable = [
        sum(linear.weight.numel() for linear in prunable_weights(model, i).values())
        for i in range(layers)
    ]
    return {
        "layers": layers,
        "group": group,
        "fixed_bytes": fixed,
        "max_layer_bytes": per_layer,
        "estimate_bytes": fixed + group * per_layer,
        "prunable_per_layer": prunable,
    }


def communication_rows(report: dict, prunable: list[int]) -> list[dict]:
    """Per round: its kind, layers, bytes up per client, and dense fp16 of those layers."""
    per_round = report["communication"]["per_round"]
    rows = []
    for entry in report["layerwise"]["per_round"]:
        layers = entry["prune"] or entry["resolve"]
        dense_fp16 = 2 * sum(prunable[layer] for layer in layers)
        up = per_round[str(entry["round"])]["bytes_up"]
        rows.append(
            {
                "round": entry["round"],
                "kind": "prune" if entry["prune"] else "resolve",
                "layers": layers,
                "bytes_up_per_client": {node: up[node] for node in sorted(up)},
                "dense_fp16_bytes": dense_fp16,
                "ratio_max": max(up.values()) / dense_fp16,
            }
        )
    return rows


def run_row(name: str, args) -> dict:
    """One federation in this process; returns the row (peak RSS, plan, bytes, timings)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    folder = ensure_model(name)
    # Nothing of the model or the federation is loaded before this point.
    start = time.perf_counter()
    progress = args.row_out.with_suffix(".progress.json") if args.row_out else None
    sampler = Sampler(progress=progress)
    sampler.start()
    stages = Stages(sampler.start_time)
    logging.getLogger().addHandler(stages)
    hwm_before = proc_status_bytes("VmHWM")

    from synthetic_replies import app as synthetic_app

    from fedspallm_strategy.config import RunConfig
    from server_app.federation import run_federation
    from server_app.inprocess import InProcessGrid

    output = Path(tempfile.mkdtemp(prefix="server-memory-"))
    settings = {
        "model": name,
        "dtype": "bfloat16",
        "seqlen": args.seqlen,
        "eval-windows": args.eval_windows,
        "standalone-eval": False,
        "output-dir": str(output),
    }
    if args.budget_gb is not None:
        settings["memory-budget-gb"] = args.budget_gb
    config = RunConfig.from_mapping(settings)
    plan = memory_plan_estimate(folder, config, args.clients)
    # The driver stops a row past --row-timeout with SIGTERM: clean up, record how far it got.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        grid = InProcessGrid.simulation(synthetic_app, args.clients, {})
        run_dir = run_federation(grid, config, run_id=1)
        report = json.loads((run_dir / "report.json").read_text())
        model_bytes = sum(f.stat().st_size for f in (run_dir / "model").glob("*.safetensors"))
    except BaseException as error:
        if args.row_out:
            wall = time.perf_counter() - start
            partial = {
                "row": name,
                "completed": False,
                "stopped_by": f"{type(error).__name__}: {error}"[:300],
                "clients": args.clients,
                "synthetic_clients": True,
                "run_config": settings | {"output-dir": "<temporary>"},
                "peak_rss_vmhwm_so_far": proc_status_bytes("VmHWM"),
                "peak_rss_sampled_so_far": sampler.peak,
                "wall_s": round(wall, 1),
                "layers": plan["layers"],
                "plan": {key: value for key, value in plan.items() if key != "prunable_per_layer"},
                "stages": peak_by_stage(sampler.samples, stages.events, wall),
                "rss_timeline": sampler.samples,
            }
            args.row_out.write_text(json.dumps(partial))
        raise
    finally:
        wall = time.perf_counter() - start
        sampler.stop()
        hwm = proc_status_bytes("VmHWM")
        shutil.rmtree(output, ignore_errors=True)  # the saved 7B model is 13.5 GB
    layerwise = report["layerwise"]
    if report["rejected"] or layerwise["dropped"]:
        raise RuntimeError(f"{name}: replies were rejected: {report['rejected']}")
    if layerwise["layers-per-round"] != plan["group"]:
        raise RuntimeError(
            f"{name}: the server chose {layerwise['layers-per-round']} layers a "
            f"round, the memory plan says {plan['group']}"
        )
    rounds = communication_rows(report, plan["prunable_per_layer"])
    total_up = report["communication"]["bytes_up"]
    dense_all = report["communication"]["dense_fp16_bytes_all_layers"]
    return {
        "row": name,
        "clients": args.clients,
        "completed": True,
        "synthetic_clients": True,
        "run_config": settings | {"output-dir": "<temporary>"},
        "peak_rss_vmhwm": hwm,
        "vmhwm_before_run": hwm_before,
        "peak_rss_sampled": sampler.peak,
        "peak_sampled_at_s": round(sampler.peak_at, 1),
        "wall_s": round(wall, 1),
        "layers": plan["layers"],
        "layers_per_round": layerwise["layers-per-round"],
        "rounds": layerwise["rounds"],
        "memory_budget_gb": layerwise["memory-budget-gb"],
        "plan": {key: value for key, value in plan.items() if key != "prunable_per_layer"},
        "prunable_params_per_layer": plan["prunable_per_layer"][0],
        "bytes_up_per_round": rounds,
        "bytes_up_per_client_total": total_up,
        "dense_fp16_bytes_all_layers": dense_all,
        "saved_model_bytes": model_bytes,
        "timings": report["timings"],
        "server_round_log": layerwise["per_round"],
        "stages": peak_by_stage(sampler.samples, stages.events, wall),
        "rss_timeline": sampler.samples,
    }


# ------------------------------------------------------------------------- table


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "Server + 2 SYNTHESISED in-process clients (peak = upper bound of the server's), default "
        "mode, bf16",
        "",
        "| row | layers | budget GB | group | rounds | peak RSS GiB (VmHWM) | plan estimate GiB "
        "(fixed + group x layer) | wall s | up/client, prune round (x dense fp16) "
        "| up/client, re-solve round (x dense fp16) | up/client, whole run (x dense fp16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plan = r["plan"]
        if not r.get("completed", True):
            done = [s["stage"] for s in r["stages"] if s["stage"].startswith("round ")]
            lines.append(
                f"| {r['row']} | {r['layers']} | {r['run_config'].get('memory-budget-gb', 4.0):g} "
                f"| {plan['group']} | {plan['layers'] // plan['group'] * 2} (planned) "
                f"| {_gib(r['peak_rss_vmhwm_so_far'])} SO FAR (stopped after {r['wall_s']:.0f} s, "
                f"in {done[-1].split(':')[0] if done else 'setup'}) "
                f"| {_gib(plan['estimate_bytes'])} ({_gib(plan['fixed_bytes'])} + {plan['group']} "
                f"x {_gib(plan['max_layer_bytes'])}) | - | - | - | - |"
            )
            continue
        by_kind = {}
        for entry in r["bytes_up_per_round"]:
            by_kind.setdefault(entry["kind"], entry)  # the first (full) group of each kind
        cells = []
        for kind in ("prune", "resolve"):
            entry = by_kind.get(kind)
            if entry is None:
                cells.append("-")
                continue
            up = max(entry["bytes_up_per_client"].values())
            cells.append(
                f"{up / 2**20:.0f} MiB for {len(entry['layers'])} layers "
                f"({up / entry['dense_fp16_bytes']:.4f})"
            )
        total = max(r["bytes_up_per_client_total"].values())
        cells.append(f"{total / GIB:.2f} GiB ({total / r['dense_fp16_bytes_all_layers']:.4f})")
        lines.append(
            f"| {r['row']} | {r['layers']} | {r['memory_budget_gb']:g} | {r['layers_per_round']} "
            f"| {r['rounds']} | {_gib(r['peak_rss_vmhwm'])} | {_gib(plan['estimate_bytes'])} "
            f"({_gib(plan['fixed_bytes'])} + {plan['group']} x {_gib(plan['max_layer_bytes'])}) "
            f"| {r['wall_s']:.0f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------- main


def _row_command(name: str, args, row_out: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--row", name]
    command += ["--clients", str(args.clients), "--seqlen", str(args.seqlen)]
    command += ["--eval-windows", str(args.eval_windows), "--row-out", str(row_out)]
    if args.budget_gb is not None:
        command += ["--budget-gb", str(args.budget_gb)]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated, in order")
    parser.add_argument("--row", choices=ROWS, help="run this one row in this process")
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--budget-gb", type=float, help="memory-budget-gb (default: the run's)")
    parser.add_argument("--seqlen", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=1)
    parser.add_argument(
        "--row-timeout",
        type=float,
        default=0,
        help="stop a row after this many seconds and record how far it got (0: no limit)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "server_memory.json")
    args = parser.parse_args()

    if args.row:
        row = run_row(args.row, args)
        if args.row_out:
            args.row_out.write_text(json.dumps(row))
        else:
            print(table([row]))
        return

    names = [name for name in args.rows.split(",") if name]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    info = machine()
    command = "python bench/server_memory.py " + shlex.join(sys.argv[1:])
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = {row["row"]: row for row in previous.get("rows", [])}
    for name in names:
        ensure_model(name)  # outside the measured process
        with tempfile.TemporaryDirectory() as scratch:
            row_out = Path(scratch) / "row.json"
            child = subprocess.Popen(_row_command(name, args, row_out), cwd=ROOT)
            try:
                child.wait(timeout=args.row_timeout or None)
            except subprocess.TimeoutExpired:
                child.terminate()  # the row cleans up and writes how far it got
                try:
                    child.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            if not row_out.is_file():
                raise SystemExit(f"row {name} failed (exit {child.returncode}), nothing recorded")
            rows[name] = json.loads(row_out.read_text())
            if not rows[name].get("completed", True):
                rows[name]["row_timeout_s"] = args.row_timeout
        rows[name]["command"] = command.strip()
        rows[name]["machine"] = info
        rows[name]["measured"] = f"{datetime.now(UTC):%Y-%m-%d}"
    ordered = [rows[name] for name in ROWS if name in rows]
    print()
    print(table(ordered))
    commands = [row["command"] for row in ordered]
    write_results(
        args.out,
        info=info,
        args=args,
        skip=("row", "row_out"),
        measured=f"{datetime.now(UTC):%Y-%m-%d}",
        commands=list(dict.fromkeys(commands)),
        limit_gb=ROLE_LIMIT_GB,
        synthetic_clients=(
            "clients are synthesised (bench/synthetic_replies.py): replies of the shape and size "
            "an honest SparseGPT client sends in the default mode, not pruned"
        ),
        upper_bound=(
            "each row's process holds the server and both in-process clients, and InProcessGrid "
            "keeps a round's replies of both nodes until the server pulls them"
        ),
        table=table(ordered),
        rows=ordered,
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
