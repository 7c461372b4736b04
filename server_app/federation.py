"""One run, start to finish: pre-flight checks, the strategy's rounds, evaluation, the report."""

from __future__ import annotations

import logging
import math
import tempfile
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
from fedspallm_strategy.grids import StreamingReplies
from fedspallm_strategy.layerwise import LayerwiseFedSpaLLM
from fedspallm_strategy.payload import payload_limit
from fedspallm_strategy.sampling import layer_budget
from fedspallm_strategy.secure_exact import SecureExact
from fedspallm_strategy.strategy import Centralized, FedSpaLLM, matrix_specs
from llm_pruning.data import BUILTIN_CORPORA, load_documents
from llm_pruning.models import load_model, max_context, num_layers, prunable_weights
from server_app.nodes import HealthyNodes
from server_app.report import Evaluator, apply_payload, save_run, standalone_perplexities

log = logging.getLogger(__name__)

NODE_WAIT_SECONDS = 600
QUERY_TIMEOUT_SECONDS = 120


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
    check_device_available(config.device)
    if config.resume_from:  # the run goes on in the resumed folder
        check_writable("resume-from", run_dir)
    else:
        check_writable("output-dir", config.output_path())
    check_local_text(config)
    with clock("load"):
        model, tokenizer = load_run_model(config.model)
        check_against_model(config, model)
        evaluate = evaluator or Evaluator(config, tokenizer)
    connected = wait_for_nodes(grid, config.min_clients)
    node_configs, excluded = query_resources(grid, connected)
    # From here on the run sees only the nodes that reported valid resources, and takes each
    # round's replies one at a time as they are pulled.
    grid, nodes = StreamingReplies(HealthyNodes(grid, node_configs)), sorted(node_configs)
    if config.secure_aggregation and len(nodes) < 2:
        raise ConfigError(
            f"secure-aggregation needs at least 2 nodes (the sum over one client is its "
            f"statistics); {len(nodes)} connected and reported valid resources. Set "
            "min-clients=2 or more to wait for them"
        )
    check_calibration_text(config, tokenizer, node_configs)
    budgets = {node: nc.layer_budget for node, nc in node_configs.items()}
    check_rounds(config, model, nodes, budgets)
    report: dict = {
        "run": {"id": run_id, "dir": str(run_dir), "nodes": nodes},
        "config": config.as_dict(),
        "excluded-nodes": {str(node): reason for node, reason in excluded.items()},
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


def check_device_available(device: str) -> None:
    """The server evaluates on ``device``: one this machine lacks would fail only after every
    client pruned. (Nodes check their own device: they may have a GPU the server lacks.)"""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index or 0) >= count:
            raise ConfigError(
                f"device {device!r} is not available on the server: it has {count} CUDA "
                "device(s); set device='cpu' (nodes may still set their own in node config)"
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "device 'mps' is not available on the server; set device='cpu' (nodes may still "
            "set their own in node config)"
        )


def check_writable(key: str, folder: Path) -> None:
    """Create ``folder`` (and its parents) and write a probe file in it: a run folder that
    cannot be written would fail only at the first checkpoint, after every client pruned."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: cannot create or write the folder {folder} ({error})") from error


def is_local_text(source: str) -> bool:
    """Whether ``load_documents`` reads ``source`` from disk (rather than a built-in corpus
    or the hub): an existing path, a ``.txt``/``.jsonl`` name, or one that starts like a path."""
    if source in BUILTIN_CORPORA:
        return False
    path = Path(source).expanduser()
    return path.exists() or path.suffix in (".txt", ".jsonl") or source.startswith((".", "/", "~"))


def check_local_text(config: RunConfig) -> None:
    """Local ``calib-data`` and ``eval-data`` exist and hold UTF-8, non-empty text.

    The server reads both itself (calib-data to check the shards, eval-data to evaluate), so
    a typo in either fails here, not on every node. Text that only the nodes hold goes in
    their node config ``data-path``.
    """
    sources = [("calib-data", config.calib_data, "train")]
    sources += [("eval-data", source, "eval") for source in config.eval_data]
    for key, source, split in sources:
        if not is_local_text(source):
            continue
        try:
            load_documents(source, split=split)
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{key}: {_not_utf8(Path(source).expanduser())} is not UTF-8 text ({error})"
            ) from error
        except FileNotFoundError as error:
            hint = "; text only the nodes hold goes in their node config data-path"
            raise ConfigError(f"{key}: {error}{hint if key == 'calib-data' else ''}") from error
        except (OSError, ValueError) as error:  # empty, malformed .jsonl, unreadable
            raise ConfigError(f"{key}: {error}") from error


def _not_utf8(path: Path) -> Path:
    """The file of a text source that does not decode (the decode error names none)."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    for file in files:
        try:
            file.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return file
    return path


def load_run_model(spec: str):
    """``load_model``, any failure a ConfigError naming the key ``model``: a directory without
    a config, a garbled weights file or an unsupported family all fail before any node is
    contacted."""
    try:
        return load_model(spec)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers and safetensors raise anything
        message = str(error)
        if not message.startswith("model:"):
            message = f"model: could not load {spec!r}: {type(error).__name__}: {message}"
        raise ConfigError(message) from error
    except BaseException as error:
        # A Rust panic inside safetensors (a garbled weights file) derives from BaseException.
        if type(error).__name__ != "PanicException":
            raise
        raise ConfigError(
            f"model: could not load {spec!r}: safetensors panicked: {error}"
        ) from error


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
    largest_budget = max(
        layer_budget(total_layers, config.layer_fraction, budgets.get(node)) for node in nodes
    )
    check_payload_cap(config, model, largest_budget)
    needed = math.ceil(total_layers / per_round)
    if needed > config.num_rounds:
        raise ConfigError(
            f"the nodes' layer budgets cover {per_round} of {total_layers} layers per round, so "
            f"num-rounds must be at least {needed} (got {config.num_rounds}); "
            "or raise layer-fraction"
        )


def check_payload_cap(config: RunConfig, model: PreTrainedModel, budget: int) -> None:
    """Refuse a run whose largest reply would exceed ``max-payload-mb`` before any work: the
    server would reject it only after the client pruned. A node prunes at most ``budget``
    layers of a round's group (``layers-per-round``; all layers in the one-shot round)."""
    total = num_layers(model)
    group = config.layers_per_round or (1 if config.calibration == "global" else total)
    layers = min(budget, group, total) if config.layerwise else min(budget, total)
    per_layer = max(payload_limit(matrix_specs(model, [i], config)) for i in range(total))
    largest = per_layer * layers
    if largest > config.max_payload_mb * 2**20:
        raise ConfigError(
            f"max-payload-mb={config.max_payload_mb:g}: a node's reply of {layers} layer(s) would "
            f"be up to {largest / 2**20:.1f} MiB ({per_layer / 2**20:.2f} MiB per layer); raise "
            f"max-payload-mb, or set layers-per-round (a reply then carries one group of layers)"
        )


def wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of min-clients={minimum} nodes connected")
        log.info("waiting for nodes: %d connected, %d required", len(nodes), minimum)
        time.sleep(2)
    return nodes


def query_resources(grid: Grid, nodes: list[int]) -> tuple[dict[int, NodeConfig], dict[int, str]]:
    """Ask every node what it holds and can do (its node config) before sampling layers.

    Returns the node configs of the nodes that reported valid resources, and why each other
    node is left out of the run (an error reply, e.g. an unknown node-config key; a bad or
    missing record; no reply): guessing its resources would only send it work it fails.
    Raises RuntimeError, with every reason, when no node reported valid resources.
    """
    messages = [
        Message(RecordDict(), message_type="query", dst_node_id=node, group_id="resources")
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=QUERY_TIMEOUT_SECONDS))
    # An error the SuperLink makes itself (e.g. "Node Unavailable") comes from its own node
    # id: attribute it to the node the query went to.
    sent_to = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
    configs: dict[int, NodeConfig] = {}
    excluded: dict[int, str] = {}
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if node not in nodes or node in configs or node in excluded:
            continue  # not asked, or a second reply: the first one counts
        try:
            configs[node] = _reported_resources(reply)
        except ConfigError as error:
            excluded[node] = str(error)
    for node in nodes:
        if node not in configs and node not in excluded:
            excluded[node] = f"no reply to the resources query within {QUERY_TIMEOUT_SECONDS} s"
    for node, reason in sorted(excluded.items()):
        log.warning("node %d is left out of the run: %s", node, reason)
    if not configs:
        reasons = "; ".join(f"node {node}: {reason}" for node, reason in sorted(excluded.items()))
        raise RuntimeError(f"every node failed the resources query, so none can work: {reasons}")
    log.info("node layer budgets: %s", {n: c.layer_budget for n, c in configs.items()})
    return configs, excluded


def _reported_resources(reply: Message) -> NodeConfig:
    if reply.has_error():
        raise ConfigError(f"its resources query failed: {reply.error.reason}")
    if "resources" not in reply.content.config_records:
        raise ConfigError("its reply to the resources query holds no 'resources' record")
    try:
        return NodeConfig.from_mapping(dict(reply.content.config_records["resources"]))
    except ConfigError as error:
        raise ConfigError(f"it reported bad resources: {error}") from error


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
