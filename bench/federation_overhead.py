"""What `flwr run .` costs over running the same plan in-process.

Per repeat, the same run config and number of clients K run three ways:

- **in-process**: a fresh Python process calls ``server_app.federation.run_federation`` with
  ``InProcessGrid.simulation(client_app, K, {})``: the same ServerApp code, strategy and
  ClientApp handlers as ``flwr run``, without SuperLink, Ray or process boundaries. Reported
  as the process's wall time (imports included) and the ``run_federation`` call alone.
- **flwr run, cold**: ``flwr run . --stream`` with a private, empty ``FLWR_HOME``: starts a
  local SuperLink (simulation runtime), which starts Ray for the run.
- **flwr run, warm**: the same command again while that SuperLink is still up: Ray and the
  ServerApp/ClientApp processes still start per run, the SuperLink does not.

Every flwr run has ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (the machine has the
dependencies). The SuperLink the bench started is stopped by PID afterwards (it is found by
its command line, which names the private FLWR_HOME); the bench refuses to start when a local
SuperLink is already up, since ``flwr run`` would then use that one. Each run's status is
read from ``flwr ls --format json`` (``--stream`` exits 0 even when a run fails).

The table gives wall times, flwr / in-process ratios and differences (the fixed start-up),
plus the ``federation`` stage of each run's own ``report.json`` timings (the round itself).

    python bench/federation_overhead.py                              # tiny-llama, K=2, twice
    python bench/federation_overhead.py --model smollm2-135m --seqlen 256 --calib-samples 4

Writes bench/results/federation_overhead.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from _common import machine, write_results  # noqa: E402
from local_superlink import stop_local_superlink, superlink_running  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # run from anywhere


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def run_config(args, output_dir: Path) -> dict:
    config = {
        "model": args.model,
        "seqlen": args.seqlen,
        "calib-samples": args.calib_samples,
        "eval-windows": args.eval_windows,
        "output-dir": str(output_dir),
    }
    for item in args.set:  # TOML values, as in --run-config; a bare word is a string
        key, _, value = item.partition("=")
        try:
            config[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            config[key] = value
    return config


# ----------------------------------------------------------------- in-process


def inprocess_worker(config_json: str, clients: int) -> None:
    """Child process: one in-process federation; prints a JSON line of its timings."""
    start = time.perf_counter()
    from client_app.app import app as client_app
    from fedspallm_strategy.config import RunConfig
    from server_app.federation import run_federation
    from server_app.inprocess import InProcessGrid

    imported = time.perf_counter()
    config = RunConfig.from_mapping(json.loads(config_json))
    grid = InProcessGrid.simulation(client_app, clients, {})
    run_dir = run_federation(grid, config, run_id=int(time.time()) % 100_000)
    done = time.perf_counter()
    print(json.dumps({"import_s": imported - start, "run_s": done - imported, "dir": str(run_dir)}))


def run_inprocess(config: dict, clients: int) -> dict:
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--inprocess-worker",
            json.dumps(config),
            "--clients",
            str(clients),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"in-process run failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((Path(row["dir"]) / "report.json").read_text())
    return {"wall_s": wall, **row, "report_timings": report["timings"]}


# ----------------------------------------------------------------- flwr run


def run_flwr(config: dict, clients: int, env: dict, federation: str = "") -> dict:
    """One ``flwr run . --stream``; ``federation``: more ``--federation-config`` settings."""
    overrides = " ".join(f"{key}={toml_value(value)}" for key, value in config.items())
    command = [
        "flwr",
        "run",
        ".",
        "--stream",
        "--run-config",
        overrides,
        "--federation-config",
        f"num-supernodes={clients} {federation}".strip(),
    ]
    marks, lines = {}, []
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timeline = []
    for line in process.stdout:  # timestamps of the milestones, as the user sees them
        now = time.perf_counter() - start
        lines.append(line)
        timeline.append([round(now, 2), line.rstrip()[:200]])
        if "Starting local SuperLink" in line:
            marks.setdefault("superlink_start_s", now)
        if "Successfully started run" in line:
            marks.setdefault("run_submitted_s", now)
        if "FedSpaLLM run folder:" in line:
            marks.setdefault("run_folder_printed_s", now)
    process.wait()
    wall = time.perf_counter() - start
    log = "".join(lines)
    match = re.search(r"Successfully started run (\d+)", log)
    folder = re.search(r"FedSpaLLM run folder: (\S+)", log)
    if not match or not folder:
        raise SystemExit(f"flwr run did not complete:\n{log[-3000:]}")
    listing = subprocess.run(
        ["flwr", "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    runs = {run["run-id"]: run for run in json.loads(listing.stdout)["runs"]}
    status = runs.get(match.group(1), {}).get("status", "unknown")
    if status != "finished:completed":
        raise SystemExit(f"flwr run {match.group(1)} ended {status}:\n{log[-3000:]}")
    report = json.loads((Path(folder.group(1)) / "report.json").read_text())
    return {
        "wall_s": wall,
        "run_id": match.group(1),
        "status": status,
        **marks,
        "report_timings": report["timings"],
        "perplexity": report.get("perplexity"),
        "timeline": timeline[:400],
    }


# ----------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = [
        "| repeat | way | wall s | flwr / in-process wall | flwr - in-process wall s "
        "| in-run s | flwr / in-process in-run | outside the run s | federation stage s "
        "| run submitted at s | run folder printed at s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["inprocess"]
        for way in ("inprocess", "flwr_cold", "flwr_warm"):
            if way not in r:
                continue
            x = r[way]
            in_run = sum(x["report_timings"].values())
            flwr = way != "inprocess"
            cells = [
                f"{x['wall_s']:.1f}",
                f"{x['wall_s'] / base['wall_s']:.2f}" if flwr else "",
                f"{x['wall_s'] - base['wall_s']:.1f}" if flwr else "",
                f"{in_run:.1f}",
                f"{in_run / sum(base['report_timings'].values()):.2f}" if flwr else "",
                f"{x['wall_s'] - in_run:.1f}",
                f"{x['report_timings'].get('federation', float('nan')):.1f}",
                f"{x['run_submitted_s']:.1f}" if "run_submitted_s" in x else "",
                f"{x['run_folder_printed_s']:.1f}" if "run_folder_printed_s" in x else "",
            ]
            lines.append(f"| {r['repeat']} | {way.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama, smollm2-135m, ...")
    parser.add_argument("--clients", type=int, default=2, help="K (num-supernodes)")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument(
        "--set", action="append", default=[], help="extra run config KEY=VALUE (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-warm", action="store_true", help="skip the warm flwr run")
    parser.add_argument("--out", type=Path, default=RESULTS / "federation_overhead.json")
    parser.add_argument("--inprocess-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inprocess_worker is not None:
        inprocess_worker(args.inprocess_worker, args.clients)
        return
    if superlink_running():
        raise SystemExit(
            "a local Flower SuperLink is already running (127.0.0.1:39093 answers): flwr run "
            "would use it, and the bench must not stop what it did not start. Stop it first."
        )

    info = machine()
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable), "
        f"torch {info['torch']} with {info['torch_threads']} threads, "
        f"load average {info['loadavg_at_start']}"
    )
    total = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedspallm-bench-") as scratch:
        scratch = Path(scratch)
        config = run_config(args, scratch / "runs")
        print(f"plan: K={args.clients}, run config {config}", file=sys.stderr)
        for repeat in range(1, args.repeats + 1):
            row = {"repeat": repeat, "inprocess": run_inprocess(config, args.clients)}
            print(
                f"  repeat {repeat}: in-process {row['inprocess']['wall_s']:.1f} s", file=sys.stderr
            )
            home = scratch / f"flwr-home-{repeat}"
            env = {
                **os.environ,
                "FLWR_HOME": str(home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            }
            try:
                row["flwr_cold"] = run_flwr(config, args.clients, env)
                print(
                    f"  repeat {repeat}: flwr cold {row['flwr_cold']['wall_s']:.1f} s",
                    file=sys.stderr,
                )
                if not args.no_warm:
                    row["flwr_warm"] = run_flwr(config, args.clients, env)
                    print(
                        f"  repeat {repeat}: flwr warm {row['flwr_warm']['wall_s']:.1f} s",
                        file=sys.stderr,
                    )
            finally:
                row["stopped_pids"] = stop_local_superlink(home)
            rows.append(row)
    total = time.perf_counter() - total
    print(f"\n`flwr run` vs in-process, {args.model}, K={args.clients}, plan {config}")
    print(
        "(in-run = the run's own report.json timings summed: load, evaluations, federation; "
        "outside the run = wall - in-run: process starts, imports, SuperLink, Ray, CLI)\n"
    )
    print(table(rows))
    cold = [r["flwr_cold"]["wall_s"] - r["inprocess"]["wall_s"] for r in rows]
    print(
        f"\nfixed start-up (cold flwr run - in-process wall), per repeat: "
        f"{', '.join(f'{c:.1f} s' for c in cold)}; bench wall time {total:.1f} s"
    )
    write_results(args.out, info=info, args=args, config=config, rows=rows, wall_s=total)


if __name__ == "__main__":
    main()
