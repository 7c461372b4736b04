"""Recovery rounds under secure aggregation: the server learns only the mean change.

With ``secure-aggregation = true`` (strategy ``exact``) the statistics of every layer round go
through SecAgg+, and so do the recovery rounds after them: a client's fine-tuning changes say
as much about its text as its statistics do. Each round is ``recovery_rounds.py``'s, with the
replies replaced by SecAgg+ workflows (``secagg_workflow.py``), one per part (below):

1. Down, in the clear as in any round: the global model and the recovery round's number.
2. On the node: the same fine-tuning; up, each kept value's change, masked. The encoding
   (``secure_encoding.delta_vectors``) clips nothing: a change beyond the range fails the
   client, which is left out of the round.
3. The server unmasks the mean of the clients that completed the protocol and adds it to its
   model; the sparsity is kept exactly as in a plain round. A mean outside the range (which
   only values a client masked off the grid can give) is refused whole, logged, and the
   model stays as it was.

Parts. Flower does not chunk the masked vectors (one ConfigRecord per reply), and gRPC stops
at 2 GiB, so the matrices go in parts of at most ``max-payload-mb`` (less 64 KiB for the rest
of the message) of masked upload, one SecAgg+ workflow each (:func:`parts_of`). The first
part's request carries the model: the node fine-tunes once, keeps its changes on its disk (a
SuperNode starts a process per message) and sends each part's from there; the last part
removes them. A later part goes to the nodes that completed the one before, and the model
changes only once every part has a valid mean.

What changes against plain replies:

- The range is the bound plain replies are checked against (``change_limit``: the most
  ``recovery-steps`` AdamW steps at ``recovery-lr`` move one entry), so a client can move the
  mean by at most that over K per entry, as a plain reply that passes the check can. The
  server cannot check one client's reply, so ``aggregation`` is the mean (``exact`` has no
  other rule) and ``recovery-method`` is ``masked``: a ``lora`` update has no such bound.
- Each kept value goes up as one int64 (Flower's masked vectors), 8 B where int8 plain
  replies take about 1 B (SmolLM2-135M at 50 %: about 405 MiB per client and round). A
  matrix whose masked changes alone exceed ``max-payload-mb`` is refused before any work
  (:func:`check_secure_recovery_upload`).
- Only each client's time and token count travel in the clear, not its training loss.
- A round needs two clients, and a majority of a part's clients must complete it
  (``secagg_workflow.py``). A round where a part falls short leaves the model as it was and
  the run goes on, as a plain round with no valid reply does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

from flwr.serverapp import Grid
from torch import Tensor

from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.strategies.recovery_rounds import (
    apply_mean,
    change_limit,
    global_matrices,
    recovery_requests,
    run_recovery_rounds,
)
from fedspallm_strategy.strategies.secagg_workflow import run_secure_round
from fedspallm_strategy.wire.protocol import part_request, request_to_fitins
from fedspallm_strategy.wire.secure_encoding import (
    deltas_from_secure_mean,
    masked_bytes,
    quantization_range,
)
from llm_pruning.families import num_layers, prunable_weights

log = logging.getLogger(__name__)

MIB = 2**20
# Left in each part's message for what else it carries (SecAgg+'s stage fields, protobuf
# framing), so that a part of max-payload-mb = 2048 stays under gRPC's 2 GiB - 1 B.
MESSAGE_HEADROOM = 2**16


def part_budget(config: RunConfig) -> float:
    """The most masked upload one part may hold, in bytes."""
    return config.max_payload_mb * MIB - MESSAGE_HEADROOM


def parts_of(counts: Mapping[str, int], limit: float) -> list[list[str]]:
    """The matrices in name order, cut into consecutive parts whose masked upload
    (:func:`~fedspallm_strategy.wire.secure_encoding.masked_bytes` of their kept counts) is at
    most ``limit`` bytes; a matrix over it alone is a part of its own."""
    parts: list[list[str]] = [[]]
    for name in sorted(counts):
        grown = parts[-1] + [name]
        if parts[-1] and masked_bytes([counts[n] for n in grown]) > limit:
            parts.append([name])
        else:
            parts[-1] = grown
    return parts


def check_secure_recovery_upload(config: RunConfig, model) -> None:
    """Refuse, before any work, a run with a matrix whose masked changes (one int64 per kept
    weight) alone exceed ``max-payload-mb``: no part could carry it."""
    if not (config.secure_aggregation and config.recovery_rounds):
        return
    for layer in range(num_layers(model)):
        for name, linear in prunable_weights(model, layer).items():
            # N:M keeps the same share: its sparsity is 1 - N/M
            kept = math.ceil(linear.weight.numel() * (1 - config.sparsity))
            upload = masked_bytes([kept])
            if upload > part_budget(config):
                raise ConfigError(
                    f"recovery-rounds with secure-aggregation: the masked changes of {name} "
                    f"alone are {upload / MIB:.2f} MiB (8 B for each of its {kept} kept "
                    f"weights), over max-payload-mb={config.max_payload_mb:g} less 64 KiB for "
                    "the rest of its message. Raise "
                    "max-payload-mb (Flower's gRPC messages stop at 2 GiB), or recover "
                    "without secure-aggregation"
                )


def run_secure_recovery_rounds(
    strategy, grid: Grid, timeout: float, evaluate: Callable[[], dict] | None = None
) -> list[dict]:
    """:func:`~fedspallm_strategy.strategies.recovery_rounds.run_recovery_rounds`, each round
    through SecAgg+."""
    return run_recovery_rounds(strategy, grid, timeout, evaluate, play=secure_recovery_round)


def secure_recovery_round(strategy, grid: Grid, timeout: float, server_round: int) -> dict:
    """One recovery round through SecAgg+, a workflow per part; its report entry."""
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
    values, masks = global_matrices(strategy.model)
    messages = recovery_requests(strategy, server_round, nodes, values, masks)
    del values
    counts = {name: int(mask.sum()) for name, mask in masks.items()}
    parts = parts_of(counts, part_budget(config))
    entry["parts"] = len(parts)
    log.info(
        "recovery round %d: fine-tuning on %d nodes, secure aggregation in %d part(s) (range %.3g)",
        server_round,
        len(nodes),
        len(parts),
        change_limit(config),
    )
    workflows = _PartWorkflows(strategy, grid, timeout, server_round, messages, counts)
    try:
        for index, names in enumerate(parts):
            nodes = workflows.run(index, names, len(parts), nodes)
    except ValueError as error:
        log.warning("recovery round %d: %s; the model is unchanged", server_round, error)
        entry["refused"] = str(error)
        return entry
    entry["clients"] = len(nodes)
    change = apply_mean(strategy.model, workflows.means, masks)
    entry["largest-relative-change"] = round(change, 6)
    return entry


class _PartWorkflows:
    """The SecAgg+ workflows of one recovery round, one per part, and the means they gave."""

    def __init__(self, strategy, grid: Grid, timeout: float, server_round: int, messages, counts):
        self.strategy, self.grid, self.timeout = strategy, grid, timeout
        self.server_round = server_round
        # Every node's request is the same (the model, the round): one FitIns per part serves
        # them all, so the model is not copied once per node.
        self.request = messages[0].content
        self.counts = counts
        self.clip = change_limit(strategy.config)
        self.means: dict[str, Tensor] = {}

    def run(self, index: int, names: list[str], parts: int, nodes: list[int]) -> list[int]:
        """Part ``index`` among ``nodes``; returns the nodes that completed it.

        Raises
        ------
        ValueError
            If fewer than two nodes are left, fewer than a majority complete it, or its mean
            is not one honest clients give (naming the part).
        """
        where = f"part {index + 1}/{parts}"
        if len(nodes) < 2:
            raise ValueError(f"{where}: only node {nodes} is left")
        q = quantization_range(len(nodes))
        secure = {"clipping-range": self.clip, "quantization-range": q}
        fitins = request_to_fitins(part_request(self.request, index, parts, names), secure)
        result = run_secure_round(
            self.grid,
            dict.fromkeys(nodes, fitins),
            self.server_round,
            clipping_range=self.clip,
            quantization_range=q,
            timeout=self.timeout,
        )
        accounting = self.strategy.accounting
        for node in sorted(set(nodes) - set(result.contributors)):
            error = result.errors.get(node)
            reason = f"client error: {error}" if error else "no reply"
            accounting.reject(self.server_round, node, [], f"secure aggregation, {where}: {reason}")
        if result.mean is None:
            raise ValueError(
                f"{where}: fewer than a majority of the {len(nodes)} nodes completed secure "
                "aggregation"
            )
        counts = {name: self.counts[name] for name in names}
        try:
            self.means.update(deltas_from_secure_mean(result.mean, counts, self.clip, q))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        upload = masked_bytes([counts[name] for name in names])
        for node in result.contributors:
            accounting.add_up(node, upload)
            accounting.add_metrics(node, result.metrics.get(node, {}))
        return sorted(result.contributors)
