"""server_app/compare.py: finished run folders side by side (table, CSV, plot).

The hand-written reports copy the layout of real ``report.json`` files (a fedspallm, an exact
and a centralized run of tiny-llama), with values chosen so that every cell is easy to work
out by hand; one test compares a folder that a real (tiny, in-process) run wrote.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server_app import compare
from server_app.compare import Table, main
from server_app.run_table import load_run, load_runs

ROOT = Path(__file__).resolve().parents[1]
WIKI, DOCS = "wikitext2", "/data/docs.txt"


def config(**overrides) -> dict:
    """The report's ``config`` section (a real run's, the keys compare.py reads set here)."""
    return {
        "model": "tiny-llama",
        "dtype": "float32",
        "strategy": "fedspallm",
        "pruner": "sparsegpt",
        "sparsity": 0.5,
        "pattern": "unstructured",
        "num-rounds": 1,
        "eval-data": [WIKI, DOCS],
        "compare-centralized": True,
        "standalone-eval": True,
        **overrides,
    }


FEDSPALLM = {
    "run": {"id": 7, "dir": "/runs/a-fedspallm", "nodes": [1, 2, 3]},
    "config": config(),
    "excluded-nodes": {},
    "clients": {
        str(node): {
            "layer-budget": None,
            "layers": {"1": [0, 1], "2": []},
            "metrics": {"rounds": 2, "payload-bytes": 1},
        }
        for node in (1, 2, 3)
    },
    "communication": {
        # node 3's replies were all rejected: it moved nothing up, and counts as 0
        "bytes_up": {"1": 3_000_000, "2": 1_500_000},
        "bytes_down": {"1": 200_000, "2": 200_000, "3": 200_000},
        "total_up": 4_500_000,
        "total_down": 600_000,
        "largest_up": 1_500_000,
        "dense_fp16_bytes_all_layers": 294912,
    },
    "rejected": [
        {"round": 1, "node": 3, "layers": [0, 1], "reason": "mask density"},
        {"round": 2, "node": 3, "layers": [], "reason": "no reply in time"},
    ],
    "layerwise": {
        "rounds": 2,
        "per_round": [
            {"round": 1, "bytes-up": 3_000_000},
            {"round": 2, "bytes-up": 4_500_000},  # cumulative: not what compare.py reads
        ],
    },
    "perplexity": {
        "dense": {WIKI: 10.0, DOCS: 20.0},
        "standalone": {
            "per_client": {
                "1": {WIKI: 12.0, DOCS: 24.0},
                "2": {WIKI: 14.0, DOCS: 26.0},
                "3": {WIKI: 16.0, DOCS: 31.0},
            },
            "mean": {WIKI: 14.0, DOCS: 27.0},
        },
        "global": {WIKI: 11.0, DOCS: 22.5},
        "centralized": {WIKI: 10.5, DOCS: 21.25},
    },
    "timings": {
        "load": 1.5,
        "dense-eval": 0.5,
        "federation": 10.0,
        "standalone-eval": 0.75,
        "global-eval": 0.25,
        "centralized": 2.0,
    },
    "sparsity": {
        "target": 0.5,
        "pattern": "unstructured",
        "overall": 0.5004,
        "per_matrix": {"model.layers.0.self_attn.q_proj.weight": 0.5},
    },
    "model": {"name": "tiny-llama", "family": "llama", "layers": 2, "parameters": 164480},
}

EXACT = {
    "run": {"id": 8, "dir": "/runs/b-exact", "nodes": [1, 2]},
    "config": config(strategy="exact", pattern="2:4", sparsity=0.5, **{"eval-data": [WIKI]}),
    "excluded-nodes": {},
    "clients": {
        str(node): {"layer-budget": None, "layers": {"1": [0], "2": [1]}, "metrics": {}}
        for node in (1, 2)
    },
    "communication": {
        "bytes_up": {"1": 250_000, "2": 750_000},
        "bytes_down": {"1": 2_000_000, "2": 3_000_000},
        "total_up": 1_000_000,
        "total_down": 5_000_000,
        "largest_up": 500_000,
        "dense_fp16_bytes_all_layers": 294912,
    },
    "rejected": [],
    "exact": {"rounds": 4, "layers_per_round": [[0], [1]]},
    "perplexity": {
        "dense": {WIKI: 10.0},
        "global": {WIKI: 10.25},
        "centralized": {WIKI: 10.25},
    },
    "timings": {"load": 1.0, "dense-eval": 0.5, "federation": 6.0, "global-eval": 0.5},
    "sparsity": {"target": 0.5, "pattern": "2:4", "overall": 0.5, "per_matrix": {}},
    "model": {"name": "tiny-llama", "family": "llama", "layers": 2, "parameters": 164480},
}

CENTRALIZED = {  # the centralized strategy: no clients, communication, rejected or rounds
    "run": {"id": 9, "dir": "/runs/c-centralized", "nodes": [1, 2]},
    "config": config(strategy="centralized", pruner="wanda", **{"eval-data": [WIKI]}),
    "excluded-nodes": {},
    "perplexity": {"dense": {WIKI: 10.0}, "centralized": {WIKI: 10.5}},
    "timings": {"load": 0.5, "dense-eval": 0.25, "federation": 1.25, "global-eval": 0.25},
    "sparsity": {"target": 0.5, "pattern": "unstructured", "overall": 0.5, "per_matrix": {}},
    "model": {"name": "tiny-llama", "family": "llama", "layers": 2, "parameters": 164480},
}


def write_run(folder: Path, report) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(
        report if isinstance(report, str) else json.dumps(report, indent=2)
    )
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        write_run(tmp_path / "runs" / "a-fedspallm", FEDSPALLM),
        write_run(tmp_path / "runs" / "b-exact", EXACT),
        write_run(tmp_path / "runs" / "c-centralized", CENTRALIZED),
    ]


def rows_by_run(folders: list[Path]) -> dict[str, dict]:
    loaded, skipped = load_runs(folders)
    assert not skipped
    table = Table.of(loaded)
    return {row["run"]: row for row in table.rows}


def test_the_rows_hold_the_hand_computed_values(runs):
    rows = rows_by_run(runs)
    a, b, c = rows["a-fedspallm"], rows["b-exact"], rows["c-centralized"]
    assert (a["strategy"], a["pruner"], a["pattern"]) == ("fedspallm", "sparsegpt", "unstructured")
    assert (a["target_sparsity"], a["sparsity"]) == (0.5, 0.5004)
    assert a[f"ppl_dense[{WIKI}]"] == 10.0 and a[f"ppl_dense[{DOCS}]"] == 20.0
    assert a[f"ppl_global[{WIKI}]"] == 11.0 and a[f"ppl_global[{DOCS}]"] == 22.5
    assert a[f"ppl_standalone_mean[{WIKI}]"] == 14.0  # (12 + 14 + 16) / 3
    assert a[f"ppl_standalone_mean[{DOCS}]"] == 27.0  # (24 + 26 + 31) / 3
    assert a[f"ppl_centralized[{DOCS}]"] == 21.25
    # (3 MB + 1.5 MB + node 3's nothing) / 3 clients, not the cumulative per-round log
    assert a["clients"] == 3
    assert a["up_MB_per_client"] == pytest.approx(1.5)
    assert a["down_MB_per_client"] == pytest.approx(0.2)
    assert a["rounds"] == 2
    assert a["wall_s"] == pytest.approx(15.0)  # 1.5 + 0.5 + 10 + 0.75 + 0.25 + 2
    assert a["federation_s"] == 10.0
    assert a["rejections"] == 2

    assert (b["strategy"], b["pattern"], b["rounds"], b["rejections"]) == ("exact", "2:4", 4, 0)
    assert b["up_MB_per_client"] == pytest.approx(0.5)  # (0.25 + 0.75) / 2
    assert b["down_MB_per_client"] == pytest.approx(2.5)  # (2 + 3) / 2
    assert b[f"ppl_standalone_mean[{WIKI}]"] is None  # no standalone section
    assert b[f"ppl_dense[{DOCS}]"] is None  # not one of its eval sets

    assert (c["strategy"], c["pruner"]) == ("centralized", "wanda")
    assert c[f"ppl_global[{WIKI}]"] is None and c[f"ppl_centralized[{WIKI}]"] == 10.5
    for column in ("up_MB_per_client", "down_MB_per_client", "rounds", "rejections"):
        assert c[column] is None, column
    assert c["wall_s"] == pytest.approx(2.25)


def test_a_standalone_section_without_its_mean_and_rounds_from_the_assignments(tmp_path):
    report = copy.deepcopy(FEDSPALLM)
    del report["perplexity"]["standalone"]["mean"]
    del report["layerwise"]
    for client in report["clients"].values():
        client["layers"] = {"1": [0], "2": [1], "3": []}
    report["config"]["strategy"] = "fedavg"
    row = rows_by_run([write_run(tmp_path / "fedavg", report)])["fedavg"]
    assert row[f"ppl_standalone_mean[{WIKI}]"] == pytest.approx(14.0)
    assert row[f"ppl_standalone_mean[{DOCS}]"] == pytest.approx(27.0)
    assert row["rounds"] == 3


def test_the_csv_holds_the_same_cells(runs, tmp_path, capsys):
    out = tmp_path / "out" / "table.csv"
    assert main([*map(str, runs), "--csv", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    with out.open(newline="") as file:
        rows = {row["run"]: row for row in csv.DictReader(file)}
    assert list(rows) == ["a-fedspallm", "b-exact", "c-centralized"]
    a, b, c = rows["a-fedspallm"], rows["b-exact"], rows["c-centralized"]
    assert a["up_MB_per_client"] == "1.5" and a["down_MB_per_client"] == "0.2"
    assert a[f"ppl_standalone_mean[{DOCS}]"] == "27.0"
    assert a["sparsity"] == "0.5004" and a["target_sparsity"] == "0.5"
    assert (a["rounds"], a["wall_s"], a["rejections"]) == ("2", "15.0", "2")
    assert (b["up_MB_per_client"], b["down_MB_per_client"], b["rounds"]) == ("0.5", "2.5", "4")
    assert b[f"ppl_global[{WIKI}]"] == "10.25" and b[f"ppl_global[{DOCS}]"] == ""
    assert (c["up_MB_per_client"], c["rounds"], c["rejections"]) == ("", "", "")
    # the printed table has the same rows and columns
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[3:]] == list(rows)
    assert len(printed) == 3 + len(rows)


def test_the_table_is_aligned(runs):
    loaded, _ = load_runs(runs)
    lines = Table.of(loaded).text().splitlines()
    group, labels, rule, *body = lines
    assert f"perplexity on {WIKI}" in group and f"perplexity on {DOCS}" in group
    segments = [match.span() for match in re.finditer(r"-+", rule)]
    assert len(segments) == len(Table.of(loaded).columns)
    # numbers end where their column's rule ends; text starts where it starts
    up = Table.of(loaded).columns.index("up_MB_per_client")
    start, end = segments[up]
    assert [line[start:end].strip() for line in body] == ["1.500", "0.500", ""]
    assert all(line[end - 1] == "0" for line in body[:2])
    strategies = [line[segments[1][0] :].split()[0] for line in body]
    assert strategies == ["fedspallm", "exact", "centralized"]
    assert labels[segments[0][0] :].startswith("run")


BROKEN = {
    "no-report": None,
    "not-json": '{"config": {',
    "a-list": "[1, 2]",
    "no-perplexity": json.dumps({"config": config()}),
    "bad-perplexity": json.dumps({**FEDSPALLM, "perplexity": {"dense": {WIKI: "high"}}}),
    "bad-communication": json.dumps({**FEDSPALLM, "communication": {"bytes_up": {"1": "lots"}}}),
}


def test_unfinished_or_malformed_runs_are_named_and_skipped(runs, tmp_path, caplog, capsys):
    broken = []
    for name, text in BROKEN.items():
        folder = tmp_path / "broken" / name
        if text is None:
            folder.mkdir(parents=True)
        else:
            write_run(folder, text)
        broken.append(folder)
    missing = tmp_path / "never-ran"
    caplog.set_level(logging.WARNING, logger=compare.__name__)
    code = main([str(runs[0]), *map(str, broken), str(missing), str(runs[1]), "--no-files"])
    assert code == 0  # the readable runs are still compared
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(broken) + 1
    for folder, warning in zip([*broken, missing], warnings, strict=True):
        assert str(folder) in warning, (folder, warning)
    assert "no report.json" in warnings[0] and "not readable JSON" in warnings[1]
    assert "no such folder" in warnings[-1]
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[3:]] == ["a-fedspallm", "b-exact"]
    assert not (tmp_path / "compare.csv").exists()


def test_the_exit_code_is_non_zero_only_when_no_run_could_be_read(tmp_path, caplog, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), str(tmp_path / "absent"), "--no-files"]) == 1
    assert "no run could be read" in caplog.text
    assert capsys.readouterr().out == ""


def test_a_report_path_names_its_run_and_the_outputs_are_not_runs(runs, monkeypatch, caplog):
    assert load_run(runs[0] / "report.json").folder == runs[0]
    # `compare runs/*` again, with the default outputs written into runs/ the first time
    monkeypatch.chdir(runs[0].parent)
    assert main([str(path) for path in runs]) == 0
    assert (runs[0].parent / "compare.csv").is_file()
    # Without matplotlib (the bench extra) no plot was drawn: its default name is still no run.
    (runs[0].parent / "compare.png").touch()
    again = sorted(runs[0].parent.iterdir())
    assert {path.name for path in again} >= {"compare.csv", "compare.png"}
    caplog.clear()
    assert main([str(path) for path in again]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w for w in warnings if "matplotlib is not installed" not in w] == []


def test_the_plot_is_written_with_matplotlib(runs, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "plots" / "cmp.png"
    assert main([*map(str, runs), "--csv", str(tmp_path / "c.csv"), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_skipped_with_a_warning(runs, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    plot, table = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    assert main([*map(str, runs), "--csv", str(table), "--plot", str(plot)]) == 0
    assert table.is_file() and not plot.exists()
    assert "matplotlib is not installed" in caplog.text


def test_the_command_and_its_console_script(runs, tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["fedspallm-compare"] == "server_app.compare:main"
    done = subprocess.run(
        [sys.executable, "-m", "server_app.compare", *map(str, runs), "--no-files"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "a-fedspallm" in done.stdout and "c-centralized" in done.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "server_app.compare", str(tmp_path / "nothing"), "--no-files"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert str(tmp_path / "nothing") in failed.stderr


def test_a_folder_a_real_run_wrote(tmp_path, capsys):
    """A tiny in-process run (tiny-llama, two clients, a few seconds) through the ServerApp's
    own main, then compared: the real report.json layout, every section filled."""
    from flwr.app import Context, RecordDict

    from client_app.app import app as client_app
    from server_app.app import main as server_main
    from server_app.inprocess import InProcessGrid

    run_config = {
        "model": "tiny-llama",
        "seqlen": 32,
        "calib-samples": 2,
        "eval-windows": 1,
        "compare-centralized": True,
        "output-dir": str(tmp_path / "runs"),
    }
    context = Context(
        run_id=11, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    server_main(InProcessGrid.simulation(client_app, 2, {}), context)
    (folder,) = (tmp_path / "runs").iterdir()
    report = json.loads((folder / "report.json").read_text())
    capsys.readouterr()

    out = tmp_path / "real.csv"
    assert main([str(folder), "--csv", str(out), "--plot", str(tmp_path / "real.png")]) == 0
    with out.open(newline="") as file:
        (row,) = csv.DictReader(file)
    assert row["run"] == folder.name and row["strategy"] == "fedspallm"
    assert (row["pruner"], row["pattern"]) == ("sparsegpt", "unstructured")
    assert float(row["sparsity"]) == pytest.approx(report["sparsity"]["overall"], abs=1e-6)
    assert float(row["sparsity"]) >= 0.5
    (eval_set,) = report["config"]["eval-data"]
    scores = report["perplexity"]
    for model, key in (("dense", "dense"), ("global", "global"), ("centralized", "centralized")):
        assert float(row[f"ppl_{model}[{eval_set}]"]) == pytest.approx(scores[key][eval_set])
    per_client = scores["standalone"]["per_client"]
    mean = sum(client[eval_set] for client in per_client.values()) / len(per_client)
    assert float(row[f"ppl_standalone_mean[{eval_set}]"]) == pytest.approx(mean, abs=1e-4)
    nodes = report["run"]["nodes"]
    assert row["clients"] == str(len(nodes)) == "2"
    up = sum(report["communication"]["bytes_up"].values()) / len(nodes) / 1e6
    assert float(row["up_MB_per_client"]) == pytest.approx(up, abs=1e-6) and up > 0
    assert int(row["rounds"]) >= 1 and row["rejections"] == "0"
    assert float(row["wall_s"]) == pytest.approx(sum(report["timings"].values()), abs=1e-3)
    assert folder.name in capsys.readouterr().out
