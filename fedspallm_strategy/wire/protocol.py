"""The wire protocol that the ClientApp and the strategies share.

What a message is called and where each part of it lives: message types (routed to the
ClientApp's handlers), record keys, the train request (the pruning spec and the node's
layers), and the one layout of bytes in a record. The payloads inside those records have
their own codecs, which both sides run too: ``payload.py`` (pruned layers),
``stats_payload.py`` (exact's statistics), ``values_payload.py`` (re-solved values) and
``secure_encoding.py`` (exact under SecAgg+). The ClientApp imports these and nothing of the
server's strategies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import FitIns, Parameters

from fedspallm_strategy.config import RunConfig
from llm_pruning.owl import check_layer_sparsities

# Message types: "train" goes to @app.train(), "train.<name>" to @app.train("<name>").
LAYERWISE_MESSAGE_TYPE = "train.layerwise"
EXACT_MESSAGE_TYPE = "train.exact"
PROFILE_MESSAGE_TYPE = "train.profile"  # sparsity-profile='owl': the dense profile round
RECOVERY_MESSAGE_TYPE = "train.recover"  # recovery-rounds: fine-tune the global sparse model

SPEC_KEY = "spec"  # ConfigRecord of a train message: pruning spec + layer ids
PAYLOAD_KEY = "payload"  # ArrayRecord/Array of a train reply: the safetensors bytes
STEP_KEY = "step"  # ConfigRecord: this node's part of a layer-wise round (RoundStep.as_dict)
MASKS_KEY = "masks"  # ArrayRecord/Array: mask-only payload of the layers to re-solve
GLOBAL_KEY = "global"  # ArrayRecord/Array: merged matrices of the layers to advance through
RESOLVED_KEY = "resolved"  # ArrayRecord/Array of a reply: the re-solved kept values
DELTAS_KEY = "deltas"  # ArrayRecord/Array of a recovery reply: the kept values' changes
RECOVERY_KEY = "recovery"  # ConfigRecord of a recovery request: {"round": k}, k from 1
EXACT_KEY = "exact"  # ConfigRecord: shared-input groups and the previous round's layers
PREVIOUS_KEY = "previous"  # ArrayRecord/Array: the previous round's pruned global matrices
# ConfigRecord: of a profile request, its kind ('counts' | 'statistics') and shared groups;
# of a 'counts' reply, the per-layer outlier counts and score totals ('outliers', 'totals')
PROFILE_KEY = "profile"
LAYER_SPARSITIES = "layer-sparsities"  # in a spec: the sparsity of each of its layers (owl)
# A reply's metric: the perplexity of the client's own pruned model on eval-data source i.
STANDALONE_METRIC = "standalone-perplexity-{}"
# The same after the client fine-tuned its own model (a run with recovery-rounds).
STANDALONE_RECOVERED_METRIC = "standalone-recovered-perplexity-{}"
# exact + SecAgg+: a request (a layer round's, or a recovery round's) travels as legacy FitIns.
REQUEST_KEY = "fedspallm-exact"  # FitIns config: the request's config records as JSON
TENSOR_TYPE = "fedspallm/pruned-layers"  # FitIns parameters: the request's layers
# The byte records a SecAgg+ request may carry (at most one): exact's previous layers, or the
# global model a recovery round fine-tunes.
FITINS_BYTES = (PREVIOUS_KEY, GLOBAL_KEY)

# The run-config keys a client needs to prune; everything else stays on the server.
CLIENT_KEYS = (
    "model",
    "dtype",
    "ignore",
    "strategy",
    "resolve",
    "resolve-weighting",
    "pruner",
    "reconstruction",
    "sparsity",
    "pattern",
    "calib-data",
    "partition",
    "calib-samples",
    "seqlen",
    "seed",
    "device",
    "sparsity-profile",
    "owl-m",
    "owl-lambda",
    "payload-dtype",
    "keep-replies",
    "lean-uplink",
    # A client that prunes every layer while its values stay home scores its own model.
    "standalone-eval",
    "eval-data",
    "eval-windows",
    # With recovery, that client also recovers its own model, for as many steps in all.
    "recovery-rounds",
    "recovery-method",
    "recovery-steps",
    "recovery-lr",
    "recovery-samples",
    "recovery-windows",
    "recovery-distill",
)


def request_record(
    config: RunConfig, layer_ids: list[int], sparsities: Mapping[int, float] | None = None
) -> ConfigRecord:
    """The spec of a train message; ``sparsities`` (layer -> sparsity) of an owl run."""
    settings = config.as_dict()
    # A list key (ignore) travels as the comma-separated string a user writes: parsed back
    # by RunConfig like a run config.
    values = {
        key: ",".join(value) if isinstance(value, tuple) else value
        for key, value in ((key, settings[key]) for key in CLIENT_KEYS)
    }
    if sparsities is not None:
        values[LAYER_SPARSITIES] = [float(sparsities[layer]) for layer in layer_ids]
    return ConfigRecord({**values, "layers": layer_ids})


def request_from_record(record: ConfigRecord) -> tuple[RunConfig, list[int]]:
    """The client's side of :func:`request_record`, validated like a run config."""
    values = dict(record)
    values.pop(LAYER_SPARSITIES, None)  # read by request_sparsities
    layers = values.pop("layers", None)
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"train message: 'layers' must be a list of layer ids, got {layers!r}")
    return RunConfig.from_mapping(values), layers


def request_sparsities(record: ConfigRecord) -> dict[int, float] | None:
    """Layer -> sparsity of the spec's layers, checked; None when the spec has none
    (uniform: every matrix at ``sparsity``)."""
    values = dict(record)
    if LAYER_SPARSITIES not in values:
        return None
    _, layers = request_from_record(record)
    sparsities = check_layer_sparsities(values[LAYER_SPARSITIES], len(layers))
    return dict(zip(layers, sparsities, strict=True))


def bytes_record(data: bytes, key: str = PAYLOAD_KEY) -> ArrayRecord:
    """``data`` as one 1-D uint8 array named ``key`` (1-D: Flower chunks it)."""
    return ArrayRecord({key: Array(np.frombuffer(data, dtype=np.uint8))})


def record_bytes(content: RecordDict, key: str) -> bytes | None:
    """The bytes :func:`bytes_record` put under ``key`` in a request, or None. (The client's
    side: requests come from the server it chose to join. The server reads replies with
    ``replies.reply_bytes``, which trusts nothing.)"""
    record = content.array_records.get(key)
    return None if record is None else record[key].numpy().tobytes()


def request_to_fitins(content: RecordDict, secure: Mapping[str, float | int]) -> FitIns:
    """A request's config records (exact's spec and groups, or a recovery round's spec and
    round) and its one byte record, plus the encoding settings."""
    records = {key: dict(record) for key, record in content.config_records.items()}
    present = [key for key in FITINS_BYTES if key in content.array_records]
    if len(present) > 1:
        raise ValueError(f"a SecAgg+ request carries one byte record, this one {present}")
    request = {"records": records, "bytes": present[0] if present else None, "secure": dict(secure)}
    tensors = [record_bytes(content, key) for key in present]
    return FitIns(Parameters(tensors, TENSOR_TYPE), {REQUEST_KEY: json.dumps(request)})


def part_request(content: RecordDict, index: int, parts: int, names: list[str]) -> RecordDict:
    """A secure recovery round's request for part ``index`` of ``parts``: the round's spec and
    number, the part's place and matrices, and the global model in the first part only (the
    node keeps its changes for the later ones)."""
    recovery = {**dict(content[RECOVERY_KEY]), "part": index, "parts": parts, "names": names}
    request = RecordDict({SPEC_KEY: content[SPEC_KEY], RECOVERY_KEY: ConfigRecord(recovery)})
    if index == 0:
        request[GLOBAL_KEY] = content[GLOBAL_KEY]
    return request


def request_from_fitins(fitins: FitIns) -> tuple[RecordDict, dict]:
    """The client's side of :func:`request_to_fitins`: ``(the request's content, settings)``."""
    request = json.loads(str(fitins.config[REQUEST_KEY]))
    content = RecordDict({key: ConfigRecord(record) for key, record in request["records"].items()})
    key = request["bytes"]
    if key is not None:
        if key not in FITINS_BYTES or len(fitins.parameters.tensors) != 1:
            raise ValueError(f"a SecAgg+ request names byte record {key!r} it does not carry")
        content[key] = bytes_record(fitins.parameters.tensors[0], key)
    return content, request["secure"]
