"""Write docs/results.md (and docs/results_gpu.md) from the benchmark results in
bench/results/*.json.

    python bench/results_page.py            # (re)write both pages
    python bench/results_page.py --check    # exit 1 if a page is not what it would write

Each page has its machine's results: ``PAGES`` lists them with their sections.

The page has one environment header, built from what the result files record (their
``machine`` and ``measured`` fields), then one section per file in ``SECTIONS``: a sentence
on what it measures, its tables, and the commands that wrote the file (listed here, or the
file's own ``commands`` record where the bench keeps one). Every command's
``--flag value`` pairs are checked against the ``args`` the file recorded, and every JSON in
bench/results/ must be either in ``SECTIONS`` or in ``EXCLUDED`` (with the reason as a
comment), so a new result is never left off silently and the page cannot go stale unnoticed
(tests/test_results_page.py). A missing field raises ``ResultError`` naming the file.

Standard library only, and nothing from the project: the page builds without torch.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "results.md"
GENERATOR = "python bench/results_page.py"

# Result files that are not on the page (reasons for developers; the page never lists them).
EXCLUDED = frozenset(
    {
        # Perplexities scored on the first `eval-windows` windows of the text (measured
        # 2026-11-23 to 2026-12-01, before the evenly spaced windows); re-run to include.
        "compare_strategies.json",
        # Same: first-windows perplexities (the 4x2/4x4/4x8 sweep and the layer-wise rows).
        "data_scarcity.json",
        # Same: first-windows perplexities (eval_windows 16); also records no run date.
        "poisoning.json",
        # Same: first-windows perplexities on python-docs, 3 clients, and torch ran with
        # 1 thread where the header's runs use 2.
        "secure_exact_3clients.json",
        # The lsq solver against SparseGPT on single matrices on the CPU; its GPU run at 7B
        # shapes is on the GPU page, and the end-to-end cost is in the beyond_centralized rows.
        "lsq_speed.json",
        # The default mode's server in one process with its synthesised clients, measured before
        # every role returned freed memory to the system; the scale page's default-mode runs
        # (a process per role) replace it. Re-run to include.
        "server_memory.json",
    }
)


class ResultError(ValueError):
    """A result file that the page cannot be built from; the message names the file."""


def _where(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


class Result:
    """One bench/results/*.json, with field access that names the file when a field is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = _where(path)
        try:
            self.data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ResultError(f"{self.where}: cannot be read as JSON ({error})") from error
        if not isinstance(self.data, dict):
            raise ResultError(f"{self.where}: not a JSON object")

    def error(self, message: str) -> ResultError:
        return ResultError(f"{self.where}: {message}")

    def get(self, *keys: str | int):
        value = self.data
        for depth, key in enumerate(keys):
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                name = ".".join(str(k) for k in keys[: depth + 1])
                raise self.error(f"missing required field {name!r}") from None
        return value

    def num(self, *keys: str | int) -> float:
        value = self.get(*keys)
        if isinstance(value, bool) or not isinstance(value, int | float):
            name = ".".join(str(k) for k in keys)
            raise self.error(f"field {name!r} is not a number: {value!r}")
        return value

    def arg(self, name: str):
        return self.get("args", name)


# ---------------------------------------------------------------- formatting


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def f1(x: float) -> str:
    return f"{x:.1f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


PRUNERS = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude"}
MODELS = {"smollm2-135m": "SmolLM2-135M"}


def sparsity_label(value: str | float) -> str:
    """0.7 -> 70 %; an N:M pattern stays as it is."""
    text = str(value)
    if ":" in text:
        return text
    return f"{float(text) * 100:g} %"


def shape_label(text: str) -> str:
    return text.replace("x", " × ")


def completed(r: Result, run: dict, where: str) -> None:
    if run.get("status", "finished:completed") != "finished:completed":
        raise r.error(f"{where} did not complete (status {run.get('status')!r})")


# ---------------------------------------------------------------- sections


def profiles_section(r: Result) -> list[str]:
    data = r.arg("data")
    first_eval = f"{data}/persuasion.txt"
    strategies = r.arg("profile_strategies").split(",")
    profiles = r.arg("profiles").split(",")
    results = r.get("results")
    columns = list(results)
    if not columns:
        raise r.error("missing required field 'results' (no columns)")
    seqlen = r.arg("seqlen")

    def ppl(column: str, row: str) -> str:
        return f1(r.num("results", column, row, first_eval))

    header = ["strategy, profile"] + [
        f"{PRUNERS.get(c.split()[0], c.split()[0])} {sparsity_label(c.split()[1])}" for c in columns
    ]
    rows = [["dense"] + [ppl(c, "dense") for c in columns]]
    rows += [
        [f"{s}, {p}"] + [ppl(c, f"{s} {p}") for c in columns] for s in strategies for p in profiles
    ]
    overall = []
    for c in columns:
        shares = {
            round(r.num("results", c, f"{s} {p}-overall-sparsity"), 6)
            for s in strategies
            for p in profiles
        }
        if len(shares) == 1:
            overall.append(f"{shares.pop():.6f} at {sparsity_label(c.split()[1])}")
    requested = [
        f"{p} {s}" for p in r.arg("pruners").split(",") for s in r.arg("sparsities").split(",")
    ]
    missing = [c for c in requested if c not in results]
    notes = []
    if overall:
        notes.append(
            "Every row of a column prunes the same number of weights (overall sparsity "
            + ", ".join(overall)
            + ")."
        )
    if missing:
        notes.append(
            "The results file holds no column for "
            + ", ".join(
                f"{PRUNERS.get(c.split()[0], c.split()[0])} {sparsity_label(c.split()[1])}"
                for c in missing
            )
            + "."
        )
    return [
        f"Perplexity (lower is better) on Jane Austen's *Persuasion* ({r.arg('eval_windows')} "
        f"windows of {seqlen} tokens spread evenly over the text) of `{r.arg('model')}` pruned "
        f"by {', '.join(f'`{s}`' for s in strategies)} under a uniform and an OWL sparsity "
        f"profile (OWL M = {r.num('args', 'owl_m'):g}, λ = {r.num('args', 'owl_lambda'):g}), "
        f"with one client for each of the other Austen novels, {r.arg('segments')} × {seqlen} "
        "calibration tokens each.",
        table(header, rows),
        " ".join(notes),
    ]


def parallel_section(r: Result) -> list[str]:
    clients = r.num("args", "clients")
    cores = r.num("machine", "cpus_usable")
    rows = []
    for i, run in enumerate(r.get("rows")):
        completed(r, run, f"rows[{i}]")
        cpus = r.num("rows", i, "client_cpus")
        per_client = sorted(
            r.num("rows", i, "perplexity", "standalone", "per_client", node, "python-docs")
            for node in r.get("rows", i, "perplexity", "standalone", "per_client")
        )
        rows.append(
            [
                str(cpus),
                str(int(min(clients, max(1, cores // cpus)))),
                f1(r.num("rows", i, "wall_s")),
                f1(r.num("rows", i, "report_timings", "federation")),
                f2(r.num("rows", i, "perplexity", "dense", "python-docs")),
                " / ".join(f2(x) for x in per_client),
                f2(r.num("rows", i, "perplexity", "standalone", "mean", "python-docs")),
                f2(r.num("rows", i, "perplexity", "global", "python-docs")),
            ]
        )
    header = [
        "`client-resources-num-cpus`",
        "clients at once",
        "wall s",
        "federation stage s",
        "dense ppl",
        "each client alone, ppl",
        "clients' mean ppl",
        "global ppl",
    ]
    return [
        f"Wall time and held-out `python-docs` perplexity of the app's default job on "
        f"`{r.arg('model')}` with {clients:g} simulated clients, run by `flwr run .` on an "
        "already running local SuperLink, once per `client-resources-num-cpus` value: each "
        "ClientApp gets that many CPUs and torch threads, and Ray runs as many at once as the "
        "cores allow.",
        table(header, rows),
    ]


def reference_section(r: Result) -> list[str]:
    pattern = r.arg("pattern")
    scheme = (
        f"{sparsity_label(r.num('args', 'sparsity'))} unstructured"
        if pattern == "unstructured"
        else pattern
    )
    layers = int(r.num("args", "layers"))

    def total_row(label: str, *base: str) -> list[str]:
        count = range(len(r.get(*base)))
        ours = sum(r.num(*base, i, "ours_min_s") for i in count)
        ref = sum(r.num(*base, i, "ref_min_s") for i in count)
        ours_err = sum(r.num(*base, i, "ours_err") for i in count)
        ref_err = sum(r.num(*base, i, "ref_err") for i in count)
        ratios = [r.num(*base, i, "err_ratio") for i in count]
        return [
            label,
            f"{ours:.3f}",
            f"{ref:.3f}",
            f"**{ref / ours:.2f}×**",
            f"{ours_err / ref_err:.4f} (per matrix {min(ratios):.4f}–{max(ratios):.4f})",
        ]

    n_model = len(r.get("results", "sparsegpt", "matrices"))
    model_rows = ("results", "sparsegpt", "matrices")
    rows = [total_row(f"`{r.arg('model')}` layers 0–{layers - 1}, {n_model} matrices", *model_rows)]
    shapes = r.get("shapes")
    for i in range(len(shapes)):
        ours, ref = r.num("shapes", i, "ours_min_s"), r.num("shapes", i, "ref_min_s")
        rows.append(
            [
                shape_label(r.get("shapes", i, "matrix")),
                f"{ours:.3f}",
                f"{ref:.3f}",
                f"{ref / ours:.2f}×",
                f"{r.num('shapes', i, 'err_ratio'):.4f}",
            ]
        )
    if shapes:
        rows.append(total_row(f"the {len(shapes)} random shapes together", "shapes"))
    header = ["matrices", "ours s", "reference s", "reference / ours", "error, ours / reference"]
    return [
        f"Seconds to prune with this project's SparseGPT and with the reference "
        "`SparseGPT.fasterprune` (github.com/IST-DASLab/sparsegpt) on the same inputs and "
        f"Hessian, {scheme}, best of {r.arg('timing_repeats')} alternating runs per matrix: the "
        f"first {layers} decoder layers of `{r.arg('model')}` calibrated on "
        f"{r.arg('segments')} × {r.arg('seqlen')} `{r.arg('calib_data')}` tokens, and random "
        "matrices on one shared Hessian; the error is the reconstruction error "
        "‖WX − ŴX‖² on the calibration inputs.",
        table(header, rows),
    ]


def whole_client_section(r: Result) -> list[str]:
    rows = []
    for pruner in r.get("results"):
        timing = ("results", pruner, "timings")
        layers = r.num("results", pruner, "layers")
        total = r.num("results", pruner, "total_s")
        rows.append(
            [PRUNERS.get(pruner, pruner), f"{layers:g}"]
            + [f2(r.num(*timing, stage)) for stage in ("capture", "statistics", "prune", "forward")]
            + [f2(total), f2(total / layers)]
        )
    header = [
        "pruner",
        "layers",
        "capture s",
        "statistics s",
        "prune s",
        "forward s",
        "total s",
        "per layer s",
    ]
    pattern = r.arg("pattern")
    scheme = (
        f"{sparsity_label(r.num('args', 'sparsity'))} unstructured"
        if pattern == "unstructured"
        else pattern
    )
    return [
        f"Seconds per stage when one client prunes every decoder layer of `{r.arg('model')}` "
        f"layer by layer at {scheme}, calibrated on {r.arg('segments')} × {r.arg('seqlen')} "
        f"`{r.arg('calib_data')}` tokens: capturing the first layer's inputs, the statistics "
        "forward through each dense layer, pruning, and the forward through the pruned layer "
        "to the next.",
        table(header, rows),
    ]


def wire_memory_section(r: Result) -> list[str]:
    wire = r.get("results", "wire")
    if not wire:
        raise r.error("missing required field 'results.wire' (empty)")
    shared = {}
    for key in ("matrices", "numel", "dense_fp16_bytes", "model_dtype"):
        values = {json.dumps(r.get("results", "wire", i, key)) for i in range(len(wire))}
        if len(values) != 1:
            raise r.error(f"results.wire rows disagree on {key!r}")
        shared[key] = r.get("results", "wire", 0, key)
    dtype = shared["model_dtype"]
    dense = shared["dense_fp16_bytes"]
    rows = []
    for i in range(len(wire)):
        values = r.get("results", "wire", i, "values")
        native = r.num("results", "wire", i, "payload_model_dtype_bytes")
        half = r.num("results", "wire", i, "payload_fp16_bytes")
        rows.append(
            [
                PRUNERS.get(r.get("results", "wire", i, "pruner"), "?"),
                sparsity_label(r.get("results", "wire", i, "sparsity")),
                "kept values + mask" if values else "mask only",
                mb(native),
                mb(half),
                f"{native / dense:.3f}× / {half / dense:.3f}×",
                f"{r.num('results', 'wire', i, 'down_bytes_all_layers'):g}",
            ]
        )
    wire_header = [
        "pruner",
        "sparsity",
        "payload",
        f"up MB, {dtype} values",
        "up MB, fp16 values",
        f"vs dense fp16 ({dtype} / fp16)",
        "down bytes",
    ]
    blocks = [
        f"Bytes one client sends up after pruning all {shared['matrices']} prunable matrices "
        f"({shared['numel'] / 1e6:.1f} M weights) of `{r.arg('model')}`, against the same "
        f"matrices dense in fp16 ({mb(dense)} MB), and the bytes the server sends down for all "
        "layers (MB = 10⁶ bytes).",
        table(wire_header, rows),
    ]
    server = r.get("results", "server")
    if server:
        server_rows = [
            [
                f"{r.num('results', 'server', i, 'clients'):g}",
                f"{r.num('results', 'server', i, 'layers'):g}",
                gib(r.num("results", "server", i, "baseline_rss")),
                gib(r.num("results", "server", i, "peak_rss")),
            ]
            for i in range(len(server))
        ]
        blocks += [
            "Peak RSS (`VmHWM`) of a server process that merges the replies of K clients "
            f"(SparseGPT-sized, {sparsity_label(r.arg('server_sparsity'))}) for every layer of "
            f"`{r.arg('model')}` through the strategy's aggregation, the replies streamed one "
            "at a time (GiB = 2³⁰ bytes).",
            table(["clients K", "layers", "RSS before the round GiB", "peak RSS GiB"], server_rows),
        ]
    return blocks


def client_memory_section(r: Result) -> list[str]:
    base = ("results", "client")
    threads = r.num("args", "threads") or r.num("machine", "torch_threads")
    row = [
        f"{r.num(*base, 'layers'):g}",
        f"{r.num(*base, 'metrics', 'tokens'):g}",
        f"{threads:g}",
        f1(r.num(*base, "seconds")),
        mb(r.num(*base, "payload_bytes")),
        gib(r.num(*base, "peak_rss")),
    ]
    header = ["layers", "calibration tokens", "torch threads", "s", "payload MB", "peak RSS GiB"]
    return [
        "Peak RSS (`VmHWM`, whole process) of one client process that prunes "
        f"{r.num(*base, 'layers'):g} decoder layers of `{r.arg('model')}` with SparseGPT on "
        f"{r.arg('client_segments')} × {r.arg('client_seqlen')} `python-docs` tokens "
        "(GiB = 2³⁰ bytes, MB = 10⁶ bytes).",
        table(header, [row]),
    ]


def secure_section(r: Result) -> list[str]:
    """Plain and secure ``exact``, then their recovery rounds: perplexity, bytes up, time."""
    runs = r.get("runs")
    text = next(iter(r.get("runs", "plain", "perplexity")))
    rounds = r.arg("recovery_rounds")
    rows = []
    for label in ("plain", "secure"):
        run = runs[label]
        rows.append(
            [
                f"`exact`, {label}",
                f2(r.num("runs", label, "perplexity_before_recovery", text)),
                f2(r.num("runs", label, "perplexity", text)),
                mb(run["bytes_up_per_client"] - run["recovery_bytes_up_per_client"]),
                mb(run["recovery_bytes_up_per_client"]),
                f1(run["federation_s"]),
                f1(run["recovery_s"]),
            ]
        )
    header = [
        "run",
        "ppl, pruned",
        f"ppl, after {rounds} recovery round{'s' if rounds > 1 else ''}",
        "up MB per client, pruning",
        "up MB per client, recovery",
        "pruning s",
        "recovery s",
    ]
    models = r.get("models")
    recovery = r.get("runs", "secure", "recovery_settings")
    pruned = {label: runs[label]["perplexity_before_recovery"][text] for label in runs}
    parts = runs["secure"].get("recovery_parts", [1])  # files before parts: one workflow
    in_parts = (
        f" Each secure recovery round went in {parts[0]} parts of at most "
        f"{r.get('args').get('max_payload_mb', 2048):g} MiB of masked upload, one SecAgg+ "
        "workflow each."
        if max(parts) > 1
        else ""
    )
    same = (
        f"score the same perplexity, {f2(pruned['plain'])}"
        if pruned["plain"] == pruned["secure"]
        else f"score {f2(pruned['plain'])} and {f2(pruned['secure'])}"
    )
    return [
        f"{MODELS.get(r.arg('model'), r.arg('model'))} at {sparsity_label(r.arg('sparsity'))} "
        f"with {PRUNERS[r.arg('pruner')]}, strategy `exact` with and without "
        "`secure-aggregation`, "
        f"{r.arg('clients')} clients with {r.arg('calib_samples')} calibration windows of "
        f"{r.arg('seqlen')} tokens each, then recovery: `{recovery['method']}`, "
        f"{recovery['steps']} steps at lr {recovery['lr']:g} on {recovery['samples']} windows "
        f"per client and round. Perplexity on the held-out python-docs topics, "
        f"{r.arg('eval_windows')} windows. Up: plain runs send float32 statistics and int8 "
        "changes, secure runs Flower's masked int64 vectors (three per statistic, one per kept "
        "weight's change).",
        table(header, rows),
        f"Pruned, the two models {same}. After recovery they keep the same masks "
        f"({models['mask_agreement']:.4%} of entries agree), and their largest weight "
        f"difference is {models['max_abs_difference']:.2g}: plain replies carry each change as "
        "int8, secure ones within one step of Flower's grid." + in_parts,
    ]


def recovery_memory_section(r: Result) -> list[str]:
    rows = []
    for i, row in enumerate(r.get("rows")):
        cap = row["allocator_cap_bytes"]
        fits = r.get("rows", i, "fits")
        rows.append(
            [
                str(r.get("rows", i, "method")),
                str(r.get("rows", i, "dtype")),
                f"{r.num('rows', i, 'seqlen'):g} × {r.num('rows', i, 'batch'):g}",
                str(r.get("rows", i, "activations")),
                gib(cap) if cap else "the whole card",
                "yes" if fits else "**no** (out of memory)",
                gib(r.num("rows", i, "peak_allocated_bytes")),
                gib(r.num("rows", i, "peak_reserved_bytes")),
                "yes" if r.get("rows", i, "zero_set_unchanged") else "**no**",
                f1(r.num("rows", i, "seconds")),
            ]
        )
    header = [
        "method",
        "model dtype",
        "tokens a step (T × windows)",
        "activations",
        "allocator capped at GiB",
        "fits",
        "GPU peak allocated GiB",
        "GPU peak reserved GiB",
        "zeros unchanged",
        "s",
    ]
    return [
        "One client's recovery (`llm_pruning.recovery.recover`: the model moved to the GPU, "
        f"{r.arg('steps')} optimizer steps, the kept values' changes read back) on a "
        f"LLaMA-2-7B-shaped model (`{r.arg('model')}`'s shapes, 6.74e9 parameters, random "
        "weights, every prunable matrix 50 % pruned), held on the CPU before and after, as a "
        "client holds it. lora's `recomputed` rows cap the allocator where a 24 GB card's "
        "memory ends (less its CUDA context): they fit such a card. `s`: the whole call, "
        "moving the model both ways included. GiB = 2³⁰ bytes.",
        table(header, rows),
    ]


def lsq_gpu_section(r: Result) -> list[str]:
    rows = []
    for i, _ in enumerate(r.get("results")):
        base = ("results", i)
        rows.append(
            [
                shape_label(str(r.get(*base, "matrix"))),
                str(r.get(*base, "pattern")),
                f"{r.num(*base, 'sgpt_s'):.3f}",
                f"{r.num(*base, 'lsq_s'):.3f}",
                f"{r.num(*base, 'lsq_products'):g}",
                f"{r.num(*base, 'lsq_total_over_sgpt'):.1f}×",
                f"{r.num(*base, 'sgpt_err_ratio'):.3f}",
                f"{r.num(*base, 'lsq_err_ratio'):.4f}",
            ]
        )
    header = [
        "matrix (out × in)",
        "pattern",
        "SparseGPT s",
        "lsq s (after SparseGPT)",
        "matrix products",
        "SparseGPT + lsq against SparseGPT",
        "SparseGPT error",
        "lsq error",
    ]
    return [
        "`reconstruction='lsq'` against SparseGPT on LLaMA-7B's matrix shapes, on the GPU: "
        "random weights, a Hessian of "
        f"{r.arg('segments')} × {r.arg('seqlen')} synthetic activation rows with a power-law "
        "spectrum. lsq starts from SparseGPT's values under SparseGPT's mask. Errors are "
        "‖(W − W₀)X‖² over sampled rows, relative to a float64 direct solve of the same rows "
        "(1.0 is the optimum).",
        table(header, rows),
    ]


WAYS = {
    "inprocess": "in-process",
    "flwr_cold": "`flwr run .`, SuperLink started by the run",
    "flwr_warm": "`flwr run .`, SuperLink already running",
}


def overhead_section(r: Result) -> list[str]:
    rows = []
    for i, repeat in enumerate(r.get("rows")):
        base_wall = r.num("rows", i, "inprocess", "wall_s")
        base_timings = r.get("rows", i, "inprocess", "report_timings")
        base_in_run = sum(r.num("rows", i, "inprocess", "report_timings", k) for k in base_timings)
        for way, label in WAYS.items():
            if way not in repeat:
                continue
            completed(r, repeat[way], f"rows[{i}].{way}")
            wall = r.num("rows", i, way, "wall_s")
            timings = r.get("rows", i, way, "report_timings")
            in_run = sum(r.num("rows", i, way, "report_timings", k) for k in timings)
            flwr = way != "inprocess"
            rows.append(
                [
                    f"{r.num('rows', i, 'repeat'):g}",
                    label,
                    f1(wall),
                    f1(wall - base_wall) if flwr else "–",
                    f1(in_run),
                    f"{in_run / base_in_run:.2f}" if flwr else "1",
                    f1(r.num("rows", i, way, "report_timings", "federation")),
                ]
            )
    header = [
        "repeat",
        "way",
        "wall s",
        "wall − in-process wall s",
        "in-run s",
        "in-run / in-process in-run",
        "federation stage s",
    ]
    return [
        f"Wall time of one run plan (`{r.arg('model')}`, {r.arg('clients')} clients, "
        f"{r.arg('calib_samples')} × {r.arg('seqlen')} calibration tokens, "
        f"{r.arg('eval_windows')} evaluation windows) executed in-process (imports included) "
        "and by `flwr run .`; in-run is the sum of the run's own report timings (model load, "
        "evaluations and the federation stage).",
        table(header, rows),
    ]


ROLES = (("superlink", "SuperLink"), ("serverapp", "ServerApp"), ("clientapp", "ClientApp"))


def scale_section(r: Result, commands: tuple[str, ...]) -> list[str]:
    runs = r.get("rows")
    named = [v for command in commands for v in _flags(command).get("runs", [])]
    recorded = [r.get("rows", i, "run") for i in range(len(runs))]
    if sorted(named) != sorted(recorded):
        raise r.error(f"rows {recorded} are not the runs its commands name ({named})")
    rows, default_rows = [], []
    for i, run in enumerate(runs):
        completed(r, run, f"rows[{i}]")

        def role(name: str, i: int = i) -> str:
            roles = r.get("rows", i, "roles")
            return gb(r.num("rows", i, "roles", name, "peak_rss_bytes")) if name in roles else "–"

        start = [
            r.get("rows", i, "run"),
            r.get("rows", i, "model"),
            f"{r.num('rows', i, 'clients'):g}",
            f"{r.num('rows', i, 'wall_s'):.0f}",
            *(role(name) for name, _ in ROLES),
        ]
        if run.get("mode") == "default":
            default_rows.append(start + _default_run_cells(r, i, run))
            continue
        rows.append(
            [
                *start,
                role("supernode"),
                mb(r.num("rows", i, "largest_message_bytes")),
                mb(r.num("rows", i, "bytes_per_round_max")),
                f"{r.num('rows', i, 'rounds'):g}",
                f"{r.num('rows', i, 'rejected'):g}",
            ]
        )
    runs = [run for run in runs if run.get("mode") != "default"]
    header = (
        ["run", "model", "K", "wall s"]
        + [f"{title} GB" for _, title in ROLES]
        + ["SuperNode GB", "largest message MB", "bytes/round max MB", "rounds", "rejected"]
    )
    configs = [run["config"] for run in runs]
    pruners = sorted({str(c.get("pruner")) for c in configs})
    per_round = sorted({str(c.get("layers-per-round")) for c in configs})
    dtypes = sorted({str(c.get("dtype")) for c in configs})
    fractions = sorted(
        {(c["model"], c["layer-fraction"]) for c in configs if "layer-fraction" in c}
    )
    fraction_text = "".join(
        f"; on `{model}` each client prunes a {share:g} share of the layers"
        for model, share in fractions
    )
    sizes = r.get("message_sizes")
    size_rows = [
        [
            r.get("message_sizes", i, "model"),
            PRUNERS.get(r.get("message_sizes", i, "pruner"), "?"),
            mb(r.num("message_sizes", i, "layer")),
            mb(r.num("message_sizes", i, "model_all")),
        ]
        for i in range(len(sizes))
    ]
    fits = r.get("extrapolation")
    fit_rows = [
        [
            r.get("extrapolation", i, "role"),
            r.get("extrapolation", i, "way"),
            r.get("extrapolation", i, "mode"),
            f"{r.num('extrapolation', i, 'clients'):g}",
            f2(r.num("extrapolation", i, "measured_1b_gb")),
            f2(r.num("extrapolation", i, "measured_7b_gb")),
            f2(r.num("extrapolation", i, "extrapolated_70b_gb")),
        ]
        for i in range(len(fits))
    ]
    return [
        "Peak RSS (`VmHWM`) per process role, message sizes and wall time of real federations "
        "of the built-in `synthetic-1b` and `synthetic-7b` models (LLaMA-3.2-1B and LLaMA-2-7B "
        "shapes, seeded random weights): `flwr run .` in simulation (`sim`) or a loopback "
        "deployment with one SuperNode process per client (`deploy`), "
        f"`layers-per-round` {', '.join(per_round)}, `dtype` {', '.join(dtypes)}, pruner "
        f"{', '.join(pruners)}{fraction_text} (GB = 10⁹ bytes, MB = 10⁶ bytes; a role with "
        "several processes shows the largest).",
        table(header, rows),
        "The exact size of a valid reply, one layer and all layers in one reply, as the server "
        "enforces it (computed, not run).",
        table(
            ["model", "pruner", "one layer MB", "all layers in one reply MB"],
            size_rows,
        ),
        *_default_runs_text(default_rows),
        "Peak RSS per role fitted on the 1B and 7B runs above of the same way, mode and K as "
        "base + a × (bytes outside the decoder layers) + b × (bytes of one layer), with base "
        f"{gb(r.num('baseline_rss_bytes'))} GB (a process that only imported torch, "
        "transformers and flwr), and evaluated at LLaMA-2-70B's sizes (computed, not run).",
        table(["role", "way", "mode", "K", "1B GB", "7B GB", "70B GB (extrapolated)"], fit_rows),
    ]


def _default_run_cells(r: Result, i: int, run: dict) -> list[str]:
    """A default-mode run's cells after its role peaks: layers a round, rounds, bytes, state."""
    if not run.get("completed", True):
        return ["–", "–", "–", "stopped at the time limit: peaks so far"]
    return [
        f"{r.num('rows', i, 'layers_per_round'):g}",
        f"{r.num('rows', i, 'rounds'):g}",
        mb(r.num("rows", i, "bytes_up_total") / r.num("rows", i, "clients")),
        f"completed, {r.num('rows', i, 'rejected'):g} rejected",
    ]


def _default_runs_text(rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    header = ["run", "model", "K", "wall s"] + [f"{title} GB" for _, title in ROLES]
    header += ["layers a round", "rounds", "up per client MB", "outcome"]
    return [
        "The default mode (the run config's defaults: SparseGPT, the re-solve, int8 values, "
        "the layer group sized to `memory-budget-gb`; `dtype` bfloat16) in simulation. Its "
        "clients are SYNTHESISED: a ClientApp that answers every message with replies of the "
        "exact shape and size an honest SparseGPT client sends, made from the dense weights "
        "with seeded noise instead of calibration (`bench/synthetic_replies.py`), so the "
        "ClientApp column is that ClientApp's, not a pruning client's. The ServerApp column is "
        "the process that runs the real server (and, in simulation, Flower's message store).",
        table(header, rows),
    ]


# bench/beyond_centralized.py's rows, in the page's order, with their labels.
BEYOND_LABELS = {
    "dense": "dense",
    "dense-ft": "dense, fine-tuned with the recovery budget",
    "central-sparsegpt": "centralized SparseGPT",
    "central-recovery": "centralized SparseGPT",
    "central-recovery-distill": "centralized SparseGPT",
    "central-lsq": "centralized, `lsq`",
    "central-lsq-recovery": "centralized, `lsq`",
    "fed-global": "federated, global calibration + re-solve",
    "fed-global-lsq": "federated, global calibration + re-solve, `lsq`",
    "fed-global-lsq-recovery": "federated, global calibration + re-solve, `lsq`",
    "fed-global-lsq-recovery-distill": "federated, global calibration + re-solve, `lsq`",
    "exact-lsq": "`exact`, `lsq`",
    "fed-local-recovery": "federated, the default mode",
    "fed-local-recovery-distill": "federated, the default mode",
    "fed-local-recovery-members": "federated, the default mode",
}
# A row that is another row's run with the members' own models scored too.
_MEMBERS_SUFFIX = "-members"


def _beyond_model(r: Result, name: str) -> tuple[dict, dict | None]:
    """A row's model's perplexities, and its perplexities before recovery (None without)."""
    scores = r.get("rows", name, "perplexity")
    models = [
        k for k in scores if k not in ("dense", "standalone") and not k.endswith("-before-recovery")
    ]
    if name == "dense":
        models = ["dense"]
    if len(models) != 1:
        raise r.error(f"rows.{name}.perplexity: expected one model besides dense, got {models}")
    return scores[models[0]], scores.get(f"{models[0]}-before-recovery")


def _member_lines(r: Result, name: str, line) -> list[list[str]]:
    """The mean of the members' own models, pruned and after their own recovery, where the
    row's run scored them (``standalone-eval``)."""
    members = r.get("rows", name, "perplexity").get("standalone")
    if not members:
        return []
    lines = [
        line(f"each member alone (mean of {len(members['per_client'])})", members["mean"], {}, "–")
    ]
    after = members.get("after-recovery")
    if after:
        settings = r.get("rows", name, "run-config")
        steps = settings["recovery-rounds"] * settings["recovery-steps"]
        count = len(after["per_client"])
        label = f"each member alone + its own recovery, {steps} steps (mean of {count})"
        lines.append(line(label, after["mean"], {}, "–"))
    return lines


def beyond_section(r: Result) -> list[str]:
    texts = (_domain_text(r), r.arg("other_text"))
    present = r.get("rows")
    unknown = sorted(set(present) - set(BEYOND_LABELS))
    if unknown:
        raise r.error(f"rows {unknown} have no label on the page")
    bases = {
        base: _beyond_model(r, base)[0] if base in present else None
        for base in ("dense", "dense-ft", "central-sparsegpt")
    }

    def ratio(scores: dict, base: str, text: str) -> str:
        return f2(scores[text] / bases[base][text]) if bases[base] else "–"

    def line(
        label: str, scores: dict, run: dict, rounds: str, full_budget: bool = True
    ) -> list[str]:
        """``full_budget`` False: a recovery line after fewer rounds than the dense model's
        fine-tuning had steps for, so no ratio to it."""
        up, down = run.get("bytes-up-per-client"), run.get("bytes-down-per-client")
        wall = run.get("wall-seconds")
        return [
            label,
            *(f2(scores[text]) for text in texts),
            *(ratio(scores, "central-sparsegpt", text) for text in texts),
            ratio(scores, "dense", texts[0]),
            ratio(scores, "dense-ft", texts[0]) if full_budget else "–",
            mb(up) if up else "–",
            mb(down) if down else "–",
            rounds,
            f1(wall) if wall is not None else "–",
        ]

    rows = []
    shown = []  # every model's perplexities already a line: a pruned model shows once
    for name, label in BEYOND_LABELS.items():
        if name not in present:
            continue
        run = present[name]
        scores, before = _beyond_model(r, name)
        distill = (run.get("run-config") or {}).get("recovery-distill", 0)
        recovered = f"recovery, {distill:g} distilled" if distill else "recovery"
        rounds = str(run["rounds"]) if run.get("rounds") else "–"
        recovery = run.get("recovery") or {}
        same_run = name.removesuffix(_MEMBERS_SUFFIX)
        if same_run != name and same_run in present and _beyond_model(r, same_run)[0] == scores:
            # its federated lines are the row above's: only the members' lines are new
            rows += _member_lines(r, name, line)
            continue
        if before is None:
            rows.append(line(label, scores, run, rounds))
            shown.append(scores)
            continue
        if before not in shown:
            rows.append(line(f"{label}, before recovery", before, {}, "–"))
            shown.append(before)
        for entry in recovery.get("per-round", []):
            if "perplexity" in entry:
                done = entry["round"] - run["rounds"] + recovery["rounds"]
                last = done == recovery["rounds"]
                rows.append(
                    line(
                        f"{label} + {recovered}, {done} round{'s' if done > 1 else ''}",
                        entry["perplexity"],
                        run if last else {},
                        rounds if last else "–",
                        full_budget=last,
                    )
                )
        if "centralized" in recovery:
            rows.append(line(f"{label} + {recovered} on the pooled shards", scores, run, rounds))
        rows += _member_lines(r, name, line)
    header = [
        "model",
        "ppl, clients' domain",
        "ppl, other text",
        "÷ centralized SparseGPT, domain",
        "÷ centralized SparseGPT, other",
        "÷ dense, domain",
        "÷ dense fine-tuned, domain",
        "up MB per client",
        "down MB per client",
        "rounds",
        "wall s",
    ]
    pattern = r.arg("pattern")
    distilled = sorted(
        {
            d
            for run in present.values()
            if (d := (run.get("run-config") or {}).get("recovery-distill"))
        }
    )
    distill_note = (
        f' "Distilled {", ".join(f"{d:g}" for d in distilled)}": that share of the loss is '
        "cross-entropy to the dense model's top-32 next-token probabilities, the rest "
        "next-token NLL (`recovery-distill`); the dense model is fine-tuned with the NLL only."
        if distilled
        else ""
    )
    overfit_note = ""
    if (
        bases["dense"]
        and bases["dense-ft"]
        and bases["dense-ft"][texts[0]] > bases["dense"][texts[0]]
    ):
        overfit_note = (
            f" Fine-tuned with this budget the dense model scores worse on the clients' domain "
            f"than before ({f2(bases['dense-ft'][texts[0]])} against "
            f"{f2(bases['dense'][texts[0]])}): the steps overfit the pooled windows, so a "
            "ratio to it flatters the sparse model."
        )
    return [
        f"SmolLM2-135M at {sparsity_label(pattern)}"
        f"{'' if ':' in pattern else ' unstructured'}, {_organisations(r)}, "
        f"{_calibration_windows(r)} calibration windows of {r.arg('seqlen')} tokens "
        f"each. Perplexity on {_text_label(texts[0])} (the clients' domain) and on "
        f"{_text_label(texts[1])} (another domain), {r.arg('eval_windows')} windows of "
        f"{r.arg('seqlen')} tokens. Recovery: `{r.arg('recovery_method')}`, "
        f"{r.arg('recovery_steps')} steps of 4 windows per client and round at lr "
        f"{r.arg('recovery_lr'):g}, {r.arg('recovery_samples')} {_windows_rule(r)}; the dense "
        "model is fine-tuned on every client's windows pooled, with the steps of all the "
        "rounds (what centralized recovery does), so its gain is adaptation to the domain; "
        "a line after fewer rounds is not divided by it. "
        "Bytes and rounds are of the whole run, pruning included."
        + _draw_note(r)
        + distill_note
        + overfit_note,
        table(header, rows),
    ]


def _domain_text(r: Result) -> str:
    """The clients' domain's held-out text (python-docs before ``--domain-text`` existed)."""
    return r.get("args").get("domain_text", "python-docs")


def _text_label(text: str) -> str:
    if text == "python-docs":
        return "the held-out python-docs topics"
    return f"*{Path(text).stem.replace('_', ' ').title()}*"


def _organisations(r: Result) -> str:
    """Who prunes: two python-docs shards, or one text of ``--clients-dir`` each."""
    folder = r.get("args").get("clients_dir")
    if folder is None:
        return "two organisations with `python-docs` shards"
    counts = {run["clients"] for run in r.get("rows").values() if "clients" in run}
    if len(counts) != 1:
        raise r.error(f"rows of --clients-dir {folder} disagree on their clients: {counts}")
    return (
        f"{counts.pop()} organisations, each with one text of `{Path(folder).name}/` (all but "
        "the held-out one)"
    )


def _calibration_windows(r: Result) -> int:
    """Calibration windows per client (files before ``--calib-samples`` existed used 8)."""
    return r.get("args").get("calib_samples", 8)


def _windows_rule(r: Result) -> str:
    """Which recovery windows each round trains on (files before ``--recovery-windows``
    existed trained on the same ones)."""
    if r.get("args").get("recovery_windows", "same") == "fresh":
        return "new windows per client every round"
    return "windows per client, the same every round"


def _draw_note(r: Result) -> str:
    """Which calibration and recovery windows a file's runs drew (files before ``--seed``
    existed drew seed 0)."""
    seed = r.get("args").get("seed", 0)
    return f" Calibration and recovery windows of another draw (seed {seed})." if seed else ""


# The 70 % files that measure centralized SparseGPT and fed global + `lsq` on one machine,
# each with another draw of the calibration windows.
DRAWS = ("0.7_seed-0", "0.7_seed-1", "0.7_seed-2", "0.7_seed-3")


def _beyond_file(results_dir: Path, name: str) -> Result:
    return Result(results_dir / f"beyond_centralized_{name}.json")


def _ratios(r: Result, model: dict, base: dict) -> tuple[float, float]:
    """``model``'s perplexities over ``base``'s, on (the clients' domain, the other text)."""
    domain, other = _domain_text(r), r.arg("other_text")
    return model[domain] / base[domain], model[other] / base[other]


def _lsq_gain(r: Result) -> tuple[float, float]:
    """Fed global + `lsq` over centralized SparseGPT, on (domain, other)."""
    lsq, central = (_beyond_model(r, row)[0] for row in ("fed-global-lsq", "central-sparsegpt"))
    return _ratios(r, lsq, central)


def draws_note(results_dir: Path) -> str:
    """A table of the ratio fed global + `lsq` / centralized SparseGPT on each text, for each
    draw in :data:`DRAWS`, and their mean."""
    lines, ratios = [], []
    for name in DRAWS:
        r = _beyond_file(results_dir, name)
        texts = (_domain_text(r), r.arg("other_text"))
        central = _beyond_model(r, "central-sparsegpt")[0]
        federated = _beyond_model(r, "fed-global-lsq")[0]
        ratios.append(_lsq_gain(r))
        lines.append(
            [
                str(r.get("args").get("seed", 0)),
                *(f2(central[t]) for t in texts),
                *(f2(federated[t]) for t in texts),
                *(f2(x) for x in ratios[-1]),
            ]
        )
    means = [sum(ratio[i] for ratio in ratios) / len(ratios) for i in (0, 1)]
    lines.append(["mean", "", "", "", "", *(f2(x) for x in means)])
    other = Path(texts[1]).stem.title()
    header = [
        "seed",
        "centralized SparseGPT, domain",
        f"centralized SparseGPT, *{other}*",
        "fed global + `lsq`, domain",
        f"fed global + `lsq`, *{other}*",
        "÷, domain",
        f"÷, *{other}*",
    ]
    return (
        f"Over {len(DRAWS)} draws of the calibration windows, measured on one machine, "
        "federated global calibration + re-solve with `lsq`, divided by centralized SparseGPT "
        "on the same draw:\n\n" + table(header, lines)
    )


def calibration_note(results_dir: Path) -> str:
    """Centralized SparseGPT and fed global + `lsq` with 32 calibration windows per client,
    beside calibration draw 0 (the same seed, 8 windows)."""
    more = _beyond_file(results_dir, "0.7_calib-32")
    fewer = _beyond_file(results_dir, DRAWS[0])
    texts = (_domain_text(more), more.arg("other_text"))
    other = _text_label(texts[1])
    central, ratio = {}, {}
    for r in (more, fewer):
        n = _calibration_windows(r)
        central[n] = _beyond_model(r, "central-sparsegpt")[0]
        ratio[n] = _lsq_gain(r)
    (few, many) = sorted(central)
    return (
        f"With {many} calibration windows per client where calibration draw 0 (the same seed) "
        f"has {few}, centralized SparseGPT scores {f2(central[many][texts[0]])} on the clients' "
        f"domain and {f2(central[many][texts[1]])} on {other} (with {few}: "
        f"{f2(central[few][texts[0]])} and {f2(central[few][texts[1]])}). Federated global "
        f"calibration + re-solve with `lsq`, divided by it, is {f2(ratio[many][0])} on the "
        f"domain and {f2(ratio[many][1])} on {other} (with {few}: {f2(ratio[few][0])} and "
        f"{f2(ratio[few][1])}): more calibration text helps both pruners, and `lsq`'s lead "
        "stays where it was."
    )


def austen_note(results_dir: Path) -> str:
    """Which text ``lsq`` gains on when the organisations hold novels, not python-docs."""
    r = _beyond_file(results_dir, "0.7_austen")
    texts = (_domain_text(r), r.arg("other_text"))
    domain, other = (f2(x) for x in _lsq_gain(r))
    return (
        f"Here the organisations' texts are like {_text_label(texts[0])}, not like "
        f"{_text_label(texts[1])}. Federated global calibration + re-solve with `lsq` "
        f"is {domain} of centralized SparseGPT on the first and {other} on the second: as "
        "with python-docs organisations, `lsq`'s gain is on the calibration's kind of text."
    )


def learning_rate_note(results_dir: Path) -> str:
    """What the ratio to dense fine-tuned means at lr 0.0002, beside the 50 % file's lr 0.0001:
    the dense model's gain at each rate, and the federated model after each round."""
    faster = _beyond_file(results_dir, "0.5_lr-0.0002")
    slower = _beyond_file(results_dir, "0.5")
    text = "python-docs"
    dense = _beyond_model(faster, "dense")[0][text]
    tuned = {r.arg("recovery_lr"): _beyond_model(r, "dense-ft")[0][text] for r in (slower, faster)}
    rounds = faster.get("rows", "fed-global-lsq-recovery", "recovery", "per-round")
    after = [entry["perplexity"][text] for entry in rounds]
    (slow, slow_tuned), (fast, fast_tuned) = sorted(tuned.items())
    return (
        f"Fine-tuned with this budget at lr {fast:g} the dense model reaches {f2(fast_tuned)} "
        f"on the clients' domain, against {f2(slow_tuned)} at lr {slow:g} (the 50 % section): "
        "the ratio to it is lower here because the dense model gains less at this rate, not "
        f"because the sparse one gains more. The federated model is at {f2(after[0])} after "
        f"round 1, below the dense model's {f2(dense)}, and at {f2(after[-1])} after round "
        f"{len(after)}: every round trains on the same windows of each shard."
    )


# The 50 % bar-configuration files with fresh windows, one per recovery learning rate.
FRESH_RATES = ("0.5_fresh", "0.5_lr-0.0002-fresh", "0.5_lr-0.0004-fresh")


def fresh_rates_note(results_dir: Path) -> str:
    """The bar configuration after each recovery round, and the dense model fine-tuned, at
    each learning rate of :data:`FRESH_RATES`; and the ratio with each at its best rate."""
    lines, finals, tuned_all = [], [], []
    for name in FRESH_RATES:
        r = _beyond_file(results_dir, name)
        text = _domain_text(r)
        rounds = [_recovered(r, "fed-global-lsq-recovery", k)[text] for k in (1, 2)]
        tuned = _beyond_model(r, "dense-ft")[0][text]
        lines.append(
            [
                f"{r.arg('recovery_lr'):g}",
                *(f2(x) for x in rounds),
                f2(tuned),
                f2(rounds[1] / tuned),
            ]
        )
        finals.append(rounds[1])
        tuned_all.append(tuned)
    header = ["lr", "after round 1", "after round 2", "dense fine-tuned", "÷ dense fine-tuned"]
    return (
        "On the clients' domain, at each learning rate measured with new windows every round:"
        "\n\n"
        + table(header, lines)
        + f"\n\nEach model at its best rate: {f2(min(finals))} / {f2(min(tuned_all))} = "
        f"{f2(min(finals) / min(tuned_all))}. Other jobs shared the two cores while the lr 0.0004 "
        "run pruned, so its wall times are longer than the other sections'."
    )


def _anchor(title: str) -> str:
    """The link target GitHub gives a ``## title`` heading: lower case, punctuation dropped,
    spaces as hyphens."""
    kept = re.sub(r"[^\w\- ]", "", title.lower())
    return "#" + kept.replace(" ", "-")


def _beyond_link(name: str) -> str:
    """A link to the section of ``beyond_centralized_<name>.json``."""
    file = f"beyond_centralized_{name}.json"
    title = next(section.title for section in SECTIONS if section.file == file)
    return f"[{title.removeprefix(BEYOND_PREFIX)}]({_anchor(title)})"


def _recovered(r: Result, name: str, after: int) -> dict:
    """A recovery row's perplexities after ``after`` rounds."""
    recovery = r.get("rows", name, "recovery")
    first = r.get("rows", name, "rounds") - recovery["rounds"]
    return next(e["perplexity"] for e in recovery["per-round"] if e["round"] == first + after)


def beyond_summary(results_dir: Path) -> list[str]:
    """The ratios the sections below measure, each within one file (both models scored by
    one invocation), beside the section it comes from."""

    def joined(values: list[tuple[float, float]], i: int) -> str:
        return " / ".join(f2(v[i]) for v in values)

    rows = []
    draws = [_lsq_gain(_beyond_file(results_dir, name)) for name in DRAWS]
    spread = []
    for i in (0, 1):
        values = [ratio[i] for ratio in draws]
        mean = sum(values) / len(values)
        spread.append(f"{f2(mean)} ({f2(min(values))}–{f2(max(values))})")
    rows.append(
        [
            f"70 %, no fine-tuning: federated global calibration + re-solve with `lsq` ÷ "
            f"centralized SparseGPT (mean of {len(draws)} calibration draws, lowest–highest)",
            *spread,
            _beyond_link(DRAWS[-1]),
        ]
    )
    austen = _beyond_file(results_dir, "0.7_austen")
    rows.append(
        [
            "the same, organisations holding Austen's novels (their domain: "
            f"{_text_label(_domain_text(austen))})",
            *(f2(x) for x in _lsq_gain(austen)),
            _beyond_link("0.7_austen"),
        ]
    )
    exact = []
    for name in ("0.5", "0.7", "2of4"):
        r = _beyond_file(results_dir, name)
        exact.append(
            _ratios(r, _beyond_model(r, "exact-lsq")[0], _beyond_model(r, "central-lsq")[0])
        )
    rows.append(
        [
            "`exact` with `lsq` ÷ centralized `lsq`, at 50 % / 70 % / 2:4",
            joined(exact, 0),
            joined(exact, 1),
            ", ".join(_beyond_link(name) for name in ("0.5", "0.7", "2of4")),
        ]
    )
    fresh = _beyond_file(results_dir, "0.5_fresh")
    bar = "fed-global-lsq-recovery"
    recovered, before = _beyond_model(fresh, bar)
    rounds = fresh.arg("recovery_rounds")
    rows.append(
        [
            f"50 %, global calibration + re-solve with `lsq` and {rounds} rounds of recovery "
            "(recovery's default steps, windows and rate) ÷ the dense model",
            *(f2(x) for x in _ratios(fresh, recovered, _beyond_model(fresh, "dense")[0])),
            _beyond_link("0.5_fresh"),
        ]
    )
    rows.append(
        [
            "the same ÷ itself before recovery",
            *(f2(x) for x in _ratios(fresh, recovered, before)),
            _beyond_link("0.5_fresh"),
        ]
    )
    rows.append(
        [
            "the same ÷ centralized SparseGPT recovered on the pooled shards with the same budget",
            *(
                f2(x)
                for x in _ratios(fresh, recovered, _beyond_model(fresh, "central-recovery")[0])
            ),
            _beyond_link("0.5_fresh"),
        ]
    )
    tuned = []
    for name in FRESH_RATES:
        r = _beyond_file(results_dir, name)
        dense_ft = _beyond_model(r, "dense-ft")[0]
        tuned.append((r.arg("recovery_lr"), _ratios(r, _beyond_model(r, bar)[0], dense_ft)))
    rows.append(
        [
            "the same ÷ the dense model fine-tuned on the same windows with the same steps, at "
            + " / ".join(f"lr {lr:g}" for lr, _ in tuned),
            joined([ratio for _, ratio in tuned], 0),
            "–",
            ", ".join(_beyond_link(name) for name in FRESH_RATES),
        ]
    )
    for name, pattern in (("0.7_fresh", "70 %"), ("2of4_4-rounds-fresh", "2:4")):
        r = _beyond_file(results_dir, name)
        rounds = r.arg("recovery_rounds")
        central = _beyond_model(r, "central-sparsegpt")[0]
        rows.append(
            [
                f"{pattern}, global calibration + re-solve with `lsq` and {rounds} rounds of "
                "recovery ÷ centralized SparseGPT",
                *(f2(x) for x in _ratios(r, _beyond_model(r, bar)[0], central)),
                _beyond_link(name),
            ]
        )
    header = ["ratio of perplexities", "clients' domain", "other text", "measured in"]
    domain = _domain_text(fresh)
    dense = _beyond_model(fresh, "dense")[0][domain]
    return [
        "SmolLM2-135M, pruned by two organisations with `python-docs` shards unless said "
        "otherwise. Each ratio divides two perplexities that one invocation measured (the "
        "section named beside it gives its settings, tables and command); below 1 the first "
        "model is better. The clients' domain is held-out text of the organisations' kind, "
        "the other text is of another kind. Recovery: `masked`, new windows every round.",
        table(header, rows),
        "`lsq` fits each mask's kept values to the calibration text, so it gains on text of "
        "that kind and little or nothing on other text, whichever text the organisations hold. "
        "Recovery's gain on the clients' domain is mostly adaptation to that domain, which the "
        "dense model makes as well: before recovery the 50 % model is "
        f"{f2(before[domain] / dense)} times the dense model's perplexity, and its ratios to the "
        "fine-tuned dense model above stay close to that.",
    ]


class Section(NamedTuple):
    # None: a section built from other sections' files (``render`` takes the results folder;
    # it has no machine record or commands of its own)
    file: str | None
    title: str
    # None: the commands the file records itself (its ``commands`` field, every invocation
    # that wrote a row), so the page cannot list a command that did not run
    commands: tuple[str, ...] | None
    render: Callable[..., list[str]]
    records_machine: bool = True
    # False where the file's machine record is not the measuring invocation's (its load
    # average would describe another moment)
    load_of_measurement: bool = True
    # args that may differ from a command's flags: the output path, and flags whose values
    # the renderer checks itself
    unchecked: tuple[str, ...] = ("out",)
    commands_note: str = ""
    # said after the section's tables; a callable makes it from the results folder
    note: str | Callable[[Path], str] = ""


ENGINE_SHAPES = "576x576,1536x576,576x1536,2048x2048"
REFERENCE = "git clone https://github.com/IST-DASLab/sparsegpt /tmp/ref_sparsegpt"
BEYOND_PREFIX = "Beyond centralized SparseGPT: "
# Said after a beyond_centralized section's table, by the file's name.
BEYOND_NOTES = {
    "0.7_repeat": (
        "The same two runs as in the 70 % section's table, by a later invocation: on the "
        "clients' domain they agree within 2 %, while on *Persuasion*, where both "
        "perplexities are in the hundreds, each moved by a sixth to a fifth. A ratio on that "
        "text at 70 % is not settled by one measurement; each invocation reproduces its own "
        "numbers exactly."
    ),
    DRAWS[-1]: draws_note,
    "0.5_lr-0.0002": learning_rate_note,
    "0.7_calib-32": calibration_note,
    "0.7_austen": austen_note,
    FRESH_RATES[-1]: fresh_rates_note,
}

SECTIONS: tuple[Section, ...] = (
    Section(
        "compare_strategies_profiles.json",
        "Uniform and OWL sparsity profiles",
        (
            "python bench/compare_strategies.py --sparsities 0.7,0.8,0.6 --pruners sparsegpt "
            "--profiles uniform,owl --profile-strategies centralized,fedspallm,exact "
            "--segments 4 --eval-windows 8",
        ),
        profiles_section,
        records_machine=False,
    ),
    Section(
        "parallel_clients.json",
        "Simulated clients one after another or side by side",
        ("python bench/parallel_clients.py",),
        parallel_section,
    ),
    Section(
        "engine_speed.json",
        "SparseGPT against the reference implementation, unstructured",
        (
            REFERENCE,
            "python bench/engine_speed.py --layers 2 --pruners sparsegpt "
            f"--reference /tmp/ref_sparsegpt --shapes {ENGINE_SHAPES}",
        ),
        reference_section,
        commands_note="the first line fetches the reference implementation, outside the project",
    ),
    Section(
        "engine_speed_2of4.json",
        "SparseGPT against the reference implementation, 2:4",
        (
            REFERENCE,
            "python bench/engine_speed.py --layers 2 --pruners sparsegpt --pattern 2:4 "
            f"--reference /tmp/ref_sparsegpt --shapes {ENGINE_SHAPES} "
            "--out bench/results/engine_speed_2of4.json",
        ),
        reference_section,
        commands_note="the first line fetches the reference implementation, outside the project",
    ),
    Section(
        "engine_speed_whole.json",
        "The whole client, per layer",
        (
            "python bench/engine_speed.py --layers 0 --pruners sparsegpt,wanda "
            "--out bench/results/engine_speed_whole.json",
        ),
        whole_client_section,
    ),
    Section(
        "wire_and_memory.json",
        "Bytes on the wire and server memory",
        ("python bench/wire_and_memory.py --client-layers -1",),
        wire_memory_section,
    ),
    Section(
        "client_memory.json",
        "Client memory",
        (
            "python bench/wire_and_memory.py --skip-wire --clients --client-layers 30 "
            "--threads 1 --out bench/results/client_memory.json",
        ),
        client_memory_section,
    ),
    Section(
        "federation_overhead.json",
        "What `flwr run` adds, tiny model",
        ("python bench/federation_overhead.py",),
        overhead_section,
    ),
    Section(
        "federation_overhead_smollm2.json",
        "What `flwr run` adds, SmolLM2-135M",
        (
            "python bench/federation_overhead.py --model smollm2-135m --seqlen 256 "
            "--calib-samples 4 --repeats 1 --out bench/results/federation_overhead_smollm2.json",
        ),
        overhead_section,
    ),
    Section(
        "scale.json",
        "Scale: 1B- and 7B-shaped federations",
        (
            "python bench/scale.py --runs sim-1b-2 sim-1b-4 sim-1b-8 deploy-1b-2",
            "python bench/scale.py --runs sim-7b-4",
            "python bench/scale.py --runs sim-1b-2-default sim-7b-2-default --timeout 5400",
        ),
        scale_section,
        unchecked=("out", "runs", "timeout"),
        # every invocation rewrites `machine`; the file's last one may have measured nothing
        load_of_measurement=False,
        commands_note="each later one adds its rows to the file the first wrote",
    ),
    Section(
        "secure_exact.json",
        "Secure aggregation: `exact` and its recovery rounds",
        ("python bench/secure_exact.py --recovery-rounds 1 --threads 2",),
        secure_section,
    ),
    Section(
        "secure_exact_parts.json",
        "Secure aggregation: recovery in parts of 128 MiB",
        (
            "python bench/secure_exact.py --recovery-rounds 1 --threads 2 --max-payload-mb 128 "
            "--out bench/results/secure_exact_parts.json",
        ),
        secure_section,
    ),
    Section(None, f"{BEYOND_PREFIX}what reconstruction and recovery reach", (), beyond_summary),
    *(
        Section(
            f"beyond_centralized_{name}.json",
            f"{BEYOND_PREFIX}{title}",
            None,
            beyond_section,
            unchecked=("out", "rows", "tag"),
            commands_note="each adds its rows to this file",
            note=BEYOND_NOTES.get(name, ""),
        )
        for name, title in (
            ("0.5", "reconstruction and recovery at 50 %"),
            ("0.5_4-rounds", "recovery at 50 %, 4 rounds"),
            ("0.5_samples-64", "recovery at 50 %, 64 windows per client"),
            ("0.5_4-rounds-samples-64", "recovery at 50 %, 4 rounds, 64 windows per client"),
            ("0.5_fresh", "recovery at 50 %, 2 rounds, new windows every round"),
            ("0.5_4-rounds-fresh", "recovery at 50 %, 4 rounds, new windows every round"),
            ("0.7", "exact reconstruction and recovery at 70 %"),
            ("0.7_4-rounds", "recovery at 70 %, 4 rounds"),
            ("0.7_fresh", "recovery at 70 %, new windows every round"),
            ("0.7_repeat", "reconstruction at 70 %, measured again"),
            *(
                (name, f"reconstruction at 70 %, calibration draw {name.rsplit('-', 1)[1]}")
                for name in DRAWS
            ),
            ("0.7_calib-32", "reconstruction at 70 %, 32 calibration windows per client"),
            ("0.7_austen", "reconstruction at 70 %, organisations with Austen's novels"),
            ("2of4", "exact reconstruction and recovery at 2:4"),
            ("2of4_4-rounds", "recovery at 2:4, 4 rounds"),
            ("2of4_4-rounds-fresh", "recovery at 2:4, 4 rounds, new windows every round"),
            ("0.5_lr-0.0002", "recovery at 50 %, lr 0.0002"),
            ("0.5_lr-0.0002-fresh", "recovery at 50 %, lr 0.0002, new windows every round"),
            ("0.5_lr-0.0004-fresh", "recovery at 50 %, lr 0.0004, new windows every round"),
            ("0.5_lora", "recovery with LoRA adapters at 50 %"),
            ("0.5_lora-lr-0.001", "recovery with LoRA adapters at 50 %, lr 0.001"),
        )
    ),
)

# Measured on a GPU machine: their own page, with its own environment header.
GPU_PAGE = ROOT / "docs" / "results_gpu.md"
GPU_SECTIONS: tuple[Section, ...] = (
    Section(
        "recovery_memory.json",
        "Recovery at LLaMA-7B shape: GPU memory",
        ("python bench/recovery_memory.py --device cuda",),
        recovery_memory_section,
    ),
    Section(
        "lsq_speed_cuda.json",
        "Exact reconstruction at LLaMA-7B's shapes",
        (
            "python bench/lsq_speed.py --device cuda --shapes 4096x4096,11008x4096,4096x11008 "
            "--out bench/results/lsq_speed_cuda.json",
        ),
        lsq_gpu_section,
    ),
)
# (page, its sections, its title)
PAGES = ((PAGE, SECTIONS, "Results"), (GPU_PAGE, GPU_SECTIONS, "Results on a GPU"))


# ---------------------------------------------------------------- commands and environment


def _flags(command: str) -> dict[str, list[str]]:
    """`--name value...` pairs of a `python bench/x.py ...` command line, names as in args."""
    tokens = shlex.split(command)
    flags: dict[str, list[str]] = {}
    name = None
    for token in tokens[2:]:
        if token.startswith("--"):
            name = token[2:].replace("-", "_")
            flags[name] = []
        elif name is None:
            raise ValueError(f"{command!r}: {token!r} is not a --flag value")
        else:
            flags[name].append(token)
    return flags


def check_command(r: Result, section: Section, command: str) -> None:
    """The bench script exists and each flag's value is the one the file recorded."""
    tokens = shlex.split(command)
    if tokens[0] != "python":
        return  # a setup line
    if len(tokens) < 2 or not (ROOT / tokens[1]).is_file():
        raise r.error(f"command {command!r} names no bench script of this project")
    args = r.get("args")
    for name, values in _flags(command).items():
        if name in section.unchecked:
            continue
        if name not in args:
            raise r.error(f"command flag --{name.replace('_', '-')} is not in the recorded args")
        recorded = args[name]
        if isinstance(recorded, bool):
            same = recorded and values == []
        elif isinstance(recorded, list):
            same = [str(v) for v in recorded] == values
        elif isinstance(recorded, int | float) and len(values) == 1:
            try:
                same = float(values[0]) == recorded
            except ValueError:
                same = False
        else:
            same = len(values) == 1 and str(recorded) == values[0]
        if not same:
            raise r.error(
                f"command flag --{name.replace('_', '-')} {' '.join(values)!s} does not match "
                f"the recorded args ({recorded!r})"
            )


_PLATFORM = re.compile(
    r"^(?P<system>[A-Za-z]+)-(?P<release>\d+(?:\.\d+)+)\S*?-"
    r"(?P<arch>x86_64|aarch64|arm64|i686|ppc64le|s390x|riscv64)"
    r"(?:-with-(?P<libc>[a-z]+)(?P<libc_version>[\d.]+))?$"
)


def platform_label(text: str) -> str:
    """Linux-6.18.44-fc-v657-x86_64-with-glibc2.36 -> Linux 6.18.44, x86_64, glibc 2.36.

    The kernel's build suffix (``-fc-v657``) is left out: it names the build of one virtual
    machine, not a different kernel version.
    """
    match = _PLATFORM.match(text)
    if not match:
        return text
    label = f"{match['system']} {match['release']}, {match['arch']}"
    if match["libc"]:
        label += f", {match['libc']} {match['libc_version']}"
    return label


def _same(results: list[Result], field: str, convert=str) -> str | None:
    """One value of machine.<field> across the files, None if none records it."""
    values = {}
    for r in results:
        machine = r.get("machine")
        if field in machine:
            values[r.where] = convert(machine[field])
    if not values:
        return None
    if len(values) != len(results) or len(set(values.values())) != 1:
        found = ", ".join(f"{r.where}: {values.get(r.where, 'not recorded')}" for r in results)
        raise ResultError(
            f"machine.{field} differs between the result files ({found}); the page has one "
            "environment header: re-run them or exclude one"
        )
    return next(iter(values.values()))


def environment(pairs: list[tuple[Section, Result]], title: str = "Results") -> list[str]:
    measured = sorted({str(r.get("measured")) for _, r in pairs})
    for _, r in pairs:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(r.get("measured"))):
            raise r.error(f"field 'measured' is not a YYYY-MM-DD date: {r.get('measured')!r}")
    recorded = [r for section, r in pairs if section.records_machine]
    for r in recorded:
        r.get("machine")
    cores = _same(recorded, "cpu_count")
    usable = _same(recorded, "cpus_usable")
    torch = _same(recorded, "torch")
    cpu_text = f"{cores} CPU cores" if usable == cores else f"{cores} CPUs ({usable} usable)"
    if torch and torch.endswith("+cpu"):
        cpu_text += ", CPU only (a CPU build of torch)"
    gpu = _same(recorded, "gpu")
    if gpu:
        cpu_text += f", one {gpu} GPU"
    versions = [
        ("Python", _same(recorded, "python")),
        ("torch", torch),
        ("transformers", _same(recorded, "transformers")),
        ("flwr", _same(recorded, "flwr")),
    ]
    known = ", ".join(f"{name} {version}" for name, version in versions if version)
    unknown = [name for name, version in versions if not version]
    if unknown:
        known += f"; {' and '.join(unknown)}: not recorded by these runs"
    dates = measured[0] if len(measured) == 1 else f"{', '.join(measured[:-1])} and {measured[-1]}"
    facts = [
        f"Machine: {cpu_text}; {_same(recorded, 'platform', platform_label) or 'not recorded'}",
        f"Versions: {known}",
        f"Measured on {dates}",
    ]
    others = [f"[{t}]({page.name})" for page, _, t in PAGES if t != title]
    return [
        f"# {title}",
        "All numbers on this page come from the JSON files in `bench/results/`: "
        f"`{GENERATOR}` writes the page from them, and each section gives the bench command "
        "that wrote its file. Perplexities are scored on evaluation windows spread evenly over "
        "the evaluation text. Times are wall-clock seconds on the machine below; where "
        "recorded, the load average when the bench started is given with its tables (a load "
        "above the core count means other jobs shared the cores). Measured on another "
        f"machine: {', '.join(others)}.",
        "\n".join(f"- {fact}" for fact in facts),
    ]


# ---------------------------------------------------------------- the page


def load(
    results_dir: Path = RESULTS, sections: tuple[Section, ...] = SECTIONS
) -> list[tuple[Section, Result]]:
    present = {p.name for p in results_dir.glob("*.json")}
    known = {s.file for _, page_sections, _ in PAGES for s in page_sections} | EXCLUDED
    unknown = sorted(present - known)
    if unknown:
        raise ResultError(
            ", ".join(_where(results_dir / name) for name in unknown)
            + ": result files that bench/results_page.py neither shows nor excludes; add each "
            "to SECTIONS or to EXCLUDED (with the reason)"
        )
    pairs = []
    for section in sections:
        if section.file is None:
            pairs.append((section, None))
            continue
        path = results_dir / section.file
        if not path.exists():
            raise ResultError(f"{_where(path)}: missing (bench/results_page.py shows it)")
        pairs.append((section, Result(path)))
    return pairs


def render(results_dir: Path = RESULTS, page: Path = PAGE) -> str:
    """The text of ``page`` (one of :data:`PAGES`) from the files in ``results_dir``."""
    _, sections, title = next(entry for entry in PAGES if entry[0] == page)
    pairs = load(results_dir, sections)
    blocks = environment([(s, r) for s, r in pairs if r is not None], title)
    for section, r in pairs:
        if r is None:
            blocks += [f"## {section.title}", *section.render(results_dir)]
            continue
        commands = section.commands
        if commands is None:
            commands = r.get("commands")
            if not commands or not all(isinstance(c, str) for c in commands):
                raise r.error("field 'commands' is not a list of command lines")
        for command in commands:
            check_command(r, section, command)
        if section.render is scale_section:
            body = section.render(r, commands)
        else:
            body = section.render(r)
        blocks.append(f"## {section.title}")
        after = section.note(results_dir) if callable(section.note) else section.note
        blocks += [b for b in body if b] + ([after] if after else [])
        if not section.records_machine:
            blocks.append("This run did not record its machine or versions.")
        elif section.load_of_measurement:
            load_avg = r.num("machine", "loadavg_at_start", 0)
            blocks.append(f"Load average when the bench started: {load_avg:.2f}.")
        several = len(commands) > 1
        note = f" ({section.commands_note})" if several and section.commands_note else ""
        word = "Commands" if several else "Command"
        blocks.append(f"{word}{note}:\n\n```bash\n" + "\n".join(commands) + "\n```")
    return "\n\n".join(blocks) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is not up to date")
    args = parser.parse_args(argv)
    try:
        pages = {page: render(page=page) for page, _, _ in PAGES}
    except ResultError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        stale = [p for p, text in pages.items() if not p.exists() or p.read_text() != text]
        for page in stale:
            print(f"{_where(page)} is stale: run `{GENERATOR}`", file=sys.stderr)
        return 1 if stale else 0
    for page, text in pages.items():
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(text)
        print(f"wrote {_where(page)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
