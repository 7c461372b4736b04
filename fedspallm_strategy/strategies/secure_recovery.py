"""Recovery rounds under secure aggregation: the server learns only the mean change.

With ``secure-aggregation = true`` (strategy ``exact``) the statistics of every layer round go
through SecAgg+, and so do the recovery rounds after them: a client's fine-tuning changes say
as much about its text as its statistics do. Each round is ``recovery_rounds.py``'s, with the
replies replaced by one SecAgg+ workflow (``secagg_workflow.py``):

1. Down, in the clear as in any round: the global model and the recovery round's number.
2. On the node: the same fine-tuning; up, each kept value's change, masked. The encoding
   (``secure_encoding.delta_vectors``) clips nothing: a change beyond the range fails the
   client, which is left out of the round.
3. The server unmasks the mean of the clients that completed the protocol and adds it to its
   model; the sparsity is kept exactly as in a plain round. A mean outside the range (which
   only values a client masked off the grid can give) is refused whole, logged, and the
   model stays as it was.

What changes against plain replies:

- The range is the bound plain replies are checked against (``change_limit``: the most
  ``recovery-steps`` AdamW steps at ``recovery-lr`` move one entry), so a client can move the
  mean by at most that over K per entry, as a plain reply that passes the check can. The
  server cannot check one client's reply, so ``aggregation`` is the mean (``exact`` has no
  other rule) and ``recovery-method`` is ``masked``: a ``lora`` update has no such bound.
- Each kept value goes up as one int64 (Flower's masked vectors), 8 B where int8 plain
  replies take about 1 B, in one message per client and round that Flower does not chunk: a
  run whose upload exceeds ``max-payload-mb`` is refused before any work
  (:func:`check_secure_recovery_upload`; SmolLM2-135M at 50 % sends about 405 MiB).
- Only each client's time and token count travel in the clear, not its training loss.
- A round needs two clients, and a majority of the round's clients must complete it
  (``secagg_workflow.py``). A round without them leaves the model as it was and the run goes
  on, as a plain round with no valid reply does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from flwr.serverapp import Grid

from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.strategies.recovery_rounds import (
    apply_mean,
    change_limit,
    recovery_requests,
    run_recovery_rounds,
)
from fedspallm_strategy.strategies.secagg_workflow import run_secure_round
from fedspallm_strategy.wire.protocol import request_to_fitins
from fedspallm_strategy.wire.secure_encoding import (
    deltas_from_secure_mean,
    masked_bytes,
    quantization_range,
)
from llm_pruning.families import num_layers, prunable_weights

log = logging.getLogger(__name__)

MIB = 2**20


def check_secure_recovery_upload(config: RunConfig, model) -> None:
    """Refuse, before any work, a run whose masked recovery upload (one int64 per kept
    weight, one message per client and round) exceeds ``max-payload-mb``."""
    if not (config.secure_aggregation and config.recovery_rounds):
        return
    pattern, counts = config.sparsity_pattern, []
    for layer in range(num_layers(model)):
        for linear in prunable_weights(model, layer).values():
            numel = linear.weight.numel()
            kept = (
                numel * pattern.n // pattern.m if pattern.is_nm else numel * (1 - config.sparsity)
            )
            counts.append(math.ceil(kept))
    upload = masked_bytes(counts)
    if upload > config.max_payload_mb * MIB:
        raise ConfigError(
            f"recovery-rounds with secure-aggregation: each client would upload about "
            f"{upload / MIB:.1f} MiB per recovery round (8 B for each of {sum(counts)} kept "
            f"weights, in one message), over max-payload-mb={config.max_payload_mb:g}. Raise "
            "max-payload-mb (Flower's gRPC messages stop at 2 GiB), or recover without "
            "secure-aggregation (int8 changes, about 1 B a weight)"
        )


def run_secure_recovery_rounds(
    strategy, grid: Grid, timeout: float, evaluate: Callable[[], dict] | None = None
) -> list[dict]:
    """:func:`~fedspallm_strategy.strategies.recovery_rounds.run_recovery_rounds`, each round
    through SecAgg+."""
    return run_recovery_rounds(strategy, grid, timeout, evaluate, play=secure_recovery_round)


def secure_recovery_round(strategy, grid: Grid, timeout: float, server_round: int) -> dict:
    """One recovery round through SecAgg+; its report entry."""
    config, accounting = strategy.config, strategy.accounting
    accounting.start_round(server_round)
    entry = {"round": server_round, "clients": 0}
    nodes = sorted(grid.get_node_ids())
    if len(nodes) < 2:
        log.warning(
            "recovery round %d: only node %s is left; the mean of one client's changes would "
            "be its changes, so the model is unchanged",
            server_round,
            nodes,
        )
        return entry
    masks, messages = recovery_requests(strategy, server_round, nodes)
    counts = {name: int(mask.sum()) for name, mask in masks.items()}
    clip, q = change_limit(config), quantization_range(len(nodes))
    secure = {"clipping-range": clip, "quantization-range": q}
    log.info(
        "recovery round %d: fine-tuning on %d nodes, secure aggregation (range %.3g)",
        server_round,
        len(nodes),
        clip,
    )
    result = run_secure_round(
        grid,
        {m.metadata.dst_node_id: request_to_fitins(m.content, secure) for m in messages},
        server_round,
        clipping_range=clip,
        quantization_range=q,
        timeout=timeout,
    )
    for node in sorted(set(nodes) - set(result.contributors)):
        reason = f"client error: {result.errors[node]}" if node in result.errors else "no reply"
        accounting.reject(server_round, node, [], f"secure aggregation: {reason}")
    try:
        if result.mean is None:
            raise ValueError(
                f"fewer than a majority of the {len(nodes)} nodes completed secure aggregation"
            )
        mean = deltas_from_secure_mean(result.mean, counts, clip, q)
    except ValueError as error:
        log.warning("recovery round %d: %s; the model is unchanged", server_round, error)
        entry["refused"] = str(error)
        return entry
    upload = masked_bytes([counts[name] for name in sorted(counts)])
    for node in result.contributors:
        accounting.add_up(node, upload)
        accounting.add_metrics(node, result.metrics.get(node, {}))
    entry["clients"] = len(result.contributors)
    entry["largest-relative-change"] = round(apply_mean(strategy.model, mean, masks), 6)
    return entry
