"""A bench-only ClientApp whose replies are SYNTHESISED, not pruned: for server benchmarks.

Real SparseGPT clients on a 7B model take hours on a small CPU machine, and a benchmark of the
server's memory needs only what the server receives. This ClientApp answers the messages the
real one (``client_app/app.py``) answers in the default run mode, with replies of exactly the
shape and size an honest SparseGPT client sends there; their contents are made up:

- ``query`` (resources): the real handler, ``client_app.app.resources``.
- ``train.layerwise``: the reply ``train_layerwise`` builds (records ``PAYLOAD_KEY``,
  ``RESOLVED_KEY`` and ``"metrics"``; empty payloads when this node has no layer to prune or
  re-solve this round), from:

  - prune round (``step.prune``): keep-masks, and with ``RunConfig.sends_pruned_values`` (the
    default mode) the pruned matrices' kept values in the wire dtype (int8 codes and a scale
    per mask row by default), as ``client_app.task.encode_pruned`` sends them. Each matrix's
    mask is the magnitude mask at the run's pattern (``get_pruner("magnitude")``) of
    ``|W| * (1 + 0.05 * noise)``, the noise seeded per (run seed, node, matrix), so the
    clients' masks differ a little, as SparseGPT's do; its kept values are the dense ones times
    ``(1 + 1e-3 * noise)``. With ``lean-uplink`` the payload carries the masks only, and
    (``RunConfig.sends_column_norms``) the ``RESOLVED_KEY`` payload of a prune round carries,
    per pruned matrix, no values (count 0, float16) and the client's input energy per column
    ``Σ x_j²`` (float32, one per input column), which the server uses to break the mask
    expansion's ties: here ``tokens x exp(0.5 noise)``, positive and seeded;
  - re-solve round (``step.resolve``, masks under ``MASKS_KEY``): the dense values under the
    given mask times ``(1 + 1e-3 * noise)``, cast to the wire dtype with
    ``client_app.task.to_wire``, encoded with ``encode_values`` (no column weights in a re-solve
    reply: the default ``resolve-weighting`` is uniform). They are well inside the server's
    plausibility bound (``fedspallm_strategy/merge/plausibility.py``), as honest values are.

The model loads lazily, one decoder layer's tensors at a time (``layer_tensors``), like the
real client's; nothing is calibrated, so the step's start, keep-from and advance layers are
read and checked but need no work. Settings that change what an honest client sends (an owl
profile, per-column weights, the clients' own perplexities) are refused rather than faked.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import prepare_process
from client_app.app import resources as real_resources
from client_app.task import to_wire
from fedspallm_strategy.config import NodeConfig, RunConfig, load_shard
from fedspallm_strategy.wire.payload import decode, encode
from fedspallm_strategy.wire.protocol import (
    MASKS_KEY,
    PAYLOAD_KEY,
    RESOLVED_KEY,
    SPEC_KEY,
    STEP_KEY,
    bytes_record,
    record_bytes,
    request_from_record,
    request_sparsities,
)
from fedspallm_strategy.wire.round_plan import RoundStep
from fedspallm_strategy.wire.values_payload import encode_values
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import layer_tensors
from llm_pruning.models import load_model
from llm_pruning.pruners import get_pruner

MASK_NOISE = 0.05  # relative perturbation of |W| before the magnitude mask: masks differ a bit
VALUE_NOISE = 1e-3  # relative change of the re-solved values from the dense ones

app = ClientApp()
app.query()(real_resources)


def _generator(seed: int, node: str, name: str, kind: str) -> torch.Generator:
    """A generator seeded by (run seed, node, matrix, kind): stable across processes."""
    digest = hashlib.sha256(f"{seed}:{node}:{name}:{kind}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _refuse_unsupported(config: RunConfig, sparsities) -> None:
    """Settings under which an honest client would send more, or other, than this one."""
    problems = []
    if sparsities is not None:
        problems.append("an owl profile (per-layer sparsities)")
    if config.resolve_weighting != "uniform":
        problems.append(f"resolve-weighting={config.resolve_weighting} (column weights)")
    if config.clients_score_standalone:
        problems.append("standalone-eval: the clients would score their own models")
    if problems:
        raise ValueError(
            "synthetic replies cover the default mode only, not: " + "; ".join(problems)
        )


def synthetic_pruned(
    model, layers: tuple[int, ...], config: RunConfig, node: str
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """Pruned matrices of ``layers``: their kept values in the wire dtype (None when the prune
    round sends masks only) and their keep-masks, the magnitude masks at the run's pattern of
    ``|W| (1 + 0.05 noise)``; kept values are ``W (1 + 1e-3 noise)`` there, zero elsewhere."""
    pruner, pattern = get_pruner("magnitude"), config.sparsity_pattern
    values: dict[str, torch.Tensor] | None = {} if config.sends_pruned_values else None
    masks = {}
    for layer in layers:
        tensors = layer_tensors(model, layer)  # this layer only, read from disk
        for name in prunable_weights(model, layer):
            weight = tensors[name]
            noise = torch.randn(weight.shape, generator=_generator(config.seed, node, name, "mask"))
            score = weight.float().mul_(noise.mul_(MASK_NOISE).add_(1.0))
            del noise
            _, masks[name] = pruner.prune(score, None, pattern)
            del score
            if values is not None:
                noise = torch.randn(
                    weight.shape, generator=_generator(config.seed, node, name, "prune")
                )
                pruned = weight.float().mul_(noise.mul_(VALUE_NOISE).add_(1.0)).mul_(masks[name])
                del noise
                values[name] = to_wire(pruned, config.wire_dtype(weight.dtype))
                del pruned
        del tensors
    return values, masks


def synthetic_values(
    model, layers: tuple[int, ...], masks: dict[str, torch.Tensor], config: RunConfig, node: str
) -> dict[str, torch.Tensor]:
    """Re-solved kept values of ``layers``: dense ``W[mask] (1 + 1e-3 noise)`` in the wire
    dtype (``to_wire``, as ``client_app.task.wire_values`` casts them)."""
    values = {}
    for layer in layers:
        tensors = layer_tensors(model, layer)
        for name in prunable_weights(model, layer):
            weight = tensors[name]
            kept = weight[masks[name]].float()
            noise = torch.randn(
                kept.shape, generator=_generator(config.seed, node, name, "resolve")
            )
            kept.mul_(noise.mul_(VALUE_NOISE).add_(1.0))
            del noise
            values[name] = to_wire(kept, config.wire_dtype(weight.dtype))
            del kept
        del tensors
    return values


def synthetic_column_norms(
    model, layers: tuple[int, ...], tokens: int, config: RunConfig, node: str
) -> dict[str, torch.Tensor]:
    """Per pruned matrix, a client's ``Σ x_j²`` per input column (``diag X^T X``, float32):
    ``tokens x exp(0.5 noise)``, positive as real input energies are."""
    norms = {}
    for layer in layers:
        for name, linear in prunable_weights(model, layer).items():
            noise = torch.randn(
                linear.in_features, generator=_generator(config.seed, node, name, "norms")
            )
            norms[name] = noise.mul_(0.5).exp_().mul_(float(tokens))
    return norms


def _given_masks(model, data: bytes | None, layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The server's masks for ``layers``, as the real client checks them (names, shapes)."""
    if not layers:
        return {}
    if data is None:
        raise ValueError(f"the message asks to re-solve layers {list(layers)} but carries no masks")
    _, masks = decode(data)
    expected = {
        name: tuple(linear.weight.shape)
        for layer in layers
        for name, linear in prunable_weights(model, layer).items()
    }
    if {name: tuple(mask.shape) for name, mask in masks.items()} != expected:
        raise ValueError("the masks sent are not those of the layers to re-solve")
    return masks


@app.train("layerwise")
def train_layerwise(msg: Message, context: Context) -> Message:
    """This node's part of one layer-wise round, synthesised (module docstring)."""
    prepare_process()
    start = time.perf_counter()
    config, layer_ids = request_from_record(msg.content[SPEC_KEY])
    step = RoundStep.from_dict(dict(msg.content.config_records[STEP_KEY]))
    if list(step.prune) != layer_ids:
        raise ValueError(f"the step prunes {list(step.prune)}, the spec names {layer_ids}")
    _refuse_unsupported(config, request_sparsities(msg.content[SPEC_KEY]))
    node = NodeConfig.from_mapping(context.node_config)
    who = str(context.node_config.get("partition-id", context.node_id))
    cache = Path(node.cache_dir).expanduser() if node.cache_dir else None
    model, tokenizer = load_model(
        config.model, dtype=config.torch_dtype, cache=cache, lazy=True, ignore=config.ignore
    )
    total = num_layers(model)
    if any(layer >= total for layer in (*step.prune, *step.resolve)):
        raise ValueError(f"the step names layers beyond the model's {total}")
    segments = int(load_shard(config, node, tokenizer).shape[0])
    given = _given_masks(model, record_bytes(msg.content, MASKS_KEY), step.resolve)
    resolved = synthetic_values(model, step.resolve, given, config, who)
    int8_masks = given if config.int8_wire else None  # the encoder quantises per mask row
    column_weights = {}
    if config.sends_column_norms:  # the pruned matrices: no values, their Σ x_j² per column
        empty = torch.zeros(0, dtype=torch.float16)
        column_weights = synthetic_column_norms(
            model, step.prune, segments * config.seqlen, config, who
        )
        resolved.update(dict.fromkeys(column_weights, empty))
    resolved_payload = encode_values(resolved, column_weights, int8_masks=int8_masks)
    del resolved, column_weights, given, int8_masks
    pruned, masks = synthetic_pruned(model, step.prune, config, who)
    payload = encode(pruned, masks, int8=config.int8_wire)
    del pruned, masks
    seconds = round(time.perf_counter() - start, 3)
    metrics = {
        "num-examples": segments,
        "layers": len(step.prune),
        "layers-resolved": len(step.resolve),
        "payload-bytes": len(payload) + len(resolved_payload),
        "seconds": seconds,
        "synthetic": 1,  # provenance: these replies were synthesised, not pruned
    }
    content = RecordDict(
        {
            PAYLOAD_KEY: bytes_record(payload),
            RESOLVED_KEY: bytes_record(resolved_payload, RESOLVED_KEY),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=msg)
