"""Quality of every strategy on SmolLM2-135M with one Austen novel per client.

Runs the real strategies and ClientApp through the in-process Grid (the code path of
`flwr run`, without Ray), so every number comes from what a user would run. Client replies
are memoised per (node, request): strategies that ask for the same pruning reuse it, and
perplexities are memoised per model weights, so dense and standalone models are scored once.

    python bench/compare_strategies.py                      # full table (hours on 2 CPU cores)
    python bench/compare_strategies.py --sparsities 0.5 --pruners sparsegpt --segments 4 \\
        --seqlen 256 --eval-windows 8                      # a quick column
    python bench/compare_strategies.py --sparsities 0.6,0.7,0.8 --pruners sparsegpt \\
        --profiles uniform,owl                             # OWL next to uniform sparsity

Writes bench/results/compare_strategies.{md,json,png}; with ``--profiles``, instead one table
of ``--profile-strategies`` x profile per sparsity, in compare_strategies_profiles.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from _common import add_quality_arguments
from flwr.app import Message

from client_app.app import app as client_app
from fedspallm_strategy.config import RunConfig
from llm_pruning.families import num_layers
from llm_pruning.lazy import layer_tensors
from llm_pruning.pruners import get_pruner
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid
from server_app.report import Evaluator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


class MemoClient:
    """Calls the real ClientApp once per (node, request) and replays the reply after."""

    def __init__(self):
        self.replies: dict[tuple, Message] = {}

    def __call__(self, message: Message, context) -> Message:
        # Everything the message asks: its configs and (layer-wise rounds) the arrays it carries.
        content = message.content
        digest = hashlib.sha1()
        for name in sorted(content.array_records):
            for array in content.array_records[name].values():
                digest.update(array.data)
        configs = {name: dict(record) for name, record in sorted(content.config_records.items())}
        node = tuple(sorted(context.node_config.items()))
        key = (node, message.metadata.message_type, repr(configs), digest.hexdigest())
        if key not in self.replies:
            self.replies[key] = client_app(message, context)
        reply = self.replies[key]
        if reply.has_error():
            return Message(reply.error, reply_to=message)
        return Message(reply.content, reply_to=message)


class MemoEvaluator(Evaluator):
    """Scores each distinct set of weights once (dense and standalone models recur)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.memo: dict[str, dict] = {}

    def __call__(self, model, label):
        # A lazily loaded model's unloaded layers are meta tensors here: read them from disk.
        tensors = {n: t for n, t in model.state_dict().items() if t.device.type != "meta"}
        for layer in range(num_layers(model)):
            tensors.update(layer_tensors(model, layer))
        digest = hashlib.sha1()
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
        key = digest.hexdigest()
        if key not in self.memo:
            self.memo[key] = super().__call__(model, label)
        return self.memo[key]


def pattern_and_sparsity(column: str) -> tuple[str, float]:
    return (column, 0.5) if ":" in column else ("unstructured", float(column))


def run_column(
    args,
    pruner: str,
    column: str,
    memo: MemoClient,
    evaluators: dict,
    out: Path,
    rows: dict,
    on_row=lambda rows: None,
) -> dict:
    """Run every strategy whose row ``rows`` (a column finished earlier, or ``{}``) lacks;
    ``on_row(rows)`` after each, so a long column keeps what it finished."""
    base, every_layer = column_settings(args, pruner, column, out)
    num_layers = {"tiny-llama": 4, "tiny-opt": 4}.get(args.model, 30)
    fractions = [0.3, 0.5, 0.7, 1.0, 1.0][: len(every_layer)]
    sampled = {
        node: {**cfg, "layer-budget": max(1, round(f * num_layers))}
        for (node, cfg), f in zip(every_layer.items(), fractions, strict=True)
    }
    rows = dict(rows)
    plans = [
        ("fedspallm", every_layer, {"compare-centralized": True}),
        ("fedavg", every_layer, {}),
        ("fedprllm", every_layer, {}),
        ("fedspallm-sampled", sampled, {}),
    ][: 3 if args.skip_sampled else 4]
    if get_pruner(pruner).updates_weights:  # the layer-wise rows (re-solve needs SparseGPT)
        plans += [
            (name, sampled if "sampled" in name else every_layer, LAYERWISE_ROWS[name])
            for name in args.layerwise_rows.split(",")
            if name
        ]
    for name, nodes, extra in plans:
        if name in rows:
            continue  # --resume: this row of the column is finished
        strategy = name.split("-")[0]
        config = RunConfig.from_mapping({**base, "strategy": strategy, **extra})
        start = time.perf_counter()
        # Layer-wise rounds keep state on the clients per run id: no memo, a fresh id each.
        client = client_app if config.layerwise else memo
        report = run_report(config, client, nodes, evaluators)
        seconds = time.perf_counter() - start
        perplexity = report["perplexity"]
        rows[name] = perplexity["global"]
        communication = report["communication"]
        rows[f"{name}-cost"] = {
            "bytes-up-per-client": communication["total_up"] / len(nodes),
            "bytes-down-per-client": communication["total_down"] / len(nodes),
            "rounds": report.get("layerwise", {}).get("rounds", config.num_rounds),
            "seconds": round(seconds, 1),
        }
        if name == "fedspallm":
            rows["dense"] = perplexity["dense"]
            rows["centralized"] = perplexity["centralized"]
            rows["standalone-mean"] = perplexity["standalone"]["mean"]
            for node, scores in perplexity["standalone"]["per_client"].items():
                rows[f"standalone-{Path(nodes[int(node)]['data-path']).stem}"] = scores
            rows["bytes-up-per-client"] = report["communication"]["total_up"] / len(nodes)
            rows["dense-fp16-bytes"] = report["communication"]["dense_fp16_bytes_all_layers"]
        logging.info("%s %s %s: %s (%.0fs)", pruner, column, name, rows[name], seconds)
        on_row(rows)
    return rows


def column_settings(args, pruner: str, column: str, out: Path) -> tuple[dict, dict]:
    """The run config every row of a column shares, and the nodes (one novel each)."""
    pattern, sparsity = pattern_and_sparsity(column)
    novels = sorted(p for p in args.data.glob("*.txt") if p.name != "persuasion.txt")
    eval_data = ",".join(str(p) for p in [args.data / "persuasion.txt", *args.extra_eval])
    base = {
        "model": args.model,
        "pruner": pruner,
        "pattern": pattern,
        "sparsity": sparsity,
        "calib-samples": args.segments,
        "seqlen": args.seqlen,
        "eval-data": eval_data,
        "eval-windows": args.eval_windows,
        "output-dir": str(out),
        "seed": args.seed,
        "resolve": False,  # the paper's rows; the layer-wise rows turn it on
    }
    every_layer = {i + 1: {"data-path": str(novel)} for i, novel in enumerate(novels)}
    return base, every_layer


def run_report(config: RunConfig, client, nodes: dict, evaluators: dict) -> dict:
    """One in-process run of ``config`` over ``nodes``; its report."""
    key = (config.seqlen, config.eval_data, config.eval_windows)
    if key not in evaluators:
        from llm_pruning.models import load_model

        evaluators[key] = MemoEvaluator(config, load_model(config.model)[1])
    run_dir = run_federation(
        InProcessGrid(client, nodes, {}),
        config,
        run_id=next(RUN_IDS),
        evaluator=evaluators[key],
    )
    return json.loads((run_dir / "report.json").read_text())


def profile_column(args, pruner: str, column: str, evaluators: dict, out: Path) -> dict:
    """``--profiles``: each of ``--profile-strategies`` under each sparsity profile.

    fedspallm runs as by default (the masked re-solve, where the pruner updates weights).
    Every reply is computed afresh (the profile changes what the clients prune)."""
    base, nodes = column_settings(args, pruner, column, out)
    rows: dict = {}
    for strategy, profile in itertools.product(
        args.profile_strategies.split(","), args.profiles.split(",")
    ):
        resolve = strategy == "fedspallm" and get_pruner(pruner).updates_weights
        settings = {
            **base,
            "strategy": strategy,
            "sparsity-profile": profile,
            "owl-m": args.owl_m,
            "owl-lambda": args.owl_lambda,
            "resolve": resolve,
            "standalone-eval": False,
        }
        start = time.perf_counter()
        report = run_report(RunConfig.from_mapping(settings), client_app, nodes, evaluators)
        perplexity = report["perplexity"]
        rows["dense"] = perplexity["dense"]
        name = f"{strategy} {profile}"
        rows[name] = perplexity.get("global", perplexity.get("centralized"))
        rows[f"{name}-overall-sparsity"] = report["sparsity"]["overall"]
        if "sparsity-profile" in report:
            layers = report["sparsity-profile"]["per-layer"]
            rows[f"{name}-layers"] = [row["sparsity"] for row in layers]
        logging.info(
            "%s %s %s: %s (%.0fs)", pruner, column, name, rows[name], time.perf_counter() - start
        )
    return rows


def profile_markdown(results: dict, first_eval: str) -> str:
    """One table: a row per strategy and profile, a column per pruner and sparsity."""
    columns = list(results)
    names = ["dense"] + [
        n for n in results[columns[0]] if n != "dense" and not n.endswith(("-sparsity", "-layers"))
    ]
    title = (
        f"Perplexity on {first_eval} (lower is better); overall sparsity equals the target in "
        "every owl row (same number of zeros as uniform)"
    )
    return "\n".join(
        perplexity_table(results, columns, names, first_eval, title, "strategy, profile")
    )


def perplexity_table(
    results: dict, columns: list, names: list, first_eval: str, title: str, header: str
) -> list[str]:
    """A markdown table: a row per name, a column per column, "–" where a row did not run."""
    lines = [
        title,
        "",
        f"| {header} | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        cells = [
            f"{results[c][name][first_eval]:.1f}" if name in results[c] else "–" for c in columns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def profile_sweep(args, first_eval: str) -> None:
    results, evaluators = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for pruner in args.pruners.split(","):
            for column in args.sparsities.split(","):
                results[f"{pruner} {column}"] = profile_column(
                    args, pruner, column, evaluators, Path(scratch)
                )
                table = profile_markdown(results, first_eval).replace(first_eval, "persuasion.txt")
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "compare_strategies_profiles.md").write_text(table + "\n")
                settings = vars(args) | {
                    "data": str(args.data),
                    "out": str(args.out),
                    "extra_eval": [str(p) for p in args.extra_eval],
                }
                (args.out / "compare_strategies_profiles.json").write_text(
                    json.dumps({"args": settings, "results": results}, indent=1)
                )
    print(table)


# Layer-wise FedSpaLLM rows (layerwise.py): run-config overrides of each.
LAYERWISE_ROWS = {
    "fedspallm-resolve": {"resolve": True},
    "fedspallm-global": {"calibration": "global", "resolve": False},
    "fedspallm-global-resolve": {"calibration": "global", "resolve": True},
    "fedspallm-sampled-global-resolve": {"calibration": "global", "resolve": True},
}
RUN_IDS = itertools.count(2000)
ROW_ORDER = [
    "dense",
    "centralized",
    "fedspallm",
    *LAYERWISE_ROWS,
    "fedspallm-sampled",
    "standalone-mean",
]
TAIL_ROWS = ["fedavg", "fedprllm"]


def ordered_columns(results: dict) -> list[str]:
    """SparseGPT before Wanda; unstructured by rising sparsity, then N:M."""

    def key(column: str) -> tuple:
        pruner, pattern = column.split(" ")
        return (pruner, ":" in pattern, pattern)

    return sorted(results, key=key)


def ordered_rows(results: dict) -> list[str]:
    """Dense and the federated results first, each client's standalone model, the baselines."""
    present = {
        n for rows in results.values() for n in rows if "bytes" not in n and "-cost" not in n
    }
    clients = sorted(n for n in present if n.startswith("standalone-") and n not in ROW_ORDER)
    return [n for n in [*ROW_ORDER, *clients, *TAIL_ROWS] if n in present]


def markdown(results: dict, first_eval: str) -> str:
    columns = ordered_columns(results)
    names = ordered_rows(results)
    title = f"Perplexity on {first_eval} (lower is better)"
    lines = perplexity_table(results, columns, names, first_eval, title, "model")
    lines += [
        "",
        "Cost per row: rounds, MB up / down per client, wall seconds (in-process, 2 CPU cores)",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        if not any(f"{name}-cost" in results[c] for c in columns):
            continue
        cells = []
        for column in columns:
            cost = results[column].get(f"{name}-cost")
            cells.append(
                "–"
                if cost is None
                else f"{cost['rounds']} / {cost['bytes-up-per-client'] / 1e6:.0f} / "
                f"{cost['bytes-down-per-client'] / 1e6:.1f} / {cost['seconds']:.0f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, first_eval: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    columns = [c for c in ordered_columns(results) if ":" not in c.split(" ")[1]]
    for pruner in sorted({c.split(" ")[0] for c in columns}):
        mine = [c for c in columns if c.startswith(pruner)]
        x = [float(c.split(" ")[1]) for c in mine]
        for name in (
            "centralized",
            "fedspallm",
            "fedspallm-resolve",
            "fedspallm-global-resolve",
            "standalone-mean",
            "fedprllm",
            "fedavg",
        ):
            points = [
                (v, results[c][name][first_eval])
                for v, c in zip(x, mine, strict=True)
                if name in results[c]
            ]
            if not points:
                continue
            axis.plot(
                [v for v, _ in points],
                [p for _, p in points],
                marker="o",
                label=f"{pruner} {name}",
            )
    axis.set_yscale("log")
    axis.set_xlabel("sparsity")
    axis.set_ylabel(f"perplexity on {Path(first_eval).name}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "austen")
    parser.add_argument(
        "--extra-eval", type=Path, nargs="*", default=[], help="more held-out texts"
    )
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,2:4")
    parser.add_argument("--pruners", default="sparsegpt,wanda")
    add_quality_arguments(parser, RESULTS)
    parser.add_argument(
        "--skip-sampled", action="store_true", help="leave out the unequal-budget row (faster)"
    )
    parser.add_argument(
        "--layerwise-rows",
        default=",".join(LAYERWISE_ROWS),
        help=f"comma-separated, of {', '.join(LAYERWISE_ROWS)} (SparseGPT columns only)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the columns already in --out's JSON"
    )
    parser.add_argument(
        "--profiles",
        default="",
        help="comma-separated sparsity profiles (uniform,owl): run --profile-strategies under "
        "each instead of the strategy table",
    )
    parser.add_argument("--profile-strategies", default="centralized,fedspallm,exact")
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fedspallm_strategy").setLevel(logging.WARNING)

    first_eval = str(args.data / "persuasion.txt")
    if args.profiles:
        profile_sweep(args, first_eval)
        return
    saved = args.out / "compare_strategies.json"
    results = json.loads(saved.read_text())["results"] if args.resume and saved.exists() else {}
    memo, evaluators = MemoClient(), {}
    with tempfile.TemporaryDirectory() as scratch:
        for pruner in args.pruners.split(","):
            for column in args.sparsities.split(","):
                key = f"{pruner} {column}"
                done = results.get(key, {})

                def keep(rows, key=key):  # a long sweep keeps every row it finished
                    results[key] = dict(rows)
                    save(results, args, first_eval)

                run_column(args, pruner, column, memo, evaluators, Path(scratch), done, keep)
                memo.replies.clear()  # replies of another pruning spec are never reused
    save(results, args, first_eval)
    print(markdown(results, first_eval).replace(first_eval, "persuasion.txt"))


def save(results: dict, args, first_eval: str) -> None:
    """Write the table, the JSON and the plot of every column finished so far."""
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, first_eval).replace(first_eval, "persuasion.txt")
    (args.out / "compare_strategies.md").write_text(table + "\n")
    settings = vars(args) | {
        "data": str(args.data),
        "out": str(args.out),
        "extra_eval": [str(p) for p in args.extra_eval],
    }
    (args.out / "compare_strategies.json").write_text(
        json.dumps({"args": settings, "results": results}, indent=1)
    )
    plot(results, first_eval, args.out / "compare_strategies.png")


if __name__ == "__main__":
    main()
