"""The ClientApp: each organisation prunes its assigned layers on its own private text."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.exact_task import exact_statistics
from client_app.task import prune_layers
from fedspallm_strategy.config import NodeConfig
from fedspallm_strategy.exact import EXACT_KEY, PREVIOUS_KEY
from fedspallm_strategy.logs import share_flower_handlers
from fedspallm_strategy.strategy import PAYLOAD_KEY, SPEC_KEY, request_from_record

app = ClientApp()


@app.query()
def resources(msg: Message, context: Context) -> Message:
    """Tell the server what this node can do, before it draws the layer assignment."""
    node = NodeConfig.from_mapping(context.node_config)
    record = ConfigRecord(
        {key: value for key, value in node.as_dict().items() if value is not None}
    )
    return Message(RecordDict({"resources": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Prune the layers named in the message; reply with one safetensors payload."""
    share_flower_handlers()
    config, layer_ids = request_from_record(msg.content[SPEC_KEY])
    node = NodeConfig.from_mapping(context.node_config)
    reply = prune_layers(config, node, layer_ids)
    payload = Array(np.frombuffer(reply.payload, dtype=np.uint8))  # 1-D: Flower chunks it
    content = RecordDict(
        {PAYLOAD_KEY: ArrayRecord({PAYLOAD_KEY: payload}), "metrics": MetricRecord(reply.metrics)}
    )
    return Message(content, reply_to=msg)


@app.train("exact")
def train_exact(msg: Message, context: Context) -> Message:
    """Strategy exact: advance through last round's pruned global layers, send statistics."""
    share_flower_handlers()
    config, layer_ids = request_from_record(msg.content[SPEC_KEY])
    exact = msg.content.config_records[EXACT_KEY]
    previous = msg.content.array_records.get(PREVIOUS_KEY)
    reply = exact_statistics(
        config,
        NodeConfig.from_mapping(context.node_config),
        run_id=context.run_id,
        layer_ids=layer_ids,
        shared=[group.split(",") for group in exact["shared"]],
        previous_layers=list(exact["previous-layers"]),
        previous=previous[PREVIOUS_KEY].numpy().tobytes() if previous is not None else None,
    )
    payload = Array(np.frombuffer(reply.payload, dtype=np.uint8))
    content = RecordDict(
        {PAYLOAD_KEY: ArrayRecord({PAYLOAD_KEY: payload}), "metrics": MetricRecord(reply.metrics)}
    )
    return Message(content, reply_to=msg)
