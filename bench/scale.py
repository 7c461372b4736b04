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
``dtype=bfloat16``; on ``synthetic-7b`` each client prunes half the layers
(``--layer-fraction-7b``: each layer gets 2 of the 4 clients' replies). The pruner is
``magnitude`` by default (``--pruner-1b``, ``--pruner-7b``): it needs no calibration, so the
runs fit in an hour on 2 cores; its replies carry the mask only. SparseGPT replies also carry
the kept values; SparseGPT on one 2048 x 8192 matrix takes over a minute on these cores, so
those sizes are computed instead: the server knows every valid reply's exact size from the
assignment (``payload_limit``), and the bench prints it per layer for both pruners.
Perplexity is scored on one 32-token window (not a quality
result: the weights are random) so the server's layer-by-layer evaluation runs too.

The 70B extrapolation (LLaMA-2-70B: 80 layers of hidden 8192, intermediate 28672, 8 kv
heads; vocab 32000) fits, per role, peak = base + a x (bytes outside the decoder layers)
+ b x (bytes of one layer) on its 1b and 7b runs (base: a process that only imported torch,
transformers and flwr), then evaluates it at 70B's sizes. It is arithmetic, not a run.

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
import signal
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
    # "magnitude": layers-per-round=1, resolve=false, a mask-only pruner (real clients);
    # "default": the run config's defaults, clients SYNTHESISED (bench/synthetic_replies.py)
    mode: str = "magnitude"


RUNS = [
    Run("sim-1b-2", "sim", "synthetic-1b", 2),
    Run("sim-1b-4", "sim", "synthetic-1b", 4),
    Run("sim-1b-8", "sim", "synthetic-1b", 8),
    Run("deploy-1b-2", "deploy", "synthetic-1b", 2),
    Run("sim-7b-2", "sim", "synthetic-7b", 2),
    Run("sim-7b-4", "sim", "synthetic-7b", 4),
    Run("sim-1b-2-default", "sim", "synthetic-1b", 2, "default"),
    Run("sim-7b-2-default", "sim", "synthetic-7b", 2, "default"),
]
SYNTHETIC_CLIENT = ROOT / "bench" / "synthetic_replies.py"


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


def stop_marked(marker: str, grace_s: float = 20) -> None:
    """SIGTERM, then SIGKILL, every process that inherited this run's marker."""
    watcher = Watcher(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        watcher.peaks.clear()
        watcher.sample()
        for pid in watcher.peaks:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while watcher.peaks and time.monotonic() < deadline:
            time.sleep(0.5)
            watcher.peaks.clear()
            watcher.sample()


# ----------------------------------------------------------------- running


def run_config(args, run: Run, output_dir: Path) -> dict:
    small = run.model == "synthetic-1b"
    if run.mode == "default":  # only what keeps the evaluations small and the run separate
        return {
            "model": run.model,
            "dtype": "bfloat16",
            "seqlen": args.seqlen,
            "eval-windows": 1,
            "standalone-eval": False,  # the synthesised clients score no models
            "min-clients": run.clients,
            "round-timeout": 3600.0,
            "output-dir": str(output_dir),
        }
    return {
        "model": run.model,
        "dtype": "bfloat16",
        "pruner": args.pruner_1b if small else args.pruner_7b,
        "layer-fraction": 1.0 if small else args.layer_fraction_7b,
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


def synthetic_app(work: Path) -> Path:
    """A copy of this app whose ClientApp is ``bench/synthetic_replies.py``'s: the same
    packages and ServerApp, the clients' replies synthesised (``mode='default'`` runs)."""
    import tomllib

    app = work / "app"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("llm_pruning", "fedspallm_strategy", "client_app", "server_app"):
        shutil.copytree(ROOT / package, app / package, ignore=ignore)
    for name in ("README.md", "LICENSE"):
        shutil.copy(ROOT / name, app / name)
    shutil.copy(SYNTHETIC_CLIENT, app / SYNTHETIC_CLIENT.name)
    text = (ROOT / "pyproject.toml").read_text()
    real = tomllib.loads(text)["tool"]["flwr"]["app"]["components"]["clientapp"]
    text = text.replace(f'clientapp = "{real}"', 'clientapp = "synthetic_replies:app"')
    text = text.replace(
        '    "/README.md",\n', f'    "/README.md",\n    "/{SYNTHETIC_CLIENT.name}",\n'
    )
    if "synthetic_replies:app" not in text or f"/{SYNTHETIC_CLIENT.name}" not in text:
        raise SystemExit("pyproject.toml: cannot point the app copy at the synthetic ClientApp")
    (app / "pyproject.toml").write_text(text)
    return app


def run_simulation(args, run: Run, work: Path, env: dict) -> str:
    if superlink_running():
        raise SystemExit("a local SuperLink is already running: stop it first (fixed ports)")
    app = synthetic_app(work) if run.mode == "default" else Path(".")
    command = ["flwr", "run", str(app), "--stream", "--run-config"]
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
    """One run, watched; a run that fails or passes ``--timeout`` gives a row marked
    ``completed: false`` with its peaks so far and why it stopped."""
    marker = uuid.uuid4().hex
    work = Path(tempfile.mkdtemp(prefix=f"scale-{run.name}-", dir=args.work))
    env = environment(work / "flwr-home", marker, args.cache)
    watcher = Watcher(marker)
    watcher.start()
    began = time.perf_counter()
    head = {
        "run": run.name,
        "way": run.way,
        "model": run.model,
        "clients": run.clients,
        "mode": run.mode,
        "synthetic_clients": run.mode == "default",
        "config": run_config(args, run, Path("runs")),
    }
    try:
        folder = (run_simulation if run.way == "sim" else run_deployment)(args, run, work, env)
        # read before the run's folder goes with ``work`` below
        report = json.loads((Path(folder) / "report.json").read_text())
    except (SystemExit, subprocess.TimeoutExpired) as error:
        stopped = f"{type(error).__name__}: {error}"
        return {
            **head,
            "completed": False,
            "stopped_by": stopped[-600:],
            "roles": watcher.by_role(),
            "wall_s": round(time.perf_counter() - began, 1),
        }
    finally:
        watcher.halt.set()
        watcher.join()
        stop_marked(marker)  # e.g. flwr-simulation and Ray, which outlive their SuperLink
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - began
    layerwise = report.get("layerwise", {})
    rounds = layerwise.get("per_round", [])
    ups = [r["bytes-up"] for r in rounds]
    per_round = [b - a for a, b in zip([0, *ups], ups, strict=False)]
    return {
        **head,
        "completed": True,
        "wall_s": round(wall, 1),
        "roles": watcher.by_role(),
        "layers_per_round": layerwise.get("layers-per-round"),
        "memory_budget_gb": layerwise.get("memory-budget-gb"),
        "largest_message_bytes": report["communication"]["largest_up"],
        "bytes_per_round_max": max(per_round, default=0),
        "bytes_up_total": report["communication"]["total_up"],
        "rounds": len(rounds),
        "rejected": len(report.get("rejected", [])),
        "sparsity": report["sparsity"]["overall"],
        "timings": report["timings"],
    }


# ----------------------------------------------------------------- the 70B arithmetic

# (parameters outside the decoder layers, parameters of one decoder layer), bf16 = 2 bytes each
SHAPES = {
    "synthetic-1b": (128256 * 2048, 60_821_504),  # tied head: one copy
    "synthetic-7b": (2 * 32000 * 4096, 202_383_360),
    "llama-2-70b": (2 * 32000 * 8192, 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672),
}


def baseline_rss() -> int:
    """Peak RSS of a process that has only imported what every role imports."""
    code = (
        "import torch, transformers, flwr, re\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024


def extrapolate(rows: list[dict], base: int) -> list[dict]:
    """Each role's peak RSS at LLaMA-2-70B, fitted on its 1b and 7b runs of the same way and K.

    peak = base + a * (bytes outside the layers) + b * (bytes of one layer): two runs give
    a and b (the outer weights are nearly the same size in both models, so the layers'
    part is what the two differ in). Arithmetic, not a run.
    """
    out = []
    done = [r for r in rows if r.get("completed", True)]
    by_key = {(r["way"], r["clients"], r.get("mode", "magnitude"), r["model"]): r for r in done}
    for (way, clients, mode, model), row in sorted(by_key.items()):
        small = by_key.get((way, clients, mode, "synthetic-1b"))
        if model != "synthetic-7b" or small is None:
            continue
        (o1, l1), (o7, l7), (o70, l70) = (
            tuple(2 * n for n in SHAPES[m]) for m in ("synthetic-1b", "synthetic-7b", "llama-2-70b")
        )
        for role in ("superlink", "serverapp", "clientapp"):
            if role not in row["roles"] or role not in small["roles"]:
                continue
            p1 = small["roles"][role]["peak_rss_bytes"] - base
            p7 = row["roles"][role]["peak_rss_bytes"] - base
            det = o1 * l7 - o7 * l1
            a = max((p1 * l7 - p7 * l1) / det, 0.0)
            b = max((o1 * p7 - o7 * p1) / det, 0.0)
            out.append(
                {
                    "role": role,
                    "way": way,
                    "mode": mode,
                    "clients": clients,
                    "measured_1b_gb": round((p1 + base) / GB, 2),
                    "measured_7b_gb": round((p7 + base) / GB, 2),
                    "per_outer_byte": round(a, 2),
                    "per_layer_byte": round(b, 2),
                    "extrapolated_70b_gb": round((base + a * o70 + b * l70) / GB, 2),
                }
            )
    return out


def message_sizes(cache: Path) -> list[dict]:
    """The exact size of a valid reply: one decoder layer, and every layer in one message (the
    paper's one-shot round), for a mask-only pruner and for SparseGPT's kept values as they
    travel by default (int8, a float32 scale per row)."""
    import torch

    from fedspallm_strategy.config import RunConfig
    from fedspallm_strategy.strategies.reply_specs import matrix_specs
    from fedspallm_strategy.wire.payload_spec import payload_limit
    from llm_pruning.families import num_layers
    from llm_pruning.models import load_model

    rows = []
    for model_name in ("synthetic-1b", "synthetic-7b"):
        model, _ = load_model(model_name, dtype=torch.bfloat16, cache=cache, lazy=True)
        layers = range(num_layers(model))
        for pruner in ("magnitude", "sparsegpt"):
            settings = {"model": model_name, "pruner": pruner, "dtype": "bfloat16"}
            config = RunConfig.from_mapping({**settings, "resolve": False})
            one = payload_limit(matrix_specs(model, [0], config))
            every = payload_limit(matrix_specs(model, layers, config))
            rows.append({"model": model_name, "pruner": pruner, "layer": one, "model_all": every})
        del model
    return rows


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

        peaks = f"| {gb('superlink')} | {gb('serverapp')} | {gb('clientapp')} | {gb('supernode')} "
        start = f"| {r['run']} | {r['model']} | {r['clients']} | {r['wall_s']:.0f} "
        if not r.get("completed", True):
            lines.append(start + peaks + "| stopped: peaks so far | – | – | – |")
            continue
        lines.append(
            start
            + peaks
            + f"| {r['largest_message_bytes'] / 1e6:.1f} | {r['bytes_per_round_max'] / 1e6:.1f} "
            f"| {r['rounds']} | {r['rejected']} |"
        )
    return "\n".join(lines)


def flatness(rows: list[dict]) -> list[str]:
    out = []
    for way in ("sim", "deploy"):
        for model in ("synthetic-1b", "synthetic-7b"):
            chosen = sorted(
                (
                    r
                    for r in rows
                    if r["way"] == way and r["model"] == model and r.get("mode") != "default"
                ),
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
    parser.add_argument("--pruner-1b", default="magnitude")
    parser.add_argument("--pruner-7b", default="magnitude")
    parser.add_argument(
        "--layer-fraction-7b",
        type=float,
        default=0.5,
        help="share of synthetic-7b's layers each client prunes (time: 0.5 halves the work)",
    )
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
    from llm_pruning.builtin import cached_builtin  # write the synthetic models once

    for model in sorted({r.model for r in chosen}):
        start_write = time.perf_counter()
        cached_builtin(model, args.cache)
        print(f"{model}: in the cache ({time.perf_counter() - start_write:.0f} s)", flush=True)
    base = baseline_rss()
    rows, kept = [], []
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
            measured=time.strftime("%Y-%m-%d"),  # the date docs/results.md's header wants
            rows=kept + rows,
            baseline_rss_bytes=base,
            extrapolation=extrapolate(kept + rows, base),
        )
    done = {r["run"] for r in rows}
    everything = [r for r in previous if r["run"] not in done] + rows
    sizes = message_sizes(args.cache)
    text = table(sorted(everything, key=lambda r: [x.name for x in RUNS].index(r["run"])))
    lines = flatness(everything)
    extra = extrapolate(everything, base)
    text += "\n\n" + "\n".join(f"- {line}" for line in lines)
    if extra:
        text += "\n\n| role | way | mode | K | 1B GB | 7B GB | 70B GB (extrapolated) |\n"
        text += "|---|---|---|---|---|---|---|\n"
        text += "\n".join(
            f"| {e['role']} | {e['way']} | {e['mode']} | {e['clients']} | {e['measured_1b_gb']} "
            f"| {e['measured_7b_gb']} | {e['extrapolated_70b_gb']} |"
            for e in extra
        )
    text += "\n\n| model | pruner | valid reply, one layer MB | all layers in one reply MB |\n"
    text += "|---|---|---|---|\n"
    text += "\n".join(
        f"| {r['model']} | {r['pruner']} | {r['layer'] / 1e6:.1f} | {r['model_all'] / 1e6:.1f} |"
        for r in sizes
    )
    write_results(
        args.out,
        info=machine(),
        args=args,
        rows=everything,
        baseline_rss_bytes=base,
        extrapolation=extra,
        message_sizes=sizes,
    )
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
