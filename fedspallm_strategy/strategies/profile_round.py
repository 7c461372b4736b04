"""The OWL profile round: every layer's sparsity is fixed before any layer's mask is.

With ``sparsity-profile='owl'`` a strategy's rounds are preceded by one exchange, like the
resources query: every node runs its calibration data through the *dense* model and replies
(``client_app/profile_task.py``). The replies go through the same funnel as every other one
(:meth:`ServerEvaluated.accepted`: an error, an unasked or duplicate reply, then the content
checked against what the server knows), each bad one logged, reported under round 0, and
skipped. No valid reply at all fails the run, naming the reasons: a run asked for ``owl``
must not quietly come out uniform.

How replies combine:

- ``counts`` (``fedspallm``, ``fedavg``, ``fedprllm``): per layer, the outlier counts summed
  over the clients over the summed totals. Every total is the layer's number of weights,
  which the server knows, so it checks them exactly; the mean then weighs every client
  equally (a token-weighted mean would trust each client's claim of how much text it has).
  Only one integer per layer leaves a node.
- ``statistics`` (``exact``): every layer's column-norm sums on the dense model, added up over
  the clients as exact adds up its per-layer statistics, so the ratios are those of the
  pooled data: the profile ``centralized`` computes, and exact stays equal to centralized
  under ``owl`` too. (Exact's own per-round statistics come from inputs through the pruned
  layers below, and arrive only when its round reaches a layer: too late to fix sparsities.)

A node whose profile reply is rejected still takes part in the rounds: the pruning replies
are checked on their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedspallm_strategy.wire.protocol import (
    PAYLOAD_KEY,
    PROFILE_KEY,
    PROFILE_MESSAGE_TYPE,
    SPEC_KEY,
    request_record,
)
from fedspallm_strategy.wire.replies import RejectedReply, reply_bytes, reply_metrics, screen
from fedspallm_strategy.wire.stats_payload import decode_statistics, statistics_limit
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import layer_tensors
from llm_pruning.owl import (
    SparsityProfile,
    check_layer_sparsities,
    layer_outliers,
    matrix_sizes,
    profile_from_counts,
    uniform_prune_total,
)
from llm_pruning.pruners import num_to_prune

log = logging.getLogger(__name__)

PROFILE_ROUND = 0  # how the report's `rejected` names the profile round


def run_profile_round(strategy, grid: Grid, timeout: float) -> SparsityProfile:
    """Ask every node for its dense profile, combine the valid replies, return the profile.

    ``strategy`` is a :class:`~fedspallm_strategy.strategy.ServerEvaluated`; its
    ``profile_kind`` says what to ask for (``statistics``: with its ``profile_groups``).
    """
    config, kind = strategy.config, strategy.profile_kind
    nodes = sorted(grid.get_node_ids(), key=lambda n: (strategy.node_names.get(n, str(n)), n))
    if not nodes:
        raise RuntimeError("no nodes are connected to the federation")
    extra = {"kind": kind}
    if kind == "statistics":
        extra["shared"] = [",".join(group) for group in strategy.profile_groups()]
    messages = [
        Message(
            RecordDict({SPEC_KEY: request_record(config, []), PROFILE_KEY: ConfigRecord(extra)}),
            message_type=PROFILE_MESSAGE_TYPE,
            dst_node_id=node,
            group_id="profile",
        )
        for node in nodes
    ]
    strategy.accounting.start_round(PROFILE_ROUND)
    for message in messages:
        down = sum(len(record.deflate()) for record in message.content.config_records.values())
        node = message.metadata.dst_node_id
        strategy.accounting.add_down(node, down)
    strategy.assignments, strategy.sent = {node: [] for node in nodes}, messages
    log.info("owl: profile round (%s) over %d nodes", kind, len(nodes))
    replies = grid.send_and_receive(messages, timeout=timeout)
    if kind == "counts":
        profile = _from_counts(strategy, replies)
    else:
        profile = _from_statistics(strategy, replies)
    strategy.assignments, strategy.sent = {}, []
    return profile


def _no_valid_reply(strategy) -> RuntimeError:
    reasons = sorted(
        {
            f"node {r['node']}: {r['reason']}"
            for r in strategy.accounting.rejected
            if r["round"] == PROFILE_ROUND
        }
    )
    return RuntimeError(
        "sparsity-profile='owl': no valid profile reply, so no layer's sparsity can be set; "
        f"rejected: {'; '.join(reasons) or 'none'}"
    )


def _from_counts(strategy, replies) -> SparsityProfile:
    model, config = strategy.model, strategy.config
    totals = [sum(sizes) for sizes in matrix_sizes(model)]
    summed_outliers, summed_totals = [0] * len(totals), [0] * len(totals)

    def accept(reply: Message, node: int, answered: list[int]) -> list[int]:
        screen(reply, node, strategy.assignments, answered)
        outliers = checked_counts(reply, totals)
        strategy.accounting.add_up(node, len(reply.content.config_records[PROFILE_KEY].deflate()))
        strategy.accounting.add_metrics(node, reply_metrics(reply))
        return outliers

    accepted = 0
    for _node, outliers in strategy.accepted(PROFILE_ROUND, replies, accept):
        accepted += 1
        for layer, count in enumerate(outliers):
            summed_outliers[layer] += count
            summed_totals[layer] += totals[layer]
    if not accepted:
        raise _no_valid_reply(strategy)
    return profile_from_counts(
        model, summed_outliers, summed_totals, config.sparsity, config.owl_lambda
    )


def checked_counts(reply: Message, totals: list[int]) -> list[int]:
    """A ``counts`` reply's per-layer outlier counts, each an integer in [0, total], with the
    totals exactly the layers' weight counts the server knows."""
    record = reply.content.config_records.get(PROFILE_KEY)
    if record is None:
        raise RejectedReply(f"profile reply has no '{PROFILE_KEY}' ConfigRecord")
    values = dict(record)
    if set(values) != {"outliers", "totals"}:
        raise RejectedReply(f"profile record: unexpected keys {sorted(values)[:10]}")
    outliers, claimed = values["outliers"], values["totals"]
    for key, value in (("outliers", outliers), ("totals", claimed)):
        if not isinstance(value, list) or len(value) != len(totals):
            raise RejectedReply(f"profile record: '{key}' must be a list of {len(totals)} ints")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise RejectedReply(f"profile record: '{key}' holds a value that is not an integer")
    if claimed != totals:
        raise RejectedReply("profile record: 'totals' are not the layers' weight counts")
    if not all(0 <= count <= total for count, total in zip(outliers, totals, strict=True)):
        raise RejectedReply("profile record: an outlier count is outside [0, layer total]")
    return outliers


def _from_statistics(strategy, replies) -> SparsityProfile:
    model, config = strategy.model, strategy.config
    expected = strategy.profile_expected()
    limit = config.reply_limit(statistics_limit("column-norms", expected))
    sums: dict = {}

    def accept(reply: Message, node: int, answered: list[int]) -> dict:
        screen(reply, node, strategy.assignments, answered)
        data = reply_bytes(reply, PAYLOAD_KEY, max_bytes=limit)
        _kind, entries = decode_statistics(
            data,
            max_bytes=limit,
            expected_kind="column-norms",
            expected=expected,
            tokens=config.calib_samples * config.seqlen,
        )
        strategy.accounting.add_up(node, len(data))
        strategy.accounting.add_metrics(node, reply_metrics(reply))
        return entries

    for _node, entries in strategy.accepted(PROFILE_ROUND, replies, accept):
        for key, (stats, _covers) in entries.items():
            if key in sums:
                sums[key].merge(stats)
            else:
                sums[key] = stats
        del entries
    if not sums:
        raise _no_valid_reply(strategy)
    return pooled_profile(model, sums, expected, config)


def pooled_profile(model, sums: Mapping, expected: Mapping, config) -> SparsityProfile:
    """The profile of summed column-norm statistics (group key -> stats)."""
    stats_of = {name: sums[key] for key, (_inputs, covers) in expected.items() for name in covers}
    outliers, totals = [], []
    for layer in range(num_layers(model)):
        tensors = layer_tensors(model, layer)
        names = list(prunable_weights(model, layer))  # the order the clients' pass sums in
        weights = {name: tensors[name] for name in names}
        count, total = layer_outliers(weights, {n: stats_of[n] for n in names}, config.owl_m)
        outliers.append(count)
        totals.append(total)
    return profile_from_counts(model, outliers, totals, config.sparsity, config.owl_lambda)


def declared_patterns(strategy, reply: Message, layers: list[int]) -> dict:
    """``standalone`` under owl: the per-matrix patterns of the profile a client says it
    pruned ``layers`` to (its own data's), checked to be one OWL can give: every layer within
    ``owl-lambda`` of the target (and its integer rounding), and, for a client that pruned
    every layer, exactly the weights uniform sparsity prunes."""
    model, config = strategy.model, strategy.config
    record = reply.content.config_records.get(PROFILE_KEY)
    if record is None:
        raise RejectedReply("owl: the reply declares no layer sparsities")
    try:
        declared = check_layer_sparsities(dict(record).get("layer-sparsities"), len(layers))
    except ValueError as error:
        raise RejectedReply(f"owl: {error}") from error
    sizes = matrix_sizes(model)
    matrices = sum(len(layer_sizes) for layer_sizes in sizes)
    for layer, sparsity in zip(layers, declared, strict=True):
        # K_l / D_l: the real count, raised to the uniform total (which exceeds s x D by less
        # than one weight per matrix), then rounded to an integer
        rounding = (matrices + 1) / sum(sizes[layer])
        if abs(sparsity - config.sparsity) > config.owl_lambda + rounding:
            raise RejectedReply(
                f"owl: layer {layer} at sparsity {sparsity:.6g}, further than owl-lambda="
                f"{config.owl_lambda:g} from the target {config.sparsity:g}"
            )
    if sorted(layers) == list(range(len(sizes))):
        pruned = sum(
            num_to_prune(sum(sizes[layer]), s) for layer, s in zip(layers, declared, strict=True)
        )
        if pruned != uniform_prune_total(sizes, config.sparsity):
            raise RejectedReply(
                f"owl: the declared profile prunes {pruned} weights, not the "
                f"{uniform_prune_total(sizes, config.sparsity)} of uniform sparsity"
            )
    return dict(zip(layers, declared, strict=True))
