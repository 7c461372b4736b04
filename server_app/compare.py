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
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server_app.run_table import (
    AFTER,
    BEFORE,
    MODELS,
    Run,
    eval_sets,
    load_runs,
    ppl_column,
    summarize,
)

log = logging.getLogger(__name__)

# Digits in the terminal table (the CSV keeps the report's own precision).
DIGITS = {"target_sparsity": 4, "sparsity": 4, "ppl": 2, "MB": 3, "_s": 1}


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
