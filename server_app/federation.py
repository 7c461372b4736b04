"""One run, start to finish: pre-flight checks, the strategy's rounds, evaluation, the report."""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from transformers import PreTrainedModel

from client_app.task import load_shard
from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig
from fedspallm_strategy.exact import Exact, plan_exact
from fedspallm_strategy.layerwise import LayerwiseFedSpaLLM
from fedspallm_strategy.sampling import layer_budget
from fedspallm_strategy.secure_exact import SecureExact
from fedspallm_strategy.strategy import Centralized, FedSpaLLM
from llm_pruning.data import BUILTIN_CORPORA
from llm_pruning.models import load_model, max_context, num_layers, prunable_weights
from server_app.report import Evaluator, apply_payload, save_run, standalone_perplexities

log = logging.getLogger(__name__)

NODE_WAIT_SECONDS = 600


def run_federation(
    grid: Grid, config: RunConfig, *, run_id: int, evaluator: Evaluator | None = None
) -> Path:
    """Run ``config`` over the nodes of ``grid``; returns the absolute run folder.

    ``evaluator`` lets a caller that runs many configurations share one (e.g. a caching one).
    """
    timings: dict[str, float] = {}
    clock = _Stopwatch(timings)
    run_dir = (
        Path(config.resume_from).expanduser().resolve()
        if config.resume_from
        else config.output_path() / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{config.strategy}-{run_id}"
    )
    if config.resume_from and not (run_dir / "checkpoint" / "state.json").is_file():
        raise ConfigError(f"resume-from: {run_dir} holds no checkpoint/state.json")
    if config.resume_from and config.strategy == "centralized":
        raise ConfigError("resume-from: the centralized strategy has no rounds to resume")
    if config.resume_from and config.strategy == "exact":
        raise ConfigError("resume-from: the exact strategy keeps no checkpoint to resume from")
    with clock("load"):
        model, tokenizer = load_model(config.model)
        check_against_model(config, model)
        evaluate = evaluator or Evaluator(config, tokenizer)
    nodes = wait_for_nodes(grid, config.min_clients)
    if config.secure_aggregation and len(nodes) < 2:
        raise ConfigError(
            f"secure-aggregation needs at least 2 nodes (the sum over one client is its "
            f"statistics); {len(nodes)} connected. Set min-clients=2 or more to wait for them"
        )
    node_configs = query_resources(grid, nodes)
    check_calibration_text(config, tokenizer, node_configs)
    budgets = {node: nc.layer_budget for node, nc in node_configs.items()}
    check_rounds(config, model, nodes, budgets)
    report: dict = {
        "run": {"id": run_id, "dir": str(run_dir), "nodes": nodes},
        "config": config.as_dict(),
    }
    with clock("dense-eval"):
        perplexities = {"dense": evaluate(model, "dense")}

    strategy = build_strategy(config, model, tokenizer, node_configs, run_dir)
    if config.resume_from:
        strategy.restore(run_dir / "checkpoint")
    with clock("federation"):
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),  # clients hold the dense model: no weights go down
            # exact and layer-wise runs plan their own rounds, whatever num-rounds says.
            num_rounds=strategy.rounds,
            timeout=config.round_timeout,
        )
    if strategy.remaining:
        reasons = sorted({f"node {r['node']}: {r['reason']}" for r in strategy.accounting.rejected})
        raise RuntimeError(
            f"layers {strategy.remaining} were not pruned by any valid client in "
            f"{config.num_rounds} round(s). Raise num-rounds or fix the failing nodes; "
            f"rejected replies: {'; '.join(reasons) or 'none'}"
        )

    saved = model
    if isinstance(strategy, FedSpaLLM):
        _record_clients(report, strategy, budgets, model)
        with clock("standalone-eval"):
            standalone = standalone_perplexities(
                config, evaluate, strategy.reply_files, _num_matrices(model)
            )
        if standalone:
            perplexities["standalone"] = standalone
    if isinstance(strategy, LayerwiseFedSpaLLM):
        report["layerwise"] = strategy.costs()
    if isinstance(strategy, Exact):
        _record_clients(report, strategy, budgets, model)
        report["exact"] = strategy.costs()
    if config.strategy == "standalone":
        saved = _best_standalone(config, strategy, perplexities.get("standalone"))
    else:
        with clock("global-eval"):
            perplexities["global" if config.strategy != "centralized" else "centralized"] = (
                evaluate(model, "global")
            )
    if config.compare_centralized and config.strategy != "centralized":
        with clock("centralized"):
            central, _ = load_model(config.model)
            Centralized(central, config, _pooled(config, tokenizer, node_configs)).prune()
            perplexities["centralized"] = evaluate(central, "centralized")
    report["perplexity"] = perplexities
    report["timings"] = timings
    path = save_run(run_dir, config=config, model=saved, tokenizer=tokenizer, report=report)
    log.info("report written to %s", path)
    return run_dir


def build_strategy(config, model, tokenizer, node_configs: dict[int, NodeConfig], run_dir: Path):
    if config.strategy == "centralized":
        return Centralized(model, config, _pooled(config, tokenizer, node_configs))
    if config.strategy == "exact":
        names = {node: nc.name for node, nc in node_configs.items()}
        if config.secure_aggregation:
            return SecureExact(model, config, node_names=names)
        return Exact(model, config, node_names=names)
    kind = LayerwiseFedSpaLLM if config.layerwise else FedSpaLLM
    return kind(
        model,
        config,
        node_budgets={node: nc.layer_budget for node, nc in node_configs.items()},
        node_names={node: nc.name for node, nc in node_configs.items()},
        reply_dir=run_dir / "replies",
        checkpoint_dir=run_dir / "checkpoint",
        rule=config.strategy,
    )


def _pooled(config: RunConfig, tokenizer, node_configs: dict[int, NodeConfig]):
    """Every node's shard, as the node itself would cut it, pooled (simulation only)."""

    def segments() -> torch.Tensor:
        ordered = sorted(node_configs.values(), key=lambda nc: nc.name)
        return torch.cat([load_shard(config, nc, tokenizer) for nc in ordered])

    return segments


def check_against_model(config: RunConfig, model: PreTrainedModel) -> None:
    """Checks that need the model, still before any node is contacted."""
    context = max_context(model)
    if context is not None and config.seqlen > context:
        raise ConfigError(f"seqlen {config.seqlen} exceeds the model's context of {context} tokens")
    pattern = config.sparsity_pattern
    if pattern.is_nm:
        for name, linear in prunable_weights(model, 0).items():
            if linear.in_features % pattern.m:
                raise ConfigError(
                    f"pattern {config.pattern}: {name} has {linear.in_features} input features, "
                    f"not a multiple of {pattern.m}"
                )


def check_calibration_text(
    config: RunConfig, tokenizer, node_configs: dict[int, NodeConfig]
) -> None:
    """Every shard the server can read must hold one segment, or the clients would all fail.

    Shards on the nodes' own disks (``data-path``) and hub datasets are the nodes' business.
    """
    readable = config.calib_data in BUILTIN_CORPORA or Path(config.calib_data).expanduser().exists()
    if not readable:
        return
    for node in node_configs.values():
        if node.data_path is None:
            try:
                load_shard(config, node, tokenizer)
            except ValueError as error:
                raise ConfigError(f"calib-data: {node.name}: {error}") from error


def check_rounds(config: RunConfig, model: PreTrainedModel, nodes, budgets) -> None:
    if config.strategy == "centralized":
        return
    if config.strategy == "exact":  # one round per layer group; only its bytes can refuse it
        plan_exact(model, config).check_budget(config)
        return
    total_layers = num_layers(model)
    per_round = sum(
        layer_budget(total_layers, config.layer_fraction, budgets.get(node)) for node in nodes
    )
    if config.layerwise and per_round < total_layers:
        raise ConfigError(
            f"the nodes' layer budgets cover {per_round} of {total_layers} layers, and a "
            "run with resolve, calibration='global' or layers-per-round samples every layer "
            "once for the whole run: raise layer-fraction or the nodes' layer-budget"
        )
    needed = math.ceil(total_layers / per_round)
    if needed > config.num_rounds:
        raise ConfigError(
            f"the nodes' layer budgets cover {per_round} of {total_layers} layers per round, so "
            f"num-rounds must be at least {needed} (got {config.num_rounds}); "
            "or raise layer-fraction"
        )


def wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of min-clients={minimum} nodes connected")
        log.info("waiting for nodes: %d connected, %d required", len(nodes), minimum)
        time.sleep(2)
    return nodes


def query_resources(grid: Grid, nodes: list[int]) -> dict[int, NodeConfig]:
    """Ask every node what it holds and can do (its node config) before sampling layers."""
    messages = [
        Message(RecordDict(), message_type="query", dst_node_id=node, group_id="resources")
        for node in nodes
    ]
    configs = {node: NodeConfig() for node in nodes}
    for reply in grid.send_and_receive(messages, timeout=120):
        node = reply.metadata.src_node_id
        if reply.has_error() or "resources" not in reply.content.config_records:
            log.warning("node %d did not report its resources; using layer-fraction", node)
            continue
        try:
            configs[node] = NodeConfig.from_mapping(dict(reply.content.config_records["resources"]))
        except ConfigError as error:
            log.warning("node %d reported bad resources (%s); using layer-fraction", node, error)
    log.info("node layer budgets: %s", {n: c.layer_budget for n, c in configs.items()})
    return configs


def _record_clients(report: dict, strategy: FedSpaLLM, budgets, model) -> None:
    accounting = strategy.accounting
    report["clients"] = {
        str(node): {
            "layer-budget": budgets.get(node),
            "layers": {str(r): a.get(node, []) for r, a in accounting.assignments.items()},
            "metrics": accounting.client_metrics.get(node, {}),
        }
        for node in budgets
    }
    dense_fp16 = 2 * sum(
        linear.weight.numel()
        for layer in range(num_layers(model))
        for linear in prunable_weights(model, layer).values()
    )
    report["communication"] = {
        "bytes_up": {str(n): b for n, b in accounting.bytes_up.items()},
        "bytes_down": {str(n): b for n, b in accounting.bytes_down.items()},
        "total_up": sum(accounting.bytes_up.values()),
        "total_down": sum(accounting.bytes_down.values()),
        "dense_fp16_bytes_all_layers": dense_fp16,
    }
    report["rejected"] = accounting.rejected


def _best_standalone(config: RunConfig, strategy: FedSpaLLM, standalone: dict | None):
    """For the ``standalone`` strategy, save the client model with the lowest perplexity."""
    if not standalone:
        raise RuntimeError("standalone: no client pruned every layer, so there is no model to save")
    first = config.eval_data[0]
    best = min(standalone["per_client"], key=lambda node: standalone["per_client"][node][first])
    model, _ = load_model(config.model)
    for path in strategy.reply_files[int(best)]:
        apply_payload(model, path.read_bytes())
    log.info("standalone: saving node %s's model (lowest perplexity on %s)", best, first)
    return model


def _num_matrices(model: PreTrainedModel) -> int:
    return sum(len(prunable_weights(model, layer)) for layer in range(num_layers(model)))


class _Stopwatch:
    """``with clock("stage"):`` adds the block's seconds to ``timings["stage"]``."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def __call__(self, stage: str):
        self.stage = stage
        return self

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.stage] = round(time.perf_counter() - self.start, 3)
