"""Strategy ``exact`` with and without secure aggregation: perplexity, bytes, wall time.

Both runs go through ``server_app.federation.run_federation`` on ``InProcessGrid`` (the same
ServerApp, strategy, ClientApp handlers and Flower SecAgg+ workflow/mod as ``flwr run``, in
one process), with the same clients, shards and evaluation windows. The table gives each
run's perplexity, the relative change, what one client uploads (plain: float32 statistics;
secure: Flower's masked int64 vectors), the federation's wall time, and how the two models
compare (identical tensors, mask agreement, largest weight difference).

With ``--recovery-rounds N`` both runs then recover for N rounds (the run config's other
recovery settings): plain replies carry int8 changes, secure ones masked int64 changes. The
table adds the perplexity before recovery and what one client uploads in the recovery rounds.

    python bench/secure_exact.py      # SmolLM2-135M, 2 clients x 4 x 256 tokens, SparseGPT 50 %
    python bench/secure_exact.py --clients 3 --model tiny-llama --seqlen 64
    python bench/secure_exact.py --recovery-rounds 1 --threads 2
    python bench/secure_exact.py --recovery-rounds 1 --threads 2 --max-payload-mb 128 \
        --out bench/results/secure_exact_parts.json

Writes bench/results/secure_exact.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

from client_app.app import app as client_app  # noqa: E402
from fedspallm_strategy.config import RunConfig  # noqa: E402
from llm_pruning.families import num_layers, prunable_weights  # noqa: E402
from llm_pruning.models import load_model  # noqa: E402
from server_app.federation import run_federation  # noqa: E402
from server_app.inprocess import InProcessGrid  # noqa: E402
from server_app.report import Evaluator  # noqa: E402


def one_run(settings: dict, clients: int, secure: bool, evaluator: Evaluator, run_id: int):
    config = RunConfig.from_mapping({**settings, "secure-aggregation": secure})
    grid = InProcessGrid.simulation(client_app, clients, {}, run_id=run_id)
    start = time.perf_counter()
    run_dir = run_federation(grid, config, run_id=run_id, evaluator=evaluator)
    wall = time.perf_counter() - start
    report = json.loads((run_dir / "report.json").read_text())
    model, _ = load_model(str(run_dir / "model"))
    return report, wall, model


def recovery_columns(report: dict) -> dict:
    """The perplexity before recovery, what one client uploaded in the recovery rounds, and
    their wall time."""
    per_round = report["communication"]["per_round"]
    rounds = [str(entry["round"]) for entry in report["recovery"]["per-round"]]
    up = [sum(per_round[r]["bytes_up"].values()) / len(per_round[r]["bytes_up"]) for r in rounds]
    return {
        "perplexity_before_recovery": report["perplexity"]["global-before-recovery"],
        "recovery_bytes_up_per_client": sum(up),
        "recovery_clients": [entry["clients"] for entry in report["recovery"]["per-round"]],
        # SecAgg+ workflows per secure round (plain rounds have none)
        "recovery_parts": [entry.get("parts", 0) for entry in report["recovery"]["per-round"]],
        "recovery_s": report["timings"]["recovery"],
        "recovery_settings": {
            key: report["recovery"][key] for key in ("method", "steps", "lr", "samples")
        },
    }


def compare(first, second) -> dict:
    """Identical prunable tensors?, mask agreement, largest |difference| of the weights."""
    a, b = dict(first.named_parameters()), dict(second.named_parameters())
    same, total, agree, worst = True, 0, 0, 0.0
    for layer in range(num_layers(first)):
        for name in prunable_weights(first, layer):
            x, y = a[name].data, b[name].data
            same &= torch.equal(x, y)
            total += x.numel()
            agree += int(((x != 0) == (y != 0)).sum())
            worst = max(worst, float((x - y).abs().max()))
    return {"identical": same, "mask_agreement": agree / total, "max_abs_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--pruner", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recovery-rounds", type=int, default=0)
    # the run config's: also the most masked upload of one secure recovery part
    parser.add_argument("--max-payload-mb", type=float, default=2048.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/secure_exact.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()

    with tempfile.TemporaryDirectory() as tmp:
        settings = {
            "model": args.model,
            "strategy": "exact",
            "pruner": args.pruner,
            "sparsity": args.sparsity,
            "calib-samples": args.calib_samples,
            "seqlen": args.seqlen,
            "eval-windows": args.eval_windows,
            "min-clients": args.clients,
            "max-stats-mb": 4096.0,  # masked digits: 6x the float32 statistics
            "recovery-rounds": args.recovery_rounds,
            "max-payload-mb": args.max_payload_mb,
            "output-dir": tmp,
        }
        _, tokenizer = load_model(args.model)
        evaluator = Evaluator(RunConfig.from_mapping(settings), tokenizer)
        rows, models = {}, {}
        for run_id, (label, secure) in enumerate((("plain", False), ("secure", True)), 1):
            report, wall, models[label] = one_run(settings, args.clients, secure, evaluator, run_id)
            up = report["communication"]["bytes_up"]
            rows[label] = {
                "perplexity": report["perplexity"]["global"],
                "dense_perplexity": report["perplexity"]["dense"],
                "bytes_up_per_client": max(up.values()),
                "federation_s": report["timings"]["federation"],
                "run_s": round(wall, 1),
            }
            if args.recovery_rounds:
                rows[label].update(recovery_columns(report))
    models_compared = compare(models["plain"], models["secure"])
    source = next(iter(rows["plain"]["perplexity"]))
    plain, secure = rows["plain"]["perplexity"][source], rows["secure"]["perplexity"][source]
    change = (secure - plain) / plain

    print(
        f"{args.model}, {args.clients} clients x {args.calib_samples} x {args.seqlen} tokens, "
        f"{args.pruner} {args.sparsity:.0%}, perplexity on {source} ({args.eval_windows} windows)"
    )
    print("| run | perplexity | change | MB up per client | federation s |")
    print("|---|---|---|---|---|")
    for label, row in rows.items():
        ppl = row["perplexity"][source]
        delta = "–" if label == "plain" else f"{change:+.3%}"
        print(
            f"| exact, {label} | {ppl:.4f} | {delta} | {row['bytes_up_per_client'] / 1e6:.1f} | "
            f"{row['federation_s']:.1f} |"
        )
        if args.recovery_rounds:
            print(
                f"  before recovery {row['perplexity_before_recovery'][source]:.4f}; recovery "
                f"{row['recovery_bytes_up_per_client'] / 1e6:.1f} MB up per client, "
                f"{row['recovery_s']:.1f} s"
            )
    print(
        f"models: identical={models_compared['identical']}, mask agreement "
        f"{models_compared['mask_agreement']:.6%}, largest weight difference "
        f"{models_compared['max_abs_difference']:.3g}"
    )
    write_results(
        args.out,
        info=info,
        args=args,
        skip=("out",),
        measured=time.strftime("%Y-%m-%d"),
        runs=rows,
        relative_change=change,
        models=models_compared,
    )


if __name__ == "__main__":
    main()
