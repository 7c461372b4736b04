"""The ClientApp: each organisation prunes its assigned layers on its own private text."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.task import prune_layers
from fedspallm_strategy.config import NodeConfig
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
