"""Runs side by side: one table of finished run folders, printed, and written as CSV and a plot.

::

    python -m server_app.compare runs/*            # or: fedspallm-compare runs/*
    python -m server_app.compare runs/a runs/b --csv out.csv --plot out.png
    python -m server_app.compare runs/* --no-files # print only

It only reads each folder's ``report.json`` (``server_app/report.py`` writes it), so it works
on folders from any machine and imports nothing of the pruning code. One row per run:

``run``                 the folder's name
``strategy``/``pruner`` ``config.strategy`` / ``config.pruner``
``pattern``             ``sparsity.pattern`` (else ``config.pattern``)
``target_sparsity``     ``sparsity.target`` (else ``config.sparsity``)
``sparsity``            the achieved sparsity of the saved model, ``sparsity.overall``
``ppl_<model>[<set>]``  perplexity on eval set ``<set>`` of the dense model, the global
                        (merged) model, the clients' standalone models (their mean) and the
                        centrally pruned baseline (``perplexity.{dense,global,standalone.mean,
                        centralized}``); blank where the run has none
``clients``             the nodes that took part, ``run.nodes``
``up_MB_per_client``    mean bytes per client over the run (``communication.bytes_up`` per
``down_MB_per_client``  node, a node absent from it counted as 0), in MB (10**6 bytes)
``rounds``              rounds the run took: ``layerwise.rounds`` or ``exact.rounds``, else the
                        rounds that assigned layers (``clients.<node>.layers``)
``wall_s``              the run's measured stages together (sum of ``timings``), seconds
``federation_s``        the rounds alone (``timings.federation``), seconds
``rejections``          rejected client replies, ``len(rejected)``

Sections a strategy does not write (the centralized strategy has no clients, communication or
rounds) leave their cells blank.

By default the CSV and the plot go to ``compare.csv`` and ``compare.png`` in the current
directory; ``--csv``/``--plot`` choose other paths, ``--no-files`` writes neither. The plot
needs matplotlib (the ``bench`` extra); without it the plot is skipped with a warning.

A folder that is not a finished run (no ``report.json``, or one that is not a report) is named
in a warning and skipped; the exit status is non-zero only when no run could be read (or a
requested file could not be written).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPORT = "report.json"
MB = 1_000_000
# The models whose perplexity is compared, per eval set: (report key, column name).
MODELS = (
    ("dense", "dense"),
    ("global", "global"),
    ("standalone", "standalone_mean"),
    ("centralized", "centralized"),
)
BEFORE = ("run", "strategy", "pruner", "pattern", "target_sparsity", "sparsity")
AFTER = (
    "clients",
    "up_MB_per_client",
    "down_MB_per_client",
    "rounds",
    "wall_s",
    "federation_s",
    "rejections",
)
# Digits in the terminal table (the CSV keeps the report's own precision).
DIGITS = {"target_sparsity": 4, "sparsity": 4, "ppl": 2, "MB": 3, "_s": 1}


class RunError(ValueError):
    """A folder that is not a finished run; the message names it."""


@dataclass
class Run:
    """One finished run folder and its report."""

    folder: Path
    report: dict

    @property
    def name(self) -> str:
        return self.folder.name


def ppl_column(model: str, eval_set: str) -> str:
    """The column of ``model``'s perplexity (a :data:`MODELS` column name) on ``eval_set``."""
    return f"ppl_{model}[{eval_set}]"


# ---------------------------------------------------------------------------- reading


def load_run(path: Path) -> Run:
    """The run in folder ``path`` (or of the ``report.json`` file ``path``); RunError naming
    it when it holds no readable report."""
    folder = path.parent if path.name == REPORT and path.is_file() else path
    if not folder.exists():
        raise RunError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise RunError(f"{folder}: not a run folder (a file, not a folder)")
    report_path = folder / REPORT
    if not report_path.is_file():
        raise RunError(f"{folder}: no {REPORT}, so not a finished run")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{report_path}: not readable JSON ({error})") from error
    if not isinstance(report, dict):
        raise RunError(f"{report_path}: not a run report (a JSON {type(report).__name__})")
    for section in ("config", "perplexity"):
        if not isinstance(report.get(section), dict):
            raise RunError(f"{report_path}: not a run report (no '{section}' section)")
    run = Run(folder, report)
    try:
        summarize(run)  # any malformed section fails here, naming the folder
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RunError(
            f"{report_path}: malformed report ({type(error).__name__}: {error})"
        ) from error
    return run


def load_runs(paths: Iterable[Path]) -> tuple[list[Run], list[str]]:
    """The readable runs among ``paths``, and why each other one was skipped (warned)."""
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except RunError as error:
            log.warning("skipping %s", error)
            skipped.append(str(error))
    return runs, skipped


# ---------------------------------------------------------------------------- one row


def eval_sets(runs: Sequence[Run]) -> list[str]:
    """Every eval set of the runs, in the order the runs name them (config first)."""
    names: dict[str, None] = {}
    for run in runs:
        config_sets = run.report["config"].get("eval-data") or []
        if isinstance(config_sets, str):
            config_sets = [config_sets]
        names.update(dict.fromkeys(config_sets))
        names.update(dict.fromkeys(perplexities(run.report)))
    return list(names)


def perplexities(report: dict) -> dict[str, dict[str, float]]:
    """Eval set -> {column model name: perplexity} for the :data:`MODELS` the report has."""
    section = report["perplexity"]
    table: dict[str, dict[str, float]] = {}
    for key, column in MODELS:
        scores = section.get(key)
        if scores is None:
            continue
        if key == "standalone":
            scores = standalone_mean(scores)
        for eval_set, value in scores.items():
            table.setdefault(eval_set, {})[column] = _number(value)
    return table


def standalone_mean(section: dict) -> dict[str, float]:
    """The report's ``standalone.mean``; the mean of ``per_client`` if a report lacks it."""
    if "mean" in section:
        return section["mean"]
    per_client = list(section.get("per_client", {}).values())
    if not per_client:
        return {}
    return {
        eval_set: sum(_number(client[eval_set]) for client in per_client) / len(per_client)
        for eval_set in per_client[0]
    }


def summarize(run: Run, sets: Sequence[str] | None = None) -> dict[str, object]:
    """The run's row: column -> value (None where the run has none)."""
    report = run.report
    config = report["config"]
    sparsity = report.get("sparsity") or {}
    timings = report.get("timings") or {}
    scores = perplexities(report)
    row: dict[str, object] = {
        "run": run.name,
        "strategy": config.get("strategy"),
        "pruner": config.get("pruner"),
        "pattern": sparsity.get("pattern", config.get("pattern")),
        "target_sparsity": _optional_number(sparsity.get("target", config.get("sparsity"))),
        "sparsity": _optional_number(sparsity.get("overall")),
    }
    for eval_set in scores if sets is None else sets:
        for _, column in MODELS:
            row[ppl_column(column, eval_set)] = scores.get(eval_set, {}).get(column)
    nodes = clients(report)
    communication = report.get("communication")
    up = down = None
    if isinstance(communication, dict) and nodes:
        up = per_client_mb(communication.get("bytes_up") or {}, nodes)
        down = per_client_mb(communication.get("bytes_down") or {}, nodes)
    rejected = report.get("rejected")
    row.update(
        {
            "clients": len(nodes) if nodes else None,
            "up_MB_per_client": up,
            "down_MB_per_client": down,
            "rounds": rounds(report),
            "wall_s": sum(_number(v) for v in timings.values()) if timings else None,
            "federation_s": _optional_number(timings.get("federation")),
            "rejections": len(rejected) if isinstance(rejected, list) else None,
        }
    )
    return row


def clients(report: dict) -> list[str]:
    """The nodes of the run (``run.nodes``; else every node the report accounts for)."""
    nodes = (report.get("run") or {}).get("nodes")
    if nodes:
        return [str(node) for node in nodes]
    communication = report.get("communication") or {}
    seen = {
        *(report.get("clients") or {}),
        *(communication.get("bytes_up") or {}),
        *(communication.get("bytes_down") or {}),
    }
    return sorted(seen, key=lambda node: (len(node), node))


def per_client_mb(per_node: dict, nodes: Sequence[str]) -> float:
    """Mean over ``nodes`` of the bytes per node (a node absent from ``per_node`` moved 0), MB.

    The per-node totals, not the per-round log (whose bytes may be cumulative)."""
    total = sum(_number(per_node.get(node, 0)) for node in nodes)
    return total / len(nodes) / MB


def rounds(report: dict) -> int | None:
    """The rounds the run took (None for a run without rounds, e.g. strategy centralized)."""
    for section in ("layerwise", "exact"):
        value = (report.get(section) or {}).get("rounds")
        if value is not None:
            return int(value)
    assigned = {
        round_
        for client in (report.get("clients") or {}).values()
        for round_ in (client.get("layers") or {})
    }
    return len(assigned) or None


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def _optional_number(value) -> float | None:
    return None if value is None else _number(value)


# ---------------------------------------------------------------------------- the table


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, object]]
    eval_sets: list[str]

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Table:
        sets = eval_sets(runs)
        columns = [*BEFORE]
        columns += [ppl_column(column, s) for s in sets for _, column in MODELS]
        columns += AFTER
        return cls(columns, [summarize(run, sets) for run in runs], sets)

    def text(self) -> str:
        """Aligned for a terminal: text left, numbers right, blank where absent; two header
        lines (a group over its short column names: the eval set over its perplexities)."""
        cells = [[_shown(column, row.get(column)) for column in self.columns] for row in self.rows]
        groups = [_header(column) for column in self.columns]
        widths = [
            max([len(label), *(len(line[i]) for line in cells)])
            for i, (_, label) in enumerate(groups)
        ]
        spans = []  # (group, first column, last column)
        for i, (group, _) in enumerate(groups):
            if spans and group and spans[-1][0] == group:
                spans[-1][2] = i
            else:
                spans.append([group, i, i])
        for group, first, last in spans:  # a group name wider than its columns widens the last
            span = sum(widths[first : last + 1]) + 2 * (last - first)
            widths[last] += max(0, len(group) - span)
        numeric = [
            any(isinstance(row.get(column), int | float) for row in self.rows)
            for column in self.columns
        ]

        def line(values: Sequence[str]) -> str:
            parts = [
                value.rjust(width) if right else value.ljust(width)
                for value, width, right in zip(values, widths, numeric, strict=True)
            ]
            return "  ".join(parts).rstrip()

        top = "  ".join(
            group.ljust(sum(widths[first : last + 1]) + 2 * (last - first))
            for group, first, last in spans
        ).rstrip()
        rule = "  ".join("-" * width for width in widths)
        labels = line([label for _, label in groups])
        return "\n".join([top, labels, rule, *(line(row) for row in cells)])

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(self.columns)
            for row in self.rows:
                writer.writerow([_csv_cell(row.get(column)) for column in self.columns])

    def write_plot(self, path: Path) -> bool:
        """Global perplexity per run, one panel per eval set, dense as a line; False (and a
        warning) without matplotlib."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            log.warning(
                "matplotlib is not installed, so no plot was written (pip install "
                "'fedspallm[bench]' or matplotlib)"
            )
            return False
        names = [str(row["run"]) for row in self.rows]
        panels = max(1, len(self.eval_sets))
        figure = Figure(figsize=(max(6.0, 1.2 * len(names) + 2), 3.6 * panels))
        axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
        positions = list(range(len(names)))
        for axis, eval_set in zip(axes, self.eval_sets or [""], strict=False):
            global_ = [row.get(ppl_column("global", eval_set)) for row in self.rows]
            dense = [row.get(ppl_column("dense", eval_set)) for row in self.rows]
            axis.bar(
                positions,
                [math.nan if value is None else value for value in global_],
                color="tab:blue",
                label="global",
            )
            for x, value in zip(positions, global_, strict=True):
                if value is not None:
                    axis.annotate(
                        f"{value:.2f}",
                        (x, value),
                        xytext=(0, 3),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
            marks = [(x, value) for x, value in zip(positions, dense, strict=True) if value]
            if marks:  # dense: a dashed line across each run's bar
                axis.hlines(
                    [value for _, value in marks],
                    [x - 0.45 for x, _ in marks],
                    [x + 0.45 for x, _ in marks],
                    colors="black",
                    linestyles="--",
                    label="dense",
                )
            shown = [v for v in [*global_, *dense] if v is not None]
            if shown:  # differences of a few tenths matter: the axis starts near the lowest
                low, high = min(shown), max(shown)
                pad = max(0.5 * (high - low), 0.02 * high)
                axis.set_ylim(max(0.0, low - pad), high + pad)
            axis.set_title(f"perplexity on {eval_set}" if eval_set else "perplexity")
            axis.set_ylabel("perplexity (lower is better)")
            axis.set_xticks(positions)
            axis.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
            axis.legend(fontsize=8)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        return True


HEADERS = {  # the terminal's (group, label) of each column but the perplexities
    "target_sparsity": ("sparsity", "target"),
    "sparsity": ("sparsity", "achieved"),
    "up_MB_per_client": ("MB per client", "up"),
    "down_MB_per_client": ("MB per client", "down"),
    "wall_s": ("seconds", "wall"),
    "federation_s": ("seconds", "federation"),
    "rejections": ("", "rejected"),
}
PPL_LABELS = {"standalone_mean": "standalone mean"}


def _header(column: str) -> tuple[str, str]:
    if column.startswith("ppl_"):
        model, _, eval_set = column[len("ppl_") : -1].partition("[")
        return f"perplexity on {eval_set}", PPL_LABELS.get(model, model)
    return HEADERS.get(column, ("", column))


def _shown(column: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        digits = next((d for key, d in DIGITS.items() if key in column), 4)
        return f"{value:.{digits}f}"
    return str(value)


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


# ---------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="fedspallm-compare",
        description="Compare finished FedSpaLLM run folders (their report.json) side by side: "
        "print one table and write it as CSV and a plot.",
    )
    cli.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders")
    cli.add_argument(
        "--csv", type=Path, default=Path("compare.csv"), help="CSV to write (default: %(default)s)"
    )
    cli.add_argument(
        "--plot",
        type=Path,
        default=Path("compare.png"),
        help="plot to write, needs matplotlib (default: %(default)s)",
    )
    cli.add_argument(
        "--no-files", action="store_true", help="only print the table: no CSV, no plot"
    )
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not logging.getLogger().handlers:  # our warnings and notes; others' warnings only
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        log.setLevel(logging.INFO)
    outputs = set() if args.no_files else {args.csv.resolve(), args.plot.resolve()}
    # `compare runs/*` with the outputs inside runs/ lists them again on the next call.
    paths = [path for path in args.runs if path.resolve() not in outputs]
    runs, _ = load_runs(paths)
    if not runs:
        log.error("no run could be read from %d folder(s)", len(paths))
        return 1
    table = Table.of(runs)
    print(table.text(), flush=True)
    if args.no_files:
        return 0
    try:
        table.write_csv(args.csv)
        log.info("wrote %s", args.csv)
        if table.write_plot(args.plot):
            log.info("wrote %s", args.plot)
    except OSError as error:
        log.error("could not write the comparison: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
