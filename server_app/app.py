"""The ServerApp: validate the run config, run the chosen strategy, evaluate, save."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.run.logs import share_flower_handlers
from server_app.federation import run_federation

log = logging.getLogger(__name__)

app = ServerApp()

# How flwr 1.41-1.42 marks a ServerApp process whose SuperLink installs runtime dependencies:
# the flag its SuperExec passes to flwr-serverapp / flwr-simulation, and the per-run
# environment (<FLWR_HOME>/runtime-envs/<run id>) that `uv sync` fills and the process then
# activates in place (VIRTUAL_ENV, site-packages first on sys.path).
INSTALL_FLAG = "--allow-runtime-dependency-installation"
RUNTIME_ENVS = "runtime-envs"


@app.main()
def main(grid: Grid, context: Context) -> None:
    share_flower_handlers()
    warn_if_runtime_install()
    config = RunConfig.from_mapping(context.run_config)  # a bad value fails here, before any work
    run_dir = run_federation(grid, config, run_id=context.run_id)
    print(f"FedSpaLLM run folder: {run_dir}", flush=True)


def runtime_dependency_install() -> str | None:
    """Why this process looks like one Flower installed the app's dependencies for, or None."""
    if INSTALL_FLAG in sys.argv:
        return f"this process was started with {INSTALL_FLAG}"
    flwr_home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")  # Flower's rule
    root = flwr_home / RUNTIME_ENVS
    for entry in (os.environ.get("VIRTUAL_ENV"), sys.prefix, *sys.path):
        if entry and Path(entry) != root and Path(entry).is_relative_to(root):
            env = root / Path(entry).relative_to(root).parts[0]
            return f"it runs on the per-run environment {env}"
    return None


def warn_if_runtime_install() -> None:
    """Warn, with the fix, when the SuperLink re-installs the dependencies for every run."""
    if (evidence := runtime_dependency_install()) is None:
        return
    log.warning(
        "The SuperLink installs this app's dependencies for every run (%s): a fresh "
        "environment per run made with `uv sync`, with an unpinned (CUDA) torch, instead of "
        "the one you installed. Stop the local SuperLink (its PID: `pgrep -f "
        "'flower-superlink --insecure --simulation'`; `kill <PID>`) and start the next run with "
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --stream; in deployment, "
        "set the variable where flower-superlink starts.",
        evidence,
    )
