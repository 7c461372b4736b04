"""The ClientApp: each organisation prunes its assigned layers on its own private text."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from client_app.exact_task import collect_statistics, exact_statistics
from client_app.layerwise_task import run_round
from client_app.profile_task import profile_layers
from client_app.recovery_task import SecurePart, recover_global, recover_global_secure
from client_app.running_inputs import state_dir
from client_app.task import prune_layers
from fedspallm_strategy.config import NodeConfig
from fedspallm_strategy.run.allocator import return_freed_memory
from fedspallm_strategy.run.logs import share_flower_handlers
from fedspallm_strategy.wire.protocol import (
    DELTAS_KEY,
    EXACT_KEY,
    GLOBAL_KEY,
    MASKS_KEY,
    PAYLOAD_KEY,
    PREVIOUS_KEY,
    PROFILE_KEY,
    RECOVERY_KEY,
    RESOLVED_KEY,
    SPEC_KEY,
    STEP_KEY,
    bytes_record,
    record_bytes,
    request_from_fitins,
    request_from_record,
    request_sparsities,
)
from fedspallm_strategy.wire.round_plan import RoundStep
from fedspallm_strategy.wire.secure_encoding import secure_vectors

app = ClientApp()


def prepare_process() -> None:
    """Once per process, whatever message comes first: our logs on Flower's handlers, and
    freed tensor memory handed back to the system (``run/allocator.py``)."""
    share_flower_handlers()
    return_freed_memory()


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Route Flower's SecAgg+ messages through ``secaggplus_mod`` to :func:`train_secure`.

    The SecAgg+ workflow sends plain ``train`` messages, which carry its config record; every
    other ``train`` message goes on to the FedSpaLLM handler untouched.
    """
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, train_secure)
    return call_next(msg, context)


@app.query()
def resources(msg: Message, context: Context) -> Message:
    """Tell the server what this node can do, before it draws the layer assignment.

    A bad node config (a bad value, or an unknown key such as ``layer_budget`` for
    ``layer-budget``) raises here, naming it: Flower sends the server an error reply with
    the message, and the server leaves this node out of the run.
    """
    node = NodeConfig.from_mapping(context.node_config)
    record = ConfigRecord(
        {key: value for key, value in node.as_dict().items() if value is not None}
    )
    return Message(RecordDict({"resources": record}), reply_to=msg)


@app.train(mods=[secure_mod])
def train(msg: Message, context: Context) -> Message:
    """Prune the layers named in the message; reply with one safetensors payload."""
    prepare_process()
    config, layer_ids = request_from_record(msg.content[SPEC_KEY])
    node = NodeConfig.from_mapping(context.node_config)
    sparsities = request_sparsities(msg.content[SPEC_KEY])
    reply = prune_layers(config, node, layer_ids, sparsities)
    content = RecordDict(
        {PAYLOAD_KEY: bytes_record(reply.payload), "metrics": MetricRecord(reply.metrics)}
    )
    if sparsities is None and reply.sparsities is not None:  # standalone: its own profile
        own = [reply.sparsities[layer] for layer in layer_ids]
        content[PROFILE_KEY] = ConfigRecord({"layer-sparsities": own})
    return Message(content, reply_to=msg)


@app.train("profile")
def train_profile(msg: Message, context: Context) -> Message:
    """sparsity-profile='owl': this node's profile of the dense model (outlier counts per
    layer, or exact's column-norm statistics of every layer)."""
    prepare_process()
    config, _ = request_from_record(msg.content[SPEC_KEY])
    request = msg.content.config_records[PROFILE_KEY]
    shared = [group.split(",") for group in request.get("shared", [])]
    reply = profile_layers(
        config, NodeConfig.from_mapping(context.node_config), str(request["kind"]), shared
    )
    content = RecordDict({"metrics": MetricRecord(reply.metrics)})
    if reply.payload:
        content[PAYLOAD_KEY] = bytes_record(reply.payload)
    else:
        content[PROFILE_KEY] = ConfigRecord({"outliers": reply.outliers, "totals": reply.totals})
    return Message(content, reply_to=msg)


@app.train("layerwise")
def train_layerwise(msg: Message, context: Context) -> Message:
    """Layer-wise FedSpaLLM: this node's part of one round (advance, re-solve, prune)."""
    prepare_process()
    config, layer_ids = request_from_record(msg.content[SPEC_KEY])
    step = RoundStep.from_dict(dict(msg.content.config_records[STEP_KEY]))
    if list(step.prune) != layer_ids:
        raise ValueError(f"the step prunes {list(step.prune)}, the spec names {layer_ids}")
    reply = run_round(
        config,
        NodeConfig.from_mapping(context.node_config),
        step,
        run_id=context.run_id,
        masks=record_bytes(msg.content, MASKS_KEY),
        global_layers=record_bytes(msg.content, GLOBAL_KEY),
        sparsities=request_sparsities(msg.content[SPEC_KEY]),
    )
    content = RecordDict(
        {
            PAYLOAD_KEY: bytes_record(reply.payload),
            RESOLVED_KEY: bytes_record(reply.resolved, RESOLVED_KEY),
            "metrics": MetricRecord(reply.metrics),
        }
    )
    return Message(content, reply_to=msg)


@app.train("recover")
def train_recover(msg: Message, context: Context) -> Message:
    """A recovery round: fine-tune the global sparse model on this node's shard, keeping its
    zeros; reply with the kept values' changes."""
    prepare_process()
    reply = recover_global(*_recovery_request(msg.content, context))
    content = RecordDict(
        {
            DELTAS_KEY: bytes_record(reply.deltas, DELTAS_KEY),
            "metrics": MetricRecord(reply.metrics),
        }
    )
    return Message(content, reply_to=msg)


@app.train("exact")
def train_exact(msg: Message, context: Context) -> Message:
    """Strategy exact: advance through last round's pruned global layers, send statistics."""
    prepare_process()
    reply = exact_statistics(**_exact_request(msg.content, context))
    content = RecordDict(
        {PAYLOAD_KEY: bytes_record(reply.payload), "metrics": MetricRecord(reply.metrics)}
    )
    return Message(content, reply_to=msg)


def train_secure(msg: Message, context: Context) -> Message:
    """Secure aggregation (strategy exact): a layer round's statistics, or a recovery round's
    changes, as FitRes parameters, which ``secaggplus_mod`` quantises and masks before
    anything leaves the node."""
    prepare_process()
    content, settings = request_from_fitins(recorddict_to_fitins(msg.content, keep_input=True))
    clip = float(settings["clipping-range"])
    if RECOVERY_KEY in content.config_records:
        vectors, metrics = _secure_recovery(content, context, clip)
    else:
        entries, exact_metrics = collect_statistics(**_exact_request(content, context))
        vectors = secure_vectors(
            entries, count=int(settings["tokens"]), clip=clip, q=int(settings["quantization-range"])
        )
        metrics = {"seconds": exact_metrics["seconds"], "layers": exact_metrics["layers"]}
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(vectors),
        num_examples=1,  # equal weights: the plain mean (exact multiplies it back to the sum)
        metrics=metrics,
    )
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _secure_recovery(content: RecordDict, context: Context, clip: float) -> tuple[list, dict]:
    """One part of a secure recovery round: its changes as SecAgg+ vectors, and metrics."""
    recovery = content.config_records[RECOVERY_KEY]
    part = SecurePart(int(recovery["part"]), int(recovery["parts"]), list(recovery["names"]))
    config, node, global_layers, recovery_round = _recovery_request(
        content, context, need_model=part.index == 0
    )
    folder = state_dir(node, context.run_id, "recovery")
    return recover_global_secure(config, node, global_layers, recovery_round, part, folder, clip)


def _recovery_request(content: RecordDict, context: Context, need_model: bool = True) -> tuple:
    """A recovery request's run config, this node, the global model (None where not
    ``need_model``) and the recovery round (from 1, which picks the node's windows)."""
    config, _ = request_from_record(content[SPEC_KEY])
    global_layers = record_bytes(content, GLOBAL_KEY)
    if global_layers is None and need_model:
        raise ValueError("the recovery message carries no global model")
    recovery_round = content.config_records.get(RECOVERY_KEY, {}).get("round")
    if not isinstance(recovery_round, int):
        raise ValueError(f"the recovery message's round must be an integer, got {recovery_round!r}")
    return config, NodeConfig.from_mapping(context.node_config), global_layers, recovery_round


def _exact_request(content: RecordDict, context: Context) -> dict:
    """The keyword arguments of the exact task, from a request's records."""
    config, layer_ids = request_from_record(content[SPEC_KEY])
    exact = content.config_records[EXACT_KEY]
    return dict(
        config=config,
        node=NodeConfig.from_mapping(context.node_config),
        run_id=context.run_id,
        layer_ids=layer_ids,
        shared=[group.split(",") for group in exact["shared"]],
        previous_layers=list(exact["previous-layers"]),
        previous=record_bytes(content, PREVIOUS_KEY),
    )
