"""LLM scale: per-process peak memory, message sizes and wall time of real federations.

Each row is one real run: ``flwr run .`` in simulation (the local SuperLink, Ray), or the
loopback deployment (a ``flower-superlink`` and K ``flower-supernode`` processes on this
machine, ``flwr run . loopback``). While it runs, every process it started is watched
(``/proc``: the marker variable this bench sets is inherited by all of them) and its peak
RSS (``VmHWM``) is kept, by role: the SuperLink, the ServerApp (``flwr-serverapp``, or the
``flwr-simulation`` process that runs it in simulation), each ClientApp (``flwr-clientapp``
per message in deployment; Ray's ``ClientAppActor`` in simulation), the SuperNodes, and
Ray's own processes.

The models are the built-in ``synthetic-1b`` (LLaMA-3.2-1B shape) and ``synthetic-7b``
(LLaMA-2-7B shape): seeded bf16 weights, written once into the cache. Runs use
``layers-per-round=1`` (each round asks every node for one decoder layer) and
``dtype=bfloat16``; ``--pruner`` (default ``sparsegpt`` on 1b: replies carry kept values;
``magnitude`` on 7b: no calibration, the mask only) and tiny token counts keep it within an
hour on 2 cores. Perplexity is scored on one short window (the numbers are not a quality
result: the weights are random) so the server's layer-by-layer evaluation runs too.

The 70B extrapolation scales what grows with the model from 7B (LLaMA-2-70B: 80 layers of
hidden 8192, intermediate 28672, GQA 8 kv heads; vocab 32000): one decoder layer's bf16
weights and payload, the embeddings and head. It is arithmetic, not a run.

    python bench/scale.py                       # the full table (about an hour)
    python bench/scale.py --runs sim-1b-2 sim-1b-8
    python bench/scale.py --list

Writes bench/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # run from anywhere

from _common import machine, write_results  # noqa: E402
from local_superlink import stop_local_superlink, superlink_running  # noqa: E402

GB = 1e9
MARKER = "FEDSPALLM_SCALE_BENCH"


@dataclass(frozen=True)
class Run:
    name: str
    way: str  # "sim" | "deploy"
    model: str
    clients: int


RUNS = [
    Run("sim-1b-2", "sim", "synthetic-1b", 2),
    Run("sim-1b-4", "sim", "synthetic-1b", 4),
    Run("sim-1b-8", "sim", "synthetic-1b", 8),
    Run("deploy-1b-2", "deploy", "synthetic-1b", 2),
    Run("deploy-1b-4", "deploy", "synthetic-1b", 4),
    Run("sim-7b-2", "sim", "synthetic-7b", 2),
    Run("sim-7b-4", "sim", "synthetic-7b", 4),
    Run("deploy-7b-4", "deploy", "synthetic-7b", 4),
]


# ----------------------------------------------------------------- watching processes


def role_of(cmdline: str) -> str | None:
    for needle, role in (
        ("flower-superlink", "superlink"),
        ("flwr-simulation", "serverapp"),  # simulation: the ServerApp runs in this process
        ("flwr-serverapp", "serverapp"),
        ("flwr-clientapp", "clientapp"),
        ("ClientAppActor", "clientapp"),
        ("flower-supernode", "supernode"),
        ("flower-superexec", "superexec"),
        ("ray", "ray"),
    ):
        if needle in cmdline:
            return role
    return None


class Watcher(threading.Thread):
    """Samples every marked process's VmHWM (peak RSS, monotonic) until stopped."""

    def __init__(self, marker: str, interval: float = 0.2):
        super().__init__(daemon=True)
        self.marker = marker.encode()
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, bytes)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if self.marker not in (entry / "environ").read_bytes():
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                status = (entry / "status").read_text()
            except OSError:
                continue
            role = role_of(cmdline)
            match = re.search(r"VmHWM:\s+(\d+) kB", status)
            if role and match:
                pid = int(entry.name)
                peak = int(match.group(1)) * 1024
                self.peaks[pid] = (role, max(peak, self.peaks.get(pid, (role, 0))[1]))

    def by_role(self) -> dict[str, dict]:
        roles: dict[str, dict] = {}
        for role, peak in self.peaks.values():
            entry = roles.setdefault(role, {"processes": 0, "peak_rss_bytes": 0})
            entry["processes"] += 1
            entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], peak)
        return roles


# ----------------------------------------------------------------- running


def run_config(args, run: Run, output_dir: Path) -> dict:
    pruner = args.pruner_1b if run.model == "synthetic-1b" else args.pruner_7b
    return {
        "model": run.model,
        "dtype": "bfloat16",
        "pruner": pruner,
        "layers-per-round": 1,
        "resolve": False,
        "calib-samples": args.calib_samples,
        "seqlen": args.seqlen,
        "eval-windows": 1,
        "standalone-eval": False,
        "min-clients": run.clients,
        "round-timeout": 3600.0,
        "output-dir": str(output_dir),
    }


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value) + "'"


def environment(home: Path, marker: str, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        MARKER: marker,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FEDSPALLM_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
    }


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for_log(path: Path, pattern: str, process: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if match := re.search(pattern, text):
            return match
        if process.poll() is not None:
            raise SystemExit(f"{path.name}: exited ({process.returncode}):\n{text[-3000:]}")
        time.sleep(0.5)
    raise SystemExit(f"{path.name}: no {pattern!r} after {timeout} s")


def start(args_list, log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            args_list,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def flwr_run(
    command: list[str], env: dict, timeout: float, connection: tuple[str, ...] = ()
) -> tuple[str, str]:
    """``flwr run ... --stream``; returns (run id, run folder) of a completed run."""
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    log = result.stdout + result.stderr
    run_id = re.search(r"Successfully started run (\d+)", log)
    folder = re.search(r"FedSpaLLM run folder: (\S+)", log)
    if not run_id or not folder:
        raise SystemExit(f"flwr run did not complete:\n{log[-4000:]}")
    listing = subprocess.run(
        ["flwr", "ls", *connection, "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    runs = {r["run-id"]: r for r in json.loads(listing.stdout)["runs"]}
    status = runs.get(run_id.group(1), {}).get("status", "unknown")
    if status != "finished:completed":
        raise SystemExit(f"run {run_id.group(1)} ended {status}:\n{log[-4000:]}")
    return run_id.group(1), folder.group(1)


def overrides(config: dict) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def run_simulation(args, run: Run, work: Path, env: dict) -> str:
    if superlink_running():
        raise SystemExit("a local SuperLink is already running: stop it first (fixed ports)")
    command = ["flwr", "run", ".", "--stream", "--run-config"]
    command += [overrides(run_config(args, run, work / "runs"))]
    command += ["--federation-config", f"num-supernodes={run.clients}"]
    try:
        return flwr_run(command, env, args.timeout)[1]
    finally:
        stop_local_superlink(Path(env["FLWR_HOME"]))


def run_deployment(args, run: Run, work: Path, env: dict) -> str:
    superlink_port, *node_ports = free_ports(1 + run.clients)
    processes = []
    try:
        link_log = work / "superlink.log"
        processes.append(
            start(
                ["flower-superlink", "--insecure", "--host", "127.0.0.1"]
                + ["--port", str(superlink_port)],
                link_log,
                env,
                work,
            )
        )
        wait_for_log(link_log, r"Starting Flower SuperLink|Flower Deployment Runtime", processes[0])
        time.sleep(2)
        for k, port in enumerate(node_ports):
            home = work / f"node-{k}"
            home.mkdir()
            node_env = {**env, "FLWR_HOME": str(home)}
            node_config = f"partition-id={k} num-partitions={run.clients}"
            command = ["flower-supernode", "--insecure", "--superlink"]
            command += [f"127.0.0.1:{superlink_port}", "--host", "127.0.0.1"]
            command += ["--port", str(port), "--node-config", node_config]
            processes.append(start(command, work / f"supernode-{k}.log", node_env, home))
        cli_home = Path(env["FLWR_HOME"])
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
        )
        command = ["flwr", "run", ".", "loopback", "--stream", "--run-config"]
        command += [overrides(run_config(args, run, work / "runs"))]
        return flwr_run(command, env, args.timeout, ("loopback",))[1]
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, 15)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)


def measure(args, run: Run) -> dict:
    marker = uuid.uuid4().hex
    work = Path(tempfile.mkdtemp(prefix=f"scale-{run.name}-", dir=args.work))
    env = environment(work / "flwr-home", marker, args.cache)
    watcher = Watcher(marker)
    watcher.start()
    began = time.perf_counter()
    try:
        folder = (run_simulation if run.way == "sim" else run_deployment)(args, run, work, env)
    finally:
        watcher.halt.set()
        watcher.join()
    wall = time.perf_counter() - began
    report = json.loads((Path(folder) / "report.json").read_text())
    rounds = report.get("layerwise", {}).get("rounds", [])
    ups = [r["bytes-up"] for r in rounds]
    per_round = [b - a for a, b in zip([0, *ups], ups, strict=False)]
    row = {
        "run": run.name,
        "way": run.way,
        "model": run.model,
        "clients": run.clients,
        "config": run_config(args, run, Path("runs")),
        "wall_s": round(wall, 1),
        "roles": watcher.by_role(),
        "largest_message_bytes": report["communication"]["largest_up"],
        "bytes_per_round_max": max(per_round, default=0),
        "bytes_up_total": report["communication"]["total_up"],
        "rounds": len(rounds),
        "rejected": len(report.get("rejected", [])),
        "sparsity": report["sparsity"]["overall"],
        "timings": report["timings"],
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


# ----------------------------------------------------------------- the 70B arithmetic


def layer_parameters(hidden: int, intermediate: int, heads: int, kv_heads: int) -> int:
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    return attention + 3 * hidden * intermediate + 2 * hidden  # + two RMSNorms


def extrapolate(rows: list[dict], sparsity: float = 0.5) -> list[dict]:
    """Per role, 7B's measured peak scaled by what grows with the model, to LLaMA-2-70B."""
    shape_7b = layer_parameters(4096, 11008, 32, 32)
    shape_70b = layer_parameters(8192, 28672, 64, 8)
    layer_ratio = shape_70b / shape_7b  # one decoder layer: weights, payload, accumulators
    outer_7b, outer_70b = 2 * 32000 * 4096, 2 * 32000 * 8192  # embeddings + head
    out = []
    for row in rows:
        if row["model"] != "synthetic-7b":
            continue
        for role, entry in row["roles"].items():
            if role not in ("superlink", "serverapp", "clientapp"):
                continue
            # Peak = a base (Python, torch: ~0.5 GB) + the outer weights + a few layers' worth.
            base = 0.5 * GB
            outer = outer_7b * 2  # bf16
            layers_part = max(entry["peak_rss_bytes"] - base - outer, 0)
            if role == "superlink":
                outer_scaled = 0  # the SuperLink holds messages, not the model
                layers_part = max(entry["peak_rss_bytes"] - base, 0)
            else:
                outer_scaled = outer_70b * 2
            out.append(
                {
                    "role": role,
                    "clients": row["clients"],
                    "way": row["way"],
                    "measured_7b_gb": round(entry["peak_rss_bytes"] / GB, 2),
                    "extrapolated_70b_gb": round(
                        (base + outer_scaled + layers_part * layer_ratio) / GB, 2
                    ),
                }
            )
    return out


# ----------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = [
        "| run | model | K | wall s | SuperLink GB | ServerApp GB | ClientApp GB (max) "
        "| SuperNode GB | largest message MB | bytes/round max MB | rounds | rejected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def gb(role: str, row=r) -> str:
            entry = row["roles"].get(role)
            return f"{entry['peak_rss_bytes'] / GB:.2f}" if entry else "–"

        lines.append(
            f"| {r['run']} | {r['model']} | {r['clients']} | {r['wall_s']:.0f} "
            f"| {gb('superlink')} | {gb('serverapp')} | {gb('clientapp')} | {gb('supernode')} "
            f"| {r['largest_message_bytes'] / 1e6:.1f} | {r['bytes_per_round_max'] / 1e6:.1f} "
            f"| {r['rounds']} | {r['rejected']} |"
        )
    return "\n".join(lines)


def flatness(rows: list[dict]) -> list[str]:
    out = []
    for way in ("sim", "deploy"):
        for model in ("synthetic-1b", "synthetic-7b"):
            chosen = sorted(
                (r for r in rows if r["way"] == way and r["model"] == model),
                key=lambda r: r["clients"],
            )
            if len(chosen) >= 2:
                low, high = chosen[0], chosen[-1]
                ratio = (
                    high["roles"]["serverapp"]["peak_rss_bytes"]
                    / low["roles"]["serverapp"]["peak_rss_bytes"]
                )
                out.append(
                    f"{way} {model}: ServerApp peak RSS K={high['clients']} / "
                    f"K={low['clients']} = {ratio:.3f}"
                )
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="*", default=[r.name for r in RUNS])
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    parser.add_argument("--pruner-1b", default="sparsegpt")
    parser.add_argument("--pruner-7b", default="magnitude")
    parser.add_argument("--calib-samples", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fedspallm")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep each run's folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.list:
        for r in RUNS:
            print(f"{r.name}: {r.way} {r.model} K={r.clients}")
        return
    chosen = [r for r in RUNS if r.name in args.runs]
    from llm_pruning.models import _cached_builtin  # write the synthetic models once

    for model in sorted({r.model for r in chosen}):
        start_write = time.perf_counter()
        _cached_builtin(model, args.cache)
        print(f"{model}: in the cache ({time.perf_counter() - start_write:.0f} s)", flush=True)
    rows = []
    previous = json.loads(args.out.read_text()).get("rows", []) if args.out.exists() else []
    for run in chosen:
        print(f"--- {run.name}", flush=True)
        row = measure(args, run)
        print(table([row]).splitlines()[-1], flush=True)
        rows.append(row)
        # Keep the rows of earlier invocations that this one did not redo.
        kept = [r for r in previous if r["run"] not in {x["run"] for x in rows}]
        write_results(
            args.out,
            info=machine(),
            args=args,
            rows=kept + rows,
            extrapolation=extrapolate(kept + rows),
        )
    everything = kept + rows
    text = table(sorted(everything, key=lambda r: [x.name for x in RUNS].index(r["run"])))
    lines = flatness(everything)
    extra = extrapolate(everything)
    text += "\n\n" + "\n".join(f"- {line}" for line in lines)
    if extra:
        text += "\n\n| role | way | K | measured 7B GB | extrapolated 70B GB |\n"
        text += "|---|---|---|---|---|\n"
        text += "\n".join(
            f"| {e['role']} | {e['way']} | {e['clients']} | {e['measured_7b_gb']} "
            f"| {e['extrapolated_70b_gb']} |"
            for e in extra
        )
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
