"""A node's own pruned model, which only it holds: its perplexities for the standalone
comparison, before and after its own recovery.

Its values do not travel, or travel as int8, so the server cannot score it; the node scores it
on the windows the server scores and reports the perplexities as metrics
(``STANDALONE_METRIC``). In a run with ``recovery-rounds`` it also fine-tunes a copy on its own
recovery windows, with as many steps as the federated recovery gives it in all, and reports
that model's perplexities (``STANDALONE_RECOVERED_METRIC``): what the member would reach alone
with the same training, beside the federated model after recovery.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from fedspallm_strategy.config import NodeConfig, RunConfig, load_recovery_shard
from fedspallm_strategy.wire.protocol import STANDALONE_METRIC, STANDALONE_RECOVERED_METRIC
from llm_pruning.data import eval_tokens
from llm_pruning.evaluate import perplexity
from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.lazy import layer_tensors
from llm_pruning.models import load_model
from llm_pruning.recovery import recover, teacher_targets

log = logging.getLogger(__name__)


def own_model_scores(model, tokenizer, config: RunConfig, node: NodeConfig, device) -> dict:
    """The metrics of this node's own pruned ``model`` (every layer pruned): its perplexities,
    and with ``RunConfig.clients_recover_standalone`` those after its own recovery."""
    scores = own_perplexities(model, tokenizer, config, device)
    if config.clients_recover_standalone:
        scores |= own_recovered_perplexities(model, tokenizer, config, node, device)
    return scores


def own_perplexities(
    model, tokenizer, config: RunConfig, device, template: str = STANDALONE_METRIC
) -> dict[str, float]:
    """The perplexity of ``model`` on every ``eval-data`` source, as ``template`` metrics; a
    source this node cannot read is left out, with a warning."""
    scores = {}
    for index, source in enumerate(config.eval_data):
        try:
            tokens = eval_tokens(source, tokenizer)
            value = perplexity(
                model,
                tokens,
                seqlen=config.seqlen,
                max_windows=config.eval_windows or None,
                device=device,
            )
        except (OSError, ValueError) as error:
            log.warning("eval-data %r: own model not scored here: %s", source, error)
            continue
        key = template.format(index)
        scores[key] = value
        log.info("own model: %s = %.4f on %s", key, value, source)
    return scores


def own_recovered_perplexities(
    model, tokenizer, config: RunConfig, node: NodeConfig, device
) -> dict[str, float]:
    """Fine-tune an in-memory copy of this node's pruned ``model`` on its own recovery windows
    for ``recovery-rounds`` x ``recovery-steps`` steps (keeping its zeros), and score it.
    ``model`` itself is left as it is."""
    windows = load_recovery_shard(config, node, tokenizer)
    settings = config.recovery_settings
    settings = dataclasses.replace(settings, steps=config.recovery_rounds * settings.steps)
    own = load_eager(config, node)
    teacher = teacher_targets(own, windows, settings, device)  # still dense
    copy_pruned(model, own)
    result = recover(own, windows, settings, device=device, teacher=teacher)
    log.info(
        "own model recovered alone: %s, %d steps, loss %.4f -> %.4f",
        settings.method,
        settings.steps,
        result.losses[0],
        result.losses[-1],
    )
    return own_perplexities(own, tokenizer, config, device, STANDALONE_RECOVERED_METRIC)


def eager_copy(model, config: RunConfig, node: NodeConfig):
    """The dense model loaded whole, with ``model``'s pruned matrices written into it (``model``
    may load its layers lazily; training needs every layer in memory)."""
    own = load_eager(config, node)
    copy_pruned(model, own)
    return own


def load_eager(config: RunConfig, node: NodeConfig):
    """The run's dense model, every layer in memory."""
    cache = Path(node.cache_dir).expanduser() if node.cache_dir else None
    own, _ = load_model(config.model, dtype=config.torch_dtype, cache=cache, ignore=config.ignore)
    return own


def copy_pruned(model, own) -> None:
    """Write ``model``'s prunable matrices into ``own`` (the same architecture)."""
    for index in range(num_layers(own)):
        pruned = layer_tensors(model, index)
        for name, linear in prunable_weights(own, index).items():
            linear.weight.data.copy_(pruned[name])
