"""The real thing: `flwr run .` on tiny-llama through a local SuperLink (Ray simulation).

`flwr run` starts a detached local SuperLink that no flwr command stops, and `--stream` exits
0 even when the run failed: this test reads the run's status from `flwr ls --format json` and
stops the SuperLink it started by PID, also when it fails.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))  # the bench stops its SuperLinks the same way; last, so
# bench/*.py can never shadow an installed module

from local_superlink import stop_local_superlink, superlink_running  # noqa: E402


@pytest.fixture
def flower_home(tmp_path):
    """A private FLWR_HOME; the SuperLink started under it is stopped by PID afterwards."""
    if superlink_running():
        pytest.skip("a local Flower SuperLink is already running; stop it to run this test")
    home = tmp_path / "flwr-home"
    try:
        yield home
    finally:
        stop_local_superlink(home)


def _flwr(args, env, timeout):
    return subprocess.run(
        ["flwr", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def flwr_env(home: Path, tmp_path: Path) -> dict:
    """The environment of a `flwr run` under a private FLWR_HOME."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        # The machine already has our dependencies; don't let the SuperLink reinstall them.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FEDSPALLM_CACHE": os.environ.get("FEDSPALLM_CACHE", str(tmp_path / "cache")),
    }


def flwr_run(env: dict, overrides: str, *, supernodes: int | None = None) -> tuple[str, str, str]:
    """`flwr run . --stream`; returns (run id, its status from `flwr ls`, the streamed log)."""
    args = ["run", ".", "--stream", "--run-config", overrides]
    if supernodes is not None:
        args += ["--federation-config", f"num-supernodes={supernodes}"]
    result = _flwr(args, env, timeout=300)
    log = result.stdout + result.stderr
    match = re.search(r"Successfully started run (\d+)", log)
    assert match, log[-3000:]
    listing = _flwr(["ls", "--format", "json"], env, timeout=60)
    runs = {run["run-id"]: run for run in json.loads(listing.stdout)["runs"]}
    return match.group(1), runs[match.group(1)]["status"], log


def test_flwr_run_tiny_llama(flower_home, tmp_path):
    output_dir = tmp_path / "runs"
    overrides = (
        f"model='tiny-llama' seqlen=64 calib-samples=4 eval-windows=2 output-dir='{output_dir}'"
    )
    run_id, status, log = flwr_run(flwr_env(flower_home, tmp_path), overrides, supernodes=3)
    assert status == "finished:completed", log[-3000:]

    folders = list(output_dir.glob(f"*-fedspallm-{run_id}"))
    assert len(folders) == 1, log[-3000:]
    assert f"FedSpaLLM run folder: {folders[0]}" in log
    report = json.loads((folders[0] / "report.json").read_text())
    assert len(report["clients"]) == 3
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-6)
    assert set(report["perplexity"]) >= {"dense", "global", "standalone"}
    model = AutoModelForCausalLM.from_pretrained(folders[0] / "model")
    assert model.config.num_hidden_layers == 4
    assert "layer 4/4 pruned" in log  # the clients' progress reaches the stream


def test_flwr_run_global_calibration_with_resolve(flower_home, tmp_path):
    output_dir = tmp_path / "runs"
    overrides = (
        f"model='tiny-llama' seqlen=64 calib-samples=4 eval-windows=2 output-dir='{output_dir}' "
        "resolve=true calibration='global' layers-per-round=2"
    )
    run_id, status, log = flwr_run(flwr_env(flower_home, tmp_path), overrides, supernodes=2)
    assert status == "finished:completed", log[-3000:]
    (folder,) = output_dir.glob(f"*-fedspallm-{run_id}")
    report = json.loads((folder / "report.json").read_text())
    assert report["layerwise"]["rounds"] == 3  # 2 groups of 2 layers, pipelined: G + 1
    assert report["rejected"] == []
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-6)
    assert "layer 4/4 re-solved under the global mask" in log


def test_bad_run_config_fails_the_run_before_any_work(flower_home, tmp_path):
    env = flwr_env(flower_home, tmp_path)
    _, status, log = flwr_run(env, f"sparsity=1.5 output-dir='{tmp_path}'")
    assert status.startswith("finished:failed"), status
    assert "sparsity" in log
    assert not list(tmp_path.glob("*-fedspallm-*"))  # nothing was written
