"""Simulated clients one after another, or side by side: Ray's ``client-resources``.

``flwr run`` gives each simulated ClientApp ``client-resources-num-cpus`` CPUs of the machine
(Flower's default: 2), and Ray runs as many ClientApps at once as the machine's CPUs allow.
On a 2-core machine the default therefore runs the clients one after another, each with 2
torch threads; ``client-resources-num-cpus=1`` runs two at once, each with one thread (Ray
sets ``OMP_NUM_THREADS`` to the actor's CPUs, which torch follows). How many fit is
``cores / num-cpus``, and each needs its own copy of the model in memory (SmolLM2-135M in
float32: about 1.4 GB per ClientApp at its peak, ``bench/scale.py`` has the figures).

The bench runs the same job once per ``--client-cpus`` value, through real ``flwr run .``
(``bench/federation_overhead.py``'s runner), on one local SuperLink that it starts and stops
by PID, and prints the wall times and the run's own federation stage.

    python bench/parallel_clients.py                    # the default main job (SmolLM2), K=2
    python bench/parallel_clients.py --model tiny-llama --seqlen 128   # a quick look

Writes bench/results/parallel_clients.json (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from _common import machine, write_results  # noqa: E402
from federation_overhead import run_flwr  # noqa: E402
from local_superlink import stop_local_superlink, superlink_running  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=2, help="K (num-supernodes)")
    parser.add_argument("--client-cpus", default="2,1", help="client-resources-num-cpus values")
    parser.add_argument("--seqlen", type=int, default=0, help="0: the app's default")
    parser.add_argument(
        "--set", action="append", default=[], help="extra run config KEY=VALUE (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "parallel_clients.json")
    args = parser.parse_args()
    if superlink_running():
        raise SystemExit(
            "a local Flower SuperLink is already running (127.0.0.1:39093 answers): flwr run "
            "would use it, and the bench must not stop what it did not start. Stop it first."
        )
    info = machine()
    print(f"machine: {info['cpu_count']} CPUs, load average {info['loadavg_at_start']}")
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedspallm-parallel-") as scratch:
        scratch = Path(scratch)
        config = {"model": args.model, "output-dir": str(scratch / "runs")}
        if args.seqlen:
            config["seqlen"] = args.seqlen
        for item in args.set:  # KEY=VALUE, the value as TOML (true, 0.7, 'text')
            key, _, value = item.partition("=")
            try:
                config[key] = tomllib.loads(f"value = {value}")["value"]
            except tomllib.TOMLDecodeError:
                config[key] = value  # a bare string
        home = scratch / "flwr-home"
        env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        try:
            # One SuperLink for every setting: an untimed tiny run starts it (and pays for it).
            warm_up = {**config, "model": "tiny-llama", "seqlen": 64, "calib-samples": 1}
            run_flwr({**warm_up, "eval-windows": 1}, args.clients, env)
            for cpus in (int(x) for x in args.client_cpus.split(",")):
                result = run_flwr(config, args.clients, env, f"client-resources-num-cpus={cpus}")
                result["client_cpus"] = cpus
                rows.append(result)
                print(f"  num-cpus={cpus}: {result['wall_s']:.1f} s", file=sys.stderr)
        finally:
            stop_local_superlink(home)
    print(f"\n`flwr run .`, {args.model}, K={args.clients}, run config {config}\n")
    print("| client-resources-num-cpus | clients at once | wall s | federation stage s |")
    print("|---|---|---|---|")
    for row in rows:
        at_once = max(1, (info["cpus_usable"] or 1) // row["client_cpus"])
        federation = row["report_timings"].get("federation", float("nan"))
        print(
            f"| {row['client_cpus']} | {min(at_once, args.clients)} | {row['wall_s']:.1f} "
            f"| {federation:.1f} |"
        )
    write_results(
        args.out, info=info, args=args, config=config, rows=rows, wall_s=time.perf_counter() - start
    )


if __name__ == "__main__":
    main()
