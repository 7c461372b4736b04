"""Beyond centralized SparseGPT: exact reconstruction (``reconstruction='lsq'``) and federated
recovery, side by side with dense, dense fine-tuned on the same budget, and centralized pruning.

Every row is a real run (``run_federation`` over the in-process grid: the strategies and the
ClientApp of ``flwr run``), SmolLM2-135M, two organisations with python-docs shards (or, with
``--clients-dir``, one organisation per text of a folder). Each model is scored on the
clients' domain (python-docs' held-out topics, or ``--domain-text``) and on another
(*Persuasion*, or ``--other-text``). A recovery row's run scores its model after every
round, so one run with ``--recovery-rounds 4`` gives the rows at 1, 2 and 4 rounds. "dense +
fine-tuning" trains the dense model exactly as ``centralized`` recovery trains a pruned one
(every shard's windows pooled, the federation's steps, a batch per shard): domain adaptation,
not recovery.

    python bench/beyond_centralized.py --pattern 0.7 --rows central-sparsegpt,central-lsq
    python bench/beyond_centralized.py --pattern 0.5 --rows dense-ft,fed-local-recovery
    python bench/beyond_centralized.py --pattern 0.5 --rows dense-ft,fed-local-recovery \
        --recovery-rounds 4 --tag 4-rounds
    python bench/beyond_centralized.py --pattern 0.7 --rows central-sparsegpt,fed-global-lsq \
        --clients-dir ../shared/data/austen --domain-text ../shared/data/austen/persuasion.txt \
        --other-text python-docs --tag austen

Rows already in the output file are kept (a run adds rows); ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from _common import machine

from client_app.app import app as client_app
from fedspallm_strategy.config import NodeConfig, RunConfig
from fedspallm_strategy.config.run_config import RECOVERY_WINDOWS
from fedspallm_strategy.strategies.recovery_rounds import recover_centrally
from llm_pruning.models import load_model
from llm_pruning.recovery import DEFAULT_LR as RECOVERY_DEFAULT_LR
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid
from server_app.report import Evaluator

ROOT = Path(__file__).resolve().parents[1]
OTHER_TEXT = ROOT.parent / "shared" / "data" / "austen" / "persuasion.txt"

# Recovery that also learns from the dense model (half the loss), beside plain recovery.
DISTILL = {"recovery-distill": 0.5}
# Row -> run-config overrides (recovery rows add the recovery keys).
ROWS = {
    "central-sparsegpt": {"strategy": "centralized"},
    "central-lsq": {"strategy": "centralized", "reconstruction": "lsq"},
    "central-lsq-recovery": {"strategy": "centralized", "reconstruction": "lsq", "recover": 1},
    "fed-global": {"calibration": "global"},
    "fed-global-lsq": {"calibration": "global", "reconstruction": "lsq"},
    "fed-global-lsq-recovery": {"calibration": "global", "reconstruction": "lsq", "recover": 1},
    "fed-global-lsq-recovery-distill": {
        "calibration": "global",
        "reconstruction": "lsq",
        "recover": 1,
        **DISTILL,
    },
    "exact-lsq": {"strategy": "exact", "reconstruction": "lsq"},
    "central-recovery": {"strategy": "centralized", "recover": 1},  # recovery's upper bound
    "central-recovery-distill": {"strategy": "centralized", "recover": 1, **DISTILL},
    "fed-local-recovery": {"recover": 1},  # the default mode, then recovery
    "fed-local-recovery-distill": {"recover": 1, **DISTILL},
    # The same, with each member's own model scored, pruned and after its own recovery.
    "fed-local-recovery-members": {"recover": 1, "standalone-eval": True},
}
CLIENTS = 2
CALIB_SAMPLES = 8  # per client: what every file measured before --calib-samples used
# Flags added after the first files were measured, with their defaults: a file that does not
# record one was measured at its default, and a recorded command names one only where it differs.
LATER_FLAGS = {
    "recovery_windows": "same",
    "calib_samples": CALIB_SAMPLES,
    "seed": 0,
    "clients_dir": None,
    "domain_text": "python-docs",
    "other_text": str(OTHER_TEXT),
}


def run_config(args, overrides: dict, output_dir: str) -> RunConfig:
    values = {
        "model": args.model,
        "pattern": "unstructured" if ":" not in args.pattern else args.pattern,
        "sparsity": 0.5 if ":" in args.pattern else float(args.pattern),
        "eval-data": f"{args.domain_text},{args.other_text}",
        "eval-windows": args.eval_windows,
        "seqlen": args.seqlen,
        "calib-samples": args.calib_samples,
        "standalone-eval": False,
        "output-dir": output_dir,
        "recovery-steps": args.recovery_steps,
        "recovery-lr": args.recovery_lr,
        "recovery-samples": args.recovery_samples,
        "recovery-windows": args.recovery_windows,
        "recovery-method": args.recovery_method,
        "recovery-distill": 0.0,  # the rows that distil say so
        "seed": args.seed,  # the calibration windows and recovery batches drawn
    }
    values.update({k: v for k, v in overrides.items() if k != "recover"})
    if overrides.get("recover"):
        values["recovery-rounds"] = args.recovery_rounds
    return RunConfig.from_mapping(values)


def node_configs(args) -> dict[int, dict]:
    """Each organisation's Flower node config: a python-docs partition, or (``--clients-dir``)
    one text of that folder, every text but the held-out ``--domain-text``."""
    if args.clients_dir is None:
        return {
            n: {"partition-id": n - 1, "num-partitions": CLIENTS} for n in range(1, CLIENTS + 1)
        }
    held_out = Path(args.domain_text).resolve()
    texts = sorted(p for p in args.clients_dir.glob("*.txt") if p.resolve() != held_out)
    if len(texts) < 2:
        raise SystemExit(
            f"--clients-dir {args.clients_dir}: fewer than 2 texts besides the held-out"
        )
    return {n: {"data-path": str(path)} for n, path in enumerate(texts, 1)}


def federated_row(args, name: str) -> dict:
    nodes = node_configs(args)
    with tempfile.TemporaryDirectory() as folder:
        config = run_config(args, ROWS[name], folder)
        start = time.perf_counter()
        run_dir = run_federation(InProcessGrid(client_app, nodes, {}), config, run_id=1)
        report = json.loads((run_dir / "report.json").read_text())
    communication = report.get("communication", {})
    return {
        "run-config": config.as_dict(),
        "clients": len(nodes),
        "perplexity": report["perplexity"],
        "recovery": report.get("recovery"),
        "sparsity": report["sparsity"]["overall"],
        "bytes-up-per-client": max(communication.get("bytes_up", {"-": 0}).values()),
        "bytes-down-per-client": max(communication.get("bytes_down", {"-": 0}).values()),
        "dense-fp16-bytes": communication.get("dense_fp16_bytes_all_layers"),
        "rounds": len(communication.get("per_round", {})),
        "wall-seconds": round(time.perf_counter() - start, 1),
        "timings": report.get("timings"),
    }


def dense_rows(args) -> dict:
    """dense, and dense fine-tuned as centralized recovery would train it."""
    config = run_config(args, {"strategy": "centralized", "recover": 1}, "runs")
    model, tokenizer = load_model(config.model, dtype=config.torch_dtype, lazy=True)
    evaluate = Evaluator(config, tokenizer)
    rows = {"dense": {"perplexity": {"dense": evaluate(model, "dense")}}}
    nodes = {n: NodeConfig.from_mapping(values) for n, values in node_configs(args).items()}
    start = time.perf_counter()
    trained = recover_centrally(model, config, tokenizer, nodes)
    rows["dense-ft"] = {
        "run-config": config.as_dict(),
        "perplexity": {"dense-ft": evaluate(model, "dense fine-tuned")},
        "recovery": trained,
        "wall-seconds": round(time.perf_counter() - start, 1),
    }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="0.7", help="a sparsity (0.5, 0.7) or N:M (2:4)")
    parser.add_argument("--rows", default=",".join(["dense", *ROWS]))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--clients-dir",
        type=Path,
        default=None,
        help="one organisation per .txt file of this folder, all but --domain-text "
        "(default: two organisations with python-docs shards)",
    )
    parser.add_argument(
        "--domain-text", default="python-docs", help="held-out text of the clients' domain"
    )
    parser.add_argument("--other-text", default=str(OTHER_TEXT), help="a text of another domain")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument(
        "--calib-samples",
        type=int,
        default=CALIB_SAMPLES,
        help="calibration windows per client (the run config's calib-samples)",
    )
    parser.add_argument("--recovery-rounds", type=int, default=2)
    parser.add_argument("--recovery-steps", type=int, default=RunConfig.recovery_steps)
    parser.add_argument(
        "--recovery-lr",
        type=lambda text: text if text == "auto" else float(text),
        default=RunConfig.recovery_lr,
        help="a number, or auto: the method's own (recorded as that number)",
    )
    parser.add_argument("--recovery-samples", type=int, default=RunConfig.recovery_samples)
    parser.add_argument(
        "--recovery-method", default=RunConfig.recovery_method, choices=RECOVERY_DEFAULT_LR
    )
    parser.add_argument(
        "--recovery-windows",
        default="same",
        choices=RECOVERY_WINDOWS,
        help="same: every round on the same windows (what a recorded command without this "
        "flag ran); fresh: each round on its own, the run config's default",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="another draw of calibration and recovery windows"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--tag", default="", help="ends the file's name: another file for other settings"
    )
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    if args.recovery_lr == "auto":
        args.recovery_lr = RECOVERY_DEFAULT_LR[args.recovery_method]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    tag = f"_{args.tag}" if args.tag else ""
    path = args.out / f"beyond_centralized_{args.pattern.replace(':', 'of')}{tag}.json"
    saved = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    rows = saved.get("rows", {})
    commands = saved.get("commands", [])
    # Rows of one file share every setting but --rows: a row measured otherwise is not comparable.
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings = {k: v for k, v in settings.items() if k not in ("rows", "out", "tag", "fresh")}
    recorded = {**LATER_FLAGS, **saved.get("args", {})}
    if saved and {k: v for k, v in recorded.items() if k != "rows"} != settings:
        parser.error(f"{path} was measured with other settings ({saved['args']}); use --fresh")
    command = _command(args)
    if command not in commands:
        commands.append(command)
    for name in args.rows.split(","):
        if name in rows:
            continue
        if name in ("dense", "dense-ft"):
            rows.update(dense_rows(args))
        elif name in ROWS:
            rows[name] = federated_row(args, name)
        else:
            parser.error(f"unknown row {name!r}; rows: dense, dense-ft, {', '.join(ROWS)}")
        print(json.dumps({name: rows[name]["perplexity"]}), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "measured": time.strftime("%Y-%m-%d"),
                    "args": {**settings, "rows": ",".join(rows)},
                    "commands": commands,
                    "rows": rows,
                },
                indent=1,
                default=dict,
            )
        )


def _command(args) -> str:
    return (
        f"python bench/beyond_centralized.py --pattern {args.pattern} --rows {args.rows} "
        f"--recovery-rounds {args.recovery_rounds} --recovery-steps {args.recovery_steps} "
        f"--recovery-lr {args.recovery_lr} --recovery-samples {args.recovery_samples} "
        f"--recovery-method {args.recovery_method}"
        + "".join(
            f" --{name.replace('_', '-')} {value}"
            for name, default in LATER_FLAGS.items()
            if (value := getattr(args, name)) != default
        )
        + (f" --tag {args.tag}" if args.tag else "")
    )


if __name__ == "__main__":
    main()
