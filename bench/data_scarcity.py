"""When does federation pay off? A data-scarcity sweep on SmolLM2-135M.

The five Austen novels other than `persuasion.txt` are laid end to end and cut into K
contiguous stretches, one per client, so clients hold different books (K = 4) or different
parts of one book (K = 16). Each client calibrates on S segments of its own stretch. For every
(K, S) the sweep runs, through the real strategies and ClientApp on the in-process Grid:

- standalone: each client prunes the whole model alone (mean perplexity over the clients);
- fedspallm: the same replies merged with l0 aggregation and mask expansion;
- exact: pooled statistics, pruned once per layer on the server;
- centralized: pruning on the union of the clients' segments (what exact must equal).

    python bench/data_scarcity.py                          # K = 4, 16; S = 2, 4, 8 (hours on CPU)
    python bench/data_scarcity.py --clients 4 --segments 2,8 --resume

Writes bench/results/data_scarcity.{md,json} after every (K, S), so a long sweep keeps what it
finished; --resume skips the cells already in the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from compare_strategies import MemoClient, MemoEvaluator

from client_app.app import app as client_app
from fedspallm_strategy.config import RunConfig
from llm_pruning.models import load_model
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HELD_OUT = "persuasion.txt"


def client_texts(data: Path, clients: int, folder: Path) -> list[Path]:
    """The novels end to end, cut at paragraph breaks into ``clients`` stretches of equal length."""
    novels = sorted(p for p in data.glob("*.txt") if p.name != HELD_OUT)
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in novels)
    cuts = [0]
    for k in range(1, clients):
        target = round(k * len(text) / clients)
        cut = text.find("\n\n", target)
        cuts.append(cut if cut != -1 else target)
    cuts.append(len(text))
    paths = []
    for k, (start, end) in enumerate(zip(cuts, cuts[1:], strict=False)):
        path = folder / f"client-{k:02d}.txt"
        path.write_text(text[start:end].strip() + "\n", encoding="utf-8")
        paths.append(path)
    return paths


# Rows of a cell: run-config overrides of each strategy compared (fedspallm also gives the
# dense, centralized and standalone numbers).
ROWS = {
    "fedspallm": {"strategy": "fedspallm", "resolve": False, "compare-centralized": True},
    "exact": {"strategy": "exact"},
    "resolve": {"strategy": "fedspallm", "resolve": True},
    "global": {"strategy": "fedspallm", "calibration": "global", "resolve": False},
    "global-resolve": {"strategy": "fedspallm", "calibration": "global", "resolve": True},
    "resolve-hessian": {
        "strategy": "fedspallm",
        "resolve": True,
        "resolve-weighting": "hessian-diagonal",
    },
    "global-resolve-unpipelined": {
        "strategy": "fedspallm",
        "calibration": "global",
        "resolve": True,
        "resolve-pipelined": False,
    },
}
RUN_IDS = itertools.count(1000)


def run_cell(args, clients, segments, evaluator, scratch: Path, done: dict, save) -> dict:
    """One (K, S) cell: perplexity, bytes, rounds and seconds of every row (``done`` kept);
    ``save(row)`` is called after every row."""
    folder = scratch / f"k{clients}"
    folder.mkdir(exist_ok=True)
    nodes = {
        k + 1: {"data-path": str(path)}
        for k, path in enumerate(client_texts(args.data, clients, folder))
    }
    base = {
        "model": args.model,
        "pruner": args.pruner,
        "sparsity": args.sparsity,
        "calib-samples": segments,
        "seqlen": args.seqlen,
        "eval-data": str(args.data / HELD_OUT),
        "eval-windows": args.eval_windows,
        "output-dir": str(scratch / "runs"),
        "seed": args.seed,
    }
    memo, row = MemoClient(), dict(done)
    first = str(args.data / HELD_OUT)  # the perplexity reported per eval source
    for name in args.rows.split(","):
        if name in row:
            continue  # --resume: this row of the cell is finished
        extra = ROWS[name]
        config = RunConfig.from_mapping({**base, **extra})
        # Layer-wise rounds keep state on the clients per run id: no memo, a fresh id each.
        client = client_app if config.layerwise else memo
        start = time.perf_counter()
        run_dir = run_federation(
            InProcessGrid(client, nodes, {}), config, run_id=next(RUN_IDS), evaluator=evaluator
        )
        report = json.loads((run_dir / "report.json").read_text())
        perplexity = report["perplexity"]
        row[name] = perplexity["global"][first]
        if name == "fedspallm":
            row["dense"] = perplexity["dense"][first]
            row["centralized"] = perplexity["centralized"][first]
            row["standalone-mean"] = perplexity["standalone"]["mean"][first]
            row["standalone-best"] = min(
                scores[first] for scores in perplexity["standalone"]["per_client"].values()
            )
        communication = report["communication"]
        row[f"{name}-bytes-up-per-client"] = communication["total_up"] / clients
        row[f"{name}-bytes-down-per-client"] = communication["total_down"] / clients
        row[f"{name}-rounds"] = rounds_of(report)
        row[f"{name}-seconds"] = round(time.perf_counter() - start, 1)
        logging.info("K=%d S=%d %s: %.2f", clients, segments, name, row[name])
        save(row)
    return row


def rounds_of(report: dict) -> int:
    """Rounds the run took: exact and layer-wise runs plan theirs; one-shot takes num-rounds."""
    for section in ("exact", "layerwise"):
        if section in report:
            return report[section]["rounds"]
    return report["config"]["num-rounds"]


def markdown(results: dict) -> str:
    """One table per cell: a line per row, against the standalone mean and centralized."""
    lines = [f"Perplexity on {HELD_OUT} (lower is better); SparseGPT, 512-token segments", ""]
    for cell, row in sorted(results.items(), key=lambda item: tuple(map(int, item[0].split("x")))):
        clients, segments = cell.split("x")
        mean, central = row.get("standalone-mean"), row.get("centralized")
        lines += [
            f"**{clients} clients x {segments} segments**: standalone mean {_num(mean)}, "
            f"best {_num(row.get('standalone-best'))}, centralized {_num(central)}",
            "",
            "| row | perplexity | vs standalone mean | vs centralized | rounds | "
            "MB up / client | MB down / client | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in ROWS:
            if name not in row:
                continue
            value = row[name]
            lines.append(
                f"| {name} | {value:.1f} | {_ratio(value, mean)} | {_ratio(value, central)} | "
                f"{row.get(f'{name}-rounds', '–')} | "
                f"{row.get(f'{name}-bytes-up-per-client', 0) / 1e6:.1f} | "
                f"{row.get(f'{name}-bytes-down-per-client', 0) / 1e6:.2f} | "
                f"{row.get(f'{name}-seconds', '–')} |"
            )
        lines.append("")
    return "\n".join(lines)


def _num(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _ratio(value: float, reference: float | None) -> str:
    return "–" if reference is None else f"{value / reference - 1:+.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "austen")
    parser.add_argument("--clients", default="4,16")
    parser.add_argument("--segments", default="2,4,8")
    parser.add_argument("--pruner", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--resume", action="store_true", help="keep rows already in the JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fedspallm_strategy").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    saved = args.out / "data_scarcity.json"
    results = json.loads(saved.read_text())["results"] if args.resume and saved.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    probe = RunConfig.from_mapping(
        {
            "model": args.model,
            "seqlen": args.seqlen,
            "eval-data": str(args.data / HELD_OUT),
            "eval-windows": args.eval_windows,
        }
    )
    evaluator = MemoEvaluator(probe, load_model(args.model)[1])
    settings = vars(args) | {"data": str(args.data), "out": str(args.out)}
    with tempfile.TemporaryDirectory() as scratch:
        for clients in map(int, args.clients.split(",")):
            for segments in map(int, args.segments.split(",")):
                cell = f"{clients}x{segments}"

                def save(row, cell=cell):
                    results[cell] = row
                    saved.write_text(json.dumps({"args": settings, "results": results}, indent=1))
                    (args.out / "data_scarcity.md").write_text(markdown(results) + "\n")

                done = results.get(cell, {})
                save(run_cell(args, clients, segments, evaluator, Path(scratch), done, save))
    print(markdown(results))


if __name__ == "__main__":
    main()
