"""Where a causal LM's prunable layers live: one adapter per model family.

Any decoder-only family works without an entry of its own: :func:`find_family` finds the
decoder-layer list from the model's ``_no_split_modules`` and prunes every ``nn.Linear`` in a
layer; the adapter table (:data:`FAMILIES`) only overrides that where it knows more (OPT's
final projection). The engine has no per-family copies. Mixture-of-experts models are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class ModelFamily:
    """Where a model keeps its decoder layers and which Linears in a layer get pruned."""

    layers: str  # attribute path from the CausalLM to the nn.ModuleList of decoder layers
    linears: tuple[str, ...]  # prunable Linears, relative to one decoder layer
    # What the last decoder layer's output passes through before the LM head, in order,
    # relative to the CausalLM; an attribute that is None on a model (OPT's project_out
    # when the widths agree) is skipped. ``None``: not known for this model (``unknown_final``
    # says why). Evaluation does not need it: it runs the model's own head
    # (engine.logits_after_layers), soft-capping and all.
    final: tuple[str, ...] | None = ()
    unknown_final: str = ""
    ignored: tuple[str, ...] = ()  # Linears the run config's `ignore` leaves dense

    @property
    def backbone(self) -> str:
        """Attribute path of the module that owns the decoder-layer list (it runs them)."""
        return self.layers.rpartition(".")[0]

    @property
    def layers_attribute(self) -> str:
        """Name of the decoder-layer list on :attr:`backbone` (``layers``, ``h``)."""
        return self.layers.rpartition(".")[2]

    @property
    def layers_prefix(self) -> str:
        """Prefix of every decoder-layer parameter name, e.g. ``model.layers.``."""
        return f"{self.layers}."

    def backbone_of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.backbone)

    def final_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules of :attr:`final` this model has, in order."""
        if self.final is None:
            raise ValueError(
                f"model family '{model.config.model_type}': cannot tell which modules run "
                f"between the last decoder layer and the LM head ({self.unknown_final}); "
                "add the family to llm_pruning.models.FAMILIES with its `final` modules"
            )
        modules = []
        for path in self.final:
            owner, _, name = path.rpartition(".")
            module = getattr(model.get_submodule(owner), name, None)
            if module is not None:
                modules.append(module)
        return modules

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def layer_prefix(self, index: int) -> str:
        """Parameter-name prefix of decoder layer ``index``, e.g. ``model.layers.3.``."""
        return f"{self.layers}.{index}."


# Overrides of what :func:`find_family` finds by itself: only where the table knows more.
FAMILIES: dict[str, ModelFamily] = {
    # OPT-350m projects the final norm's output down to the embedding width.
    "opt": ModelFamily(
        layers="model.decoder.layers",
        linears=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ),
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
}
# Config attributes that count routed experts, across families (Mixtral, Qwen-MoE, DeepSeek).
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_FAMILY_ATTRIBUTE = "_fedspallm_family"


def family_of(model: PreTrainedModel) -> ModelFamily:
    """The adapter for ``model`` (found once, then kept on the model, with the ``ignore``
    patterns :func:`ignore_linears` applied); a clear error for a model we cannot prune."""
    family = getattr(model, _FAMILY_ATTRIBUTE, None)
    if family is None:
        family = find_family(model)
        setattr(model, _FAMILY_ATTRIBUTE, family)
    return family


def find_family(model: PreTrainedModel) -> ModelFamily:
    """Where ``model`` keeps its decoder layers and their Linears, with no table entry needed.

    The decoder layers are the ``nn.ModuleList`` whose elements are of a class the model
    names in ``_no_split_modules`` (what accelerate keeps whole on one device: exactly the
    decoder block for a decoder-only LM). Every ``nn.Linear`` inside a layer is prunable, in
    the layer's own module order. :data:`FAMILIES` overrides the result where it knows more.
    Mixture-of-experts models are refused (:func:`_refuse_experts`).
    """
    model_type = model.config.model_type
    _refuse_experts(model)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    path = _decoder_layers_path(model)
    layers = model.get_submodule(path)
    per_layer = [_linear_names(layer) for layer in layers]
    if not per_layer[0]:
        raise ValueError(
            f"unsupported model family '{model_type}': its decoder layers "
            f"({type(layers[0]).__name__}) hold no nn.Linear to prune (e.g. GPT-2's Conv1D)"
        )
    differing = [index for index, names in enumerate(per_layer) if names != per_layer[0]]
    if differing:
        raise ValueError(
            f"unsupported model family '{model_type}': decoder layers {differing} hold other "
            f"Linears than layer 0 ({list(per_layer[0])}); pruning needs one layout per layer"
        )
    final, reason = _final_norm(model, path)
    return ModelFamily(layers=path, linears=per_layer[0], final=final, unknown_final=reason)


def _decoder_layers_path(model: PreTrainedModel) -> str:
    model_type = model.config.model_type
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    if not block_classes:
        raise ValueError(
            f"unsupported model family '{model_type}': {type(model).__name__} names no "
            "_no_split_modules, so its decoder layers cannot be found; add it to "
            "llm_pruning.models.FAMILIES"
        )
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(type(layer).__name__ in block_classes for layer in module)
    ]
    depth = getattr(model.config, "num_hidden_layers", None)
    if len(candidates) > 1 and depth is not None:
        candidates = [name for name in candidates if len(model.get_submodule(name)) == depth]
    if len(candidates) != 1:
        raise ValueError(
            f"unsupported model family '{model_type}': expected one list of decoder layers "
            f"(modules of class {sorted(block_classes)}), found {candidates or 'none'}; "
            "add it to llm_pruning.models.FAMILIES"
        )
    return candidates[0]


def _linear_names(layer: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, module in layer.named_modules() if isinstance(module, nn.Linear))


def _final_norm(model: PreTrainedModel, layers_path: str) -> tuple[tuple[str, ...] | None, str]:
    """The backbone's one norm module (``norm``, ``final_layer_norm``, ``ln_f``...): what
    every decoder-only backbone applies between its last layer and the LM head."""
    backbone = layers_path.rpartition(".")[0]
    norms = [
        name
        for name, module in model.get_submodule(backbone).named_children()
        if "norm" in type(module).__name__.lower()
    ]
    if len(norms) != 1:
        found = ", ".join(norms) or "none"
        return None, f"expected one norm module on '{backbone}', found {found}"
    # A transform of the logits (Gemma 2's final soft-capping) is not a module to run.
    if getattr(model.config, "final_logit_softcapping", None):
        return None, "the model soft-caps its logits after the LM head"
    return (f"{backbone}.{norms[0]}" if backbone else norms[0],), ""


def _refuse_experts(model: PreTrainedModel) -> None:
    """Routed experts each see only the tokens routed to them: the layer-wise calibration
    here assumes every Linear of a layer sees every calibration token, so a mixture of
    experts would be pruned on a few tokens per expert (and fused expert weights are no
    nn.Linear at all)."""
    config = model.config
    counts = {key: getattr(config, key, None) for key in _EXPERT_COUNTS}
    experts = {key: value for key, value in counts.items() if isinstance(value, int) and value > 1}
    modules = [
        name
        for name, module in model.named_modules()
        if name.rpartition(".")[2] == "experts" or "moe" in type(module).__name__.lower()
    ]
    if experts or modules:
        evidence = ", ".join([*(f"{k}={v}" for k, v in experts.items()), *modules[:3]])
        raise ValueError(
            f"unsupported model family '{config.model_type}': a mixture-of-experts model "
            f"({evidence}). Its routed experts each see only the tokens routed to them, so "
            "one-shot layer-wise pruning on shared calibration tokens does not apply"
        )


def ignore_linears(model: PreTrainedModel, patterns: tuple[str, ...]) -> ModelFamily:
    """Leave the Linears matching ``patterns`` dense on ``model``, from now on.

    A pattern is fnmatch-style (``*``, ``?``, ``[...]``; case-sensitive) on a Linear's name
    relative to its decoder layer, e.g. ``mlp.down_proj`` or ``*.k_proj``; the same Linears
    are left out of every layer. Every pattern must match a Linear, and some Linear must
    remain: a typo fails here, naming the pattern.
    """
    family = find_family(model)
    if patterns:
        unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in family.linears)]
        if unmatched:
            raise ValueError(
                f"ignore: pattern(s) {unmatched} match no prunable Linear of this model; "
                f"its Linears (relative to a decoder layer): {', '.join(family.linears)}"
            )
        ignored = tuple(n for n in family.linears if any(fnmatchcase(n, p) for p in patterns))
        kept = tuple(name for name in family.linears if name not in ignored)
        if not kept:
            raise ValueError(f"ignore: {list(patterns)} leave no Linear to prune")
        family = replace(family, linears=kept, ignored=ignored)
    setattr(model, _FAMILY_ATTRIBUTE, family)
    return family


def prunable_weights(model: PreTrainedModel, layer_index: int) -> dict[str, nn.Linear]:
    """The prunable Linears of one decoder layer, keyed by their weight's parameter name."""
    family = family_of(model)
    layer = family.layers_of(model)[layer_index]
    prefix = family.layer_prefix(layer_index)
    return {f"{prefix}{name}.weight": layer.get_submodule(name) for name in family.linears}


def num_layers(model: PreTrainedModel) -> int:
    return len(family_of(model).layers_of(model))


def model_summary(model: PreTrainedModel, spec: str) -> dict:
    """Name, family, layer count and parameter count, for reports."""
    return {
        "name": spec,
        "family": model.config.model_type,
        "layers": num_layers(model),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def max_context(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
