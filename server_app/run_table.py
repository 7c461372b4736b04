"""One row per finished run folder, read from its ``report.json`` alone (the columns are listed
in ``server_app/compare.py``, which prints and writes them)."""

from __future__ import annotations

import json
import logging
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
