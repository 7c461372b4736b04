"""Benchmark local (single-party) pruning of a real model on Jane Austen: quality, time, memory.

Calibrates on random windows of the Austen novels other than ``persuasion.txt`` (one pooled,
seeded draw, the same for every pruner), prunes every decoder layer with each pruner at 50 %
unstructured and 2:4, and measures perplexity on ``persuasion.txt`` (non-overlapping windows).
Each configuration runs in a fresh process, so its peak RSS (``resource.getrusage``) is its own.
Prints a markdown table.

Usage::

    python bench/prune_local.py                                  # smollm2-135m, 32 x 512 tokens
    python bench/prune_local.py --segments 16 --eval-windows 8   # quicker
    python bench/prune_local.py --data /path/to/austen --pruners sparsegpt --patterns 2:4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere

from llm_pruning.data import eval_tokens, load_documents, sample_segments, tokenize  # noqa: E402
from llm_pruning.engine import prune_model  # noqa: E402
from llm_pruning.evaluate import perplexity, sparsity_report  # noqa: E402
from llm_pruning.models import load_model  # noqa: E402
from llm_pruning.pruners import SparsityPattern, get_pruner  # noqa: E402

MIB = 2**20
STAGES = ("capture", "statistics", "prune", "forward")  # PruneResult.timings fields


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec for load_model")
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO / ".." / "shared" / "data" / "austen",
        help="directory of .txt novels (default: ../shared/data/austen from the repo root)",
    )
    parser.add_argument("--eval-file", default="persuasion.txt", help="held-out novel in --data")
    parser.add_argument("--segments", type=int, default=32, help="calibration segments")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per segment and window")
    parser.add_argument("--eval-windows", type=int, default=16, help="perplexity windows")
    parser.add_argument("--pruners", nargs="+", default=["sparsegpt", "wanda", "magnitude"])
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--sparsity", type=float, default=0.5, help="for unstructured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024) / MIB  # Linux reports KiB


def calibration_files(args: argparse.Namespace) -> list[Path]:
    files = sorted(p for p in args.data.glob("*.txt") if p.name != args.eval_file)
    if not files:
        raise SystemExit(f"no calibration .txt files in {args.data} (besides {args.eval_file})")
    return files


def run_one(args: argparse.Namespace, pruner_name: str | None, pattern_name: str) -> dict:
    """One configuration in this (fresh) process; ``pruner_name=None`` is the dense model."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    row = {"pruner": pruner_name or "dense", "pattern": pattern_name if pruner_name else "-"}
    if pruner_name is not None:
        documents = [doc for path in calibration_files(args) for doc in load_documents(str(path))]
        rng = np.random.default_rng(args.seed)
        segments = sample_segments(tokenize(documents, tokenizer), args.seqlen, args.segments, rng)
        sparsity = args.sparsity if pattern_name == "unstructured" else None
        if sparsity is None:  # N:M implies its sparsity
            n, m = (int(part) for part in pattern_name.split(":"))
            sparsity = 1 - n / m
        pattern = SparsityPattern.parse(pattern_name, sparsity)
        result = prune_model(model, segments, get_pruner(pruner_name), pattern, progress=False)
        row.update(result.timings.as_dict())
    row["sparsity"] = sparsity_report(model)["overall"]
    held_out = eval_tokens(str(args.data / args.eval_file), tokenizer)
    start = time.perf_counter()
    row["ppl"] = perplexity(model, held_out, seqlen=args.seqlen, max_windows=args.eval_windows)
    row["eval"] = time.perf_counter() - start
    row["rss"] = peak_rss_mib()
    return row


def format_table(rows: list[dict]) -> str:
    header = (
        "| pruner | pattern | sparsity | ppl | capture s | statistics s | prune s | forward s "
        "| eval s | peak RSS MiB |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        cells = [row["pruner"], row["pattern"], f"{row['sparsity']:.3f}", f"{row['ppl']:.2f}"]
        cells += [f"{row[key]:.1f}" if key in row else "-" for key in STAGES]
        cells += [f"{row['eval']:.1f}", f"{row['rss']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.data = args.data.resolve()
    files = calibration_files(args)
    if not (args.data / args.eval_file).is_file():
        raise SystemExit(f"evaluation file not found: {args.data / args.eval_file}")
    load_model(args.model)  # convert once here, not in every worker
    configs = [(None, "-")] + [(p, pat) for p in args.pruners for pat in args.patterns]
    print(
        f"model {args.model}; calibration: {args.segments} x {args.seqlen} tokens from "
        f"{', '.join(p.name for p in files)}; evaluation: {args.eval_file}, "
        f"{args.eval_windows} windows x {args.seqlen}; torch threads "
        f"{args.threads or torch.get_num_threads()}",
        flush=True,
    )
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for pruner_name, pattern_name in configs:
        # A fresh process per configuration: peak RSS is per configuration, not cumulative.
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            rows.append(pool.submit(run_one, args, pruner_name, pattern_name).result())
        row = rows[-1]
        print(f"  done: {row['pruner']} {row['pattern']}: ppl {row['ppl']:.2f}", flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
