"""A client's side of the OWL profile round, without Flower: one pass over the dense model.

``sparsity-profile='owl'`` starts a run with this round. The node runs its calibration
segments through the dense model layer by layer (the engine's calibrator, Wanda's column-norm
statistics) and replies with either

- ``counts``: per decoder layer, how many Wanda scores exceed ``owl-m`` x the layer's mean,
  and how many scores there are (the server sums both over the clients); or
- ``statistics`` (strategy ``exact``): the column-norm sums of every layer themselves, one
  copy per group of Linears sharing an input, so the server's profile is that of the pooled
  data, as ``centralized`` computes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from client_app.exact_task import _shared
from fedspallm_strategy.config import NodeConfig, RunConfig, load_shard, node_device
from fedspallm_strategy.wire.stats_payload import encode_statistics
from llm_pruning.engine import LayerwiseCalibrator
from llm_pruning.families import family_of
from llm_pruning.models import load_model
from llm_pruning.owl import dense_statistics, layer_outliers

log = logging.getLogger(__name__)

PROFILE_KINDS = ("counts", "statistics")


@dataclass
class ProfileReply:
    outliers: list[int]  # counts: per layer (empty for statistics)
    totals: list[int]
    payload: bytes  # statistics: encode_statistics of every layer (empty for counts)
    metrics: dict[str, float | int]


def profile_layers(
    config: RunConfig, node: NodeConfig, kind: str, shared: Sequence[Sequence[str]] = ()
) -> ProfileReply:
    """This node's profile reply of ``kind`` (``shared``: exact's shared-input groups)."""
    if kind not in PROFILE_KINDS:
        raise ValueError(f"profile kind must be one of {', '.join(PROFILE_KINDS)}; got {kind!r}")
    start = time.perf_counter()
    cache = Path(node.cache_dir).expanduser() if node.cache_dir else None
    model, tokenizer = load_model(
        config.model, dtype=config.torch_dtype, cache=cache, lazy=True, ignore=config.ignore
    )
    segments = load_shard(config, node, tokenizer)
    calibrator = LayerwiseCalibrator(model, segments, node_device(config, node))
    outliers, totals, entries = [], [], {}
    family = family_of(model)
    for index, stats, weights in dense_statistics(calibrator):
        if kind == "counts":
            count, total = layer_outliers(weights, stats, config.owl_m)
            outliers.append(count)
            totals.append(total)
        else:
            entries.update(_shared(stats, family.layer_prefix(index), shared))
    payload = encode_statistics(entries) if kind == "statistics" else b""
    log.info("owl profile (%s) of %d segments", kind, segments.shape[0])
    metrics = {
        "num-examples": int(segments.shape[0]),
        "tokens": int(segments.numel()),
        "payload-bytes": len(payload),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return ProfileReply(outliers, totals, payload, metrics)
