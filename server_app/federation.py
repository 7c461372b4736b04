"""One run, start to finish: pre-flight checks, the strategy's rounds, evaluation, the report."""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from transformers import PreTrainedModel

from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig, load_shard
from fedspallm_strategy.run.allocator import return_freed_memory
from fedspallm_strategy.strategies.centralized import Centralized, pooled
from fedspallm_strategy.strategies.grids import StreamingReplies
from fedspallm_strategy.strategies.recovery_rounds import recover_centrally, run_recovery_rounds
from fedspallm_strategy.strategies.registry import strategy_class
from fedspallm_strategy.strategies.secure_recovery import (
    check_secure_recovery_upload,
    run_secure_recovery_rounds,
)
from fedspallm_strategy.strategies.setup import RunSetup
from llm_pruning.data import BUILTIN_CORPORA, HUB_DATASETS, load_documents
from llm_pruning.families import max_context, prunable_weights
from llm_pruning.models import load_model
from llm_pruning.zeroshot import TaskError, check_tasks
from server_app.model_card import check_hub_access, push_model
from server_app.nodes import HealthyNodes
from server_app.report import Evaluator, save_run, zero_shot_report, zero_shot_summary

log = logging.getLogger(__name__)

NODE_WAIT_SECONDS = 600
QUERY_TIMEOUT_SECONDS = 120


def run_federation(
    grid: Grid, config: RunConfig, *, run_id: int, evaluator: Evaluator | None = None
) -> Path:
    """Run ``config`` over the nodes of ``grid``; returns the absolute run folder.

    ``evaluator`` lets a caller that runs many configurations share one (e.g. a caching one).
    Everything that differs between strategies is the strategy's (``strategies/registry.py``).
    """
    timings: dict[str, float] = {}
    clock = _Stopwatch(timings)
    kind = strategy_class(config)
    run_dir = (
        Path(config.resume_from).expanduser().resolve()
        if config.resume_from
        else config.output_path() / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{config.strategy}-{run_id}"
    )
    if config.resume_from and (refusal := kind.resume_refusal(config)):
        raise ConfigError(f"resume-from: {refusal}")
    if config.resume_from and not (run_dir / "checkpoint" / "state.json").is_file():
        raise ConfigError(f"resume-from: {run_dir} holds no checkpoint/state.json")
    check_device_available(config.device)
    if config.resume_from:  # the run goes on in the resumed folder
        check_writable("resume-from", run_dir)
    else:
        check_writable("output-dir", config.output_path())
    check_calib_data_name(config.calib_data)
    check_local_text(config)
    check_eval_tasks(config)
    if config.push_to_hub:  # no token or no hub would fail only after every client pruned
        check_hub_access(config.push_to_hub)
    return_freed_memory()  # before the model: a layer freed each round must not stay in the heap
    with clock("load"):
        model, tokenizer = load_run_model(config.model, config.torch_dtype, config.ignore)
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
    run = RunSetup(config, model, tokenizer, node_configs, run_dir, evaluate, clock)
    run.report.update(
        {
            "run": {"id": run_id, "dir": str(run_dir), "nodes": nodes},
            "config": config.as_dict(),
            "excluded-nodes": {str(node): reason for node, reason in excluded.items()},
        }
    )
    strategy = kind.for_run(run)
    strategy.check_rounds(nodes, run.budgets)
    with clock("dense-eval"):
        run.perplexities["dense"] = evaluate(model, "dense")
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
    if config.recovery_rounds:
        recover_run(strategy, grid, run)
    saved = strategy.conclude(run)
    if config.compare_centralized and strategy.compares_to_centralized:
        with clock("centralized"):
            central, _ = load_model(
                config.model, dtype=config.torch_dtype, lazy=True, ignore=config.ignore
            )
            Centralized(central, config, pooled(config, tokenizer, node_configs)).prune()
            if config.recovery_rounds:
                run.perplexities["centralized-before-recovery"] = evaluate(central, "centralized")
                run.report["centralized-recovery"] = recover_centrally(
                    central, config, tokenizer, node_configs
                )
            run.perplexities["centralized"] = evaluate(central, "centralized")
    run.report["perplexity"] = run.perplexities
    if config.eval_tasks:
        run.report["zero-shot"] = zero_shot_report(run.perplexities)
    run.report["timings"] = timings
    path = save_run(run_dir, config=config, model=saved, tokenizer=tokenizer, report=run.report)
    log.info("report written to %s", path)
    for line in zero_shot_summary(run.report.get("zero-shot", {})):
        log.info(line)
    if config.push_to_hub and saved is not None:
        push_model(run_dir / "model", config.push_to_hub)
    return run_dir


def recover_run(strategy, grid: Grid, run: RunSetup) -> None:
    """The recovery rounds (``recovery-rounds``), after the global model is scored once as
    pruned: the report's ``recovery`` section and ``<model>-before-recovery`` perplexity."""
    config = run.config
    name = "centralized" if not strategy.compares_to_centralized else "global"
    with run.clock(f"{name}-eval-before-recovery"):
        run.perplexities[f"{name}-before-recovery"] = run.evaluate(strategy.model, name)
    section = {
        "rounds": config.recovery_rounds,
        "method": config.recovery_method,
        "steps": config.recovery_steps,
        "lr": config.recovery_learning_rate,
        "samples": config.recovery_samples,
        "distill": config.recovery_distill,
    }
    with run.clock("recovery"):
        if strategy.compares_to_centralized:  # a federation: the clients fine-tune
            play = run_secure_recovery_rounds if config.secure_aggregation else run_recovery_rounds
            section["per-round"] = play(
                strategy, grid, config.round_timeout, lambda: run.evaluate(strategy.model, name)
            )
        else:  # the centralized strategy: on the pooled shards, on the server
            section["centralized"] = recover_centrally(
                strategy.model, config, run.tokenizer, run.node_configs
            )
    run.report["recovery"] = section


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


def is_hub_dataset_id(source: str) -> bool:
    """Whether ``source`` has the form of a ``datasets`` hub id, ``owner/name``."""
    owner, slash, name = source.partition("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return bool(slash and owner and name) and set(owner + name) <= allowed


def check_calib_data_name(source: str) -> None:
    """A ``calib-data`` that is none of the sources ``load_documents`` knows fails here, not on
    every node after it loaded the model.

    Built-in corpora, the hub datasets known by short name, and anything that looks like a
    path pass (``check_local_text`` reads those). A hub id ``owner/name`` passes too: the server
    cannot tell one it cannot reach (offline, private to the nodes) from a typo, and a node
    that fails to load it says ``calib-data:`` in its error.
    """
    if source in BUILTIN_CORPORA or source in HUB_DATASETS or is_local_text(source):
        return
    if is_hub_dataset_id(source):
        return
    raise ConfigError(
        f"calib-data: {source!r} is no known text source: not a built-in corpus "
        f"({', '.join(BUILTIN_CORPORA)}), a hub dataset known by name "
        f"({', '.join(HUB_DATASETS)}), a local .txt/.jsonl file or directory (none at that "
        "path), nor a Hugging Face dataset id of the form owner/name"
    )


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


def check_eval_tasks(config: RunConfig) -> None:
    """``eval-tasks`` need the ``eval`` extra, and their task files on the server's disk.

    The cheap checks, before the model loads; the Evaluator then resolves the task names and
    loads their documents, still before any node works.
    """
    if config.eval_tasks:
        try:
            check_tasks(config.eval_tasks)
        except TaskError as error:
            raise ConfigError(f"eval-tasks: {error}") from error


def _not_utf8(path: Path) -> Path:
    """The file of a text source that does not decode (the decode error names none)."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    for file in files:
        try:
            file.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return file
    return path


def load_run_model(spec: str, dtype: torch.dtype = torch.float32, ignore: tuple[str, ...] = ()):
    """``load_model``, any failure a ConfigError naming the key ``model`` (or ``ignore``, for
    a pattern that matches no Linear of the model): a directory without a config, a garbled
    weights file or an unsupported family all fail before any node is contacted."""
    try:
        # decoder layers stay on disk until used
        return load_model(spec, dtype=dtype, lazy=True, ignore=ignore)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers and safetensors raise anything
        message = str(error)
        if not message.startswith(("model:", "ignore:")):
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
    check_secure_recovery_upload(config, model)


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
                message = str(error).removeprefix("calib-data: ")
                raise ConfigError(f"calib-data: {node.name}: {message}") from error


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
