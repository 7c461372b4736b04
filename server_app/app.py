"""The ServerApp: validate the run config, run the chosen strategy, evaluate, save."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.logs import share_flower_handlers
from server_app.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    share_flower_handlers()
    config = RunConfig.from_mapping(context.run_config)  # a bad value fails here, before any work
    run_dir = run_federation(grid, config, run_id=context.run_id)
    print(f"FedSpaLLM run folder: {run_dir}", flush=True)
