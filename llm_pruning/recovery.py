"""Sparsity-preserving recovery fine-tuning: one client's half of a federated recovery round.

A pruned model recovers quality by fine-tuning on text, but must keep exactly its zeros (same
sparsity, N:M groups still valid). :func:`recover` fine-tunes the global sparse model on
windows of a client's shard and returns the change of every *kept* value of every prunable
matrix; the other side of the wire adds them back with :func:`apply_deltas`. Pruned positions
never move, so a delta needs no indices: its order is the row-major order of the keep-mask.

``masked``
    AdamW on the prunable Linear weights only. Gradients at pruned positions are zeroed
    before every step (AdamW's moments stay zero there) and the masks re-applied after it.
``lora``
    Rank-r adapters on the prunable Linears, base frozen; their update ``B @ A * alpha / r``
    is merged *under the mask* (its part at pruned positions is dropped). The adapters are
    forward hooks, not peft modules, so nothing ever wraps the model. Each decoder layer's
    activations are recomputed in the backward pass (transformers' gradient checkpointing),
    so a step holds one layer's activations, not all of them.

Either can also learn from the dense model (``distill`` > 0): before the model is pruned,
:func:`teacher_targets` records the dense model's most likely next tokens and their
probabilities at every position of the windows a run will train on; the training loss is then
``(1 - distill) x`` next-token NLL ``+ distill x`` cross-entropy to those top-k
distributions. Only the targets are kept (``N x T x k`` ids and probabilities, a few MB),
never a second model. The idea: a few thousand tokens of one shard give one target token per
position, the dense model a distribution at each, which pulls the pruned model back towards
what it was rather than towards its windows alone (what that buys is measured in
``docs/results.md``: at 50 % on SmolLM2, a little on other text, nothing on the clients' own).

Both commit ``before + delta`` (float32, cast to the weight dtype) exactly as
:func:`apply_deltas` does, so a receiver holding the same pruned model gets bit-identical
matrices.

Memory
------
For LLaMA-7B (~6.5e9 prunable weights; 7e9 below, rounding up):
``masked`` trains the prunable matrices in float32: weight + gradient + AdamW's two moments
= 16 B per weight, so 7e9 x 16 B ~ 112 GB before activations: several 80 GB cards or CPU
offload, never one 24 GB card. (Non-float32 weights are refused: AdamW steps of lr ~1e-5
round away in bf16.)
``lora`` keeps the base frozen in its own dtype (bf16: 6.7e9 x 2 B ~ 13.5 GB) with no
gradients or moments, plus float32 adapters of ``r * (out + in)`` weights per Linear (r = 8:
~20e6 weights, x 16 B ~ 0.3 GB). With activations recomputed, a step holds each layer's input
(``B x T x hidden`` in bf16: 4 x 2048 x 4096 x 2 B ~ 67 MB a layer, ~2 GB for 32), one layer's
internals and the logits: a 7B fits one 24 GB card (``bench/recovery_memory.py`` measures it).
Both also keep a float32 copy of the kept values from before training, on the CPU (at 50 %:
3.3e9 x 4 B ~ 13 GB), to compute the deltas.
With ``distill`` > 0, the dense model first runs forward once over the windows to be trained
on, a batch at a time without gradients (before the pruned values are written, so no second
model), and every step adds a float32 log-softmax of the batch's logits: 4 x 2048 x 32000 x
4 B ~ 1 GB at 7B. The targets themselves are ``N x (T - 1) x 32`` ids and probabilities
(16 windows of 2048 tokens: 8 MB).

Not corrected (vanishingly rare in float32): a kept value that lands on exactly 0.0 would
count as pruned in :func:`sparsity_masks` of the recovered model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_pruning.families import num_layers, prunable_weights
from llm_pruning.layer_store import layer_store
from llm_pruning.lora import Adapter, recomputed_activations
from llm_pruning.recovery_batches import (  # noqa: F401  (teacher_targets: re-exported)
    Batches,
    TeacherTargets,
    check_teacher,
    check_windows,
    teacher_targets,
)

METHODS = ("masked", "lora")
# Each method's learning rate when the run does not set one. An adapter starts at zero and
# moves the weights only through its rank-8 product, so it needs about ten times the step the
# kept weights take: at 1e-4 lora recovers a fraction of what masked does (SmolLM2-135M, 50 %).
DEFAULT_LR = {"masked": 1e-4, "lora": 1e-3}


@dataclass(frozen=True)
class RecoverySettings:
    """How one client fine-tunes.

    Parameters
    ----------
    method
        ``"masked"`` (full fine-tuning of the prunable weights) or ``"lora"``.
    steps
        Optimizer steps.
    lr
        AdamW learning rate (of the weights for ``masked``, of the adapters for ``lora``).
    batch_size
        Windows per step.
    lora_rank, lora_alpha
        Adapter rank and scale (the update is ``B @ A * lora_alpha / lora_rank``).
    distill
        Weight of the dense model's targets in the loss, in [0, 1] (0: next-token NLL only;
        :func:`recover` then needs :func:`teacher_targets` of the dense model).
    seed
        Seeds the window order, the adapters' initialisation and any dropout.
    """

    method: str
    steps: int
    lr: float
    batch_size: int
    lora_rank: int = 8
    lora_alpha: float = 16.0
    distill: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"recovery method must be one of {METHODS}; got {self.method!r}")
        for name in ("steps", "batch_size", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recovery {name} must be an integer >= 1; got {value!r}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"recovery {name} must be a finite number > 0; got {value!r}")
        if not isinstance(self.distill, int | float) or not 0 <= self.distill <= 1:
            raise ValueError(f"recovery distill must be a number in [0, 1]; got {self.distill!r}")


@dataclass
class RecoveryResult:
    """What one client's recovery changed.

    Attributes
    ----------
    deltas
        Weight name -> change of its kept values, 1-D float32 in the keep-mask's row-major
        order (what :func:`apply_deltas` takes).
    tokens
        Tokens fed to the model: ``steps * batch_size * T``.
    losses
        Training loss (mean next-token NLL of the batch) at each step, before its update.
    seconds
        Wall time of the whole call.
    """

    deltas: dict[str, Tensor]
    tokens: int
    losses: list[float]
    seconds: float


def sparsity_masks(model: PreTrainedModel) -> dict[str, Tensor]:
    """Keep-mask (``weight != 0``, bool, on the weight's device) of every prunable Linear."""
    return {
        name: linear.weight.detach() != 0
        for index in range(num_layers(model))
        for name, linear in prunable_weights(model, index).items()
    }


def recover(
    model: PreTrainedModel,
    windows: Tensor,
    settings: RecoverySettings,
    device: str | torch.device = "cpu",
    teacher: TeacherTargets | None = None,
) -> RecoveryResult:
    """Fine-tune an eager ``model`` in place on ``windows`` ``(N, T)``, keeping its zeros.

    Causal-LM loss on ``settings.batch_size`` windows per step, taken in a seeded order that
    cycles through all of them (a fresh permutation per pass). The model is moved to
    ``device`` for training and back to the CPU after, in its former train/eval mode; the
    caller's RNG state is left as it was. On the CPU the same settings give bit-identical
    results.

    ``teacher`` (from :func:`teacher_targets` of the dense model, same windows and settings)
    is required when ``settings.distill`` > 0 and ignored otherwise.

    Returns
    -------
    RecoveryResult
        The kept values' changes, which :func:`apply_deltas` adds to another copy of the
        same pruned model to reproduce this one's prunable matrices exactly.
    """
    start = time.perf_counter()
    _check_inputs(model, windows)
    teacher = check_teacher(teacher, windows, settings)
    linears = _prunable_linears(model)
    masks = {name: mask.cpu() for name, mask in sparsity_masks(model).items()}
    if settings.method == "masked":
        _require_float32(linears)
    before = {name: linears[name].weight.detach().float()[mask] for name, mask in masks.items()}
    try:
        losses, deltas = _train(
            model, linears, masks, Batches(windows, settings, teacher), torch.device(device)
        )
    except BaseException:  # an error or interrupt mid-training leaves the model as it was
        _commit(linears, masks, before, {n: torch.zeros_like(v) for n, v in before.items()})
        raise
    if deltas is None:  # masked: the deltas are read off the trained weights
        deltas = {n: linears[n].weight.detach().float()[m] - before[n] for n, m in masks.items()}
    _commit(linears, masks, before, deltas)
    tokens = settings.steps * settings.batch_size * windows.shape[1]
    return RecoveryResult(deltas, tokens, losses, time.perf_counter() - start)


def apply_deltas(
    model: PreTrainedModel, deltas: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> None:
    """Add ``deltas`` (from :func:`recover`) at the kept positions of ``masks``, in place.

    ``masks`` are the receiver's keep-masks of the same pruned model (:func:`sparsity_masks`
    before any delta is applied). A subset of the matrices may be given. Every delta is
    checked before any weight changes, so a bad one leaves the model as it was.

    Raises
    ------
    ValueError
        Naming the matrix: an unknown name, a mask of the wrong shape, a delta that is not
        1-D floating point, has another count than its mask keeps, or is not finite.
    """
    linears = _prunable_linears(model)
    for name, delta in deltas.items():
        _check_delta(name, delta, linears, masks)
    chosen = {name: masks[name].to(linears[name].weight.device) for name in deltas}
    before = {name: linears[name].weight.detach().float()[chosen[name]] for name in deltas}
    moved = {name: delta.to(before[name].device, torch.float32) for name, delta in deltas.items()}
    _commit(linears, chosen, before, moved)


# ------------------------------------------------------------------------------ training


def _train(
    model: PreTrainedModel,
    linears: dict[str, nn.Linear],
    masks: dict[str, Tensor],
    batches: Batches,
    device: torch.device,
) -> tuple[list[float], dict[str, Tensor] | None]:
    """Run the method on ``device`` under a seeded, forked RNG; whatever happens, the model
    ends on the CPU with its former train/eval mode and ``requires_grad`` flags."""
    was_training = model.training
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    # Fork the RNG of the device that trains, too: dropout there draws from it.
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    model.to(device)
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(batches.settings.seed)  # dropout and adapter initialisation
            train = _train_masked if batches.settings.method == "masked" else _train_lora
            return train(model, linears, masks, batches, device)
    finally:
        model.to("cpu")
        model.train(was_training)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])


def _train_masked(
    model: PreTrainedModel,
    linears: dict[str, nn.Linear],
    masks: dict[str, Tensor],
    batches: Batches,
    device: torch.device,
) -> tuple[list[float], None]:
    # Only the prunable weights train: the federation merges nothing else (embeddings, norms,
    # LM head, biases are never sent), so a change to them would stay on this client and the
    # deltas would not describe the model it trained.
    model.requires_grad_(False)
    weights = {name: linears[name].weight for name in masks}
    for weight in weights.values():
        weight.requires_grad_(True)
    grad_masks = [(weights[name], mask.to(device)) for name, mask in masks.items()]
    # No weight decay: a few hundred steps nudge a pretrained model; decay would only shrink
    # the kept weights towards the zeros we are trying to recover from.
    optimizer = torch.optim.AdamW(list(weights.values()), lr=batches.settings.lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(batches.settings.steps):
        losses.append(_step(model, batches, device, optimizer, grad_masks))
        with torch.no_grad():
            for weight, mask in grad_masks:
                weight.mul_(mask)
    return losses, None


def _step(
    model: PreTrainedModel,
    batches: Batches,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    grad_masks: Sequence[tuple[Tensor, Tensor]] = (),
) -> float:
    """One optimizer step on the next batch; the loss before it. ``grad_masks`` (parameter,
    mask): zero gradients at pruned positions keep AdamW's moments and update exactly zero
    there."""
    optimizer.zero_grad(set_to_none=True)
    loss = batches.next_loss(model, device)
    loss.backward()
    for param, mask in grad_masks:
        param.grad.mul_(mask)
    optimizer.step()
    return loss.item()


def _train_lora(
    model: PreTrainedModel,
    linears: dict[str, nn.Linear],
    masks: dict[str, Tensor],
    batches: Batches,
    device: torch.device,
) -> tuple[list[float], dict[str, Tensor]]:
    """Adapters trained on a frozen base; the deltas are their updates at kept positions
    (:func:`recover` commits them, as :func:`apply_deltas` would: the receiver's merge)."""
    settings = batches.settings
    model.requires_grad_(False)
    adapters = {
        name: Adapter(linears[name], settings.lora_rank, settings.lora_alpha, device)
        for name in masks
    }
    params = [p for adapter in adapters.values() for p in (adapter.a, adapter.b)]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    model.train()
    losses = []
    try:
        with recomputed_activations(model):
            for _ in range(settings.steps):
                losses.append(_step(model, batches, device, optimizer))
    finally:
        for adapter in adapters.values():
            adapter.remove()
    with torch.no_grad():
        # Selecting the kept positions drops the update's part at pruned ones: the model
        # trained with it, but keeping the zeros comes first (a merge-time approximation).
        deltas = {
            name: adapter.update()[masks[name].to(device)].cpu()
            for name, adapter in adapters.items()
        }
    return losses, deltas


# ------------------------------------------------------------------------------ helpers


def _prunable_linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    return {
        name: linear
        for index in range(num_layers(model))
        for name, linear in prunable_weights(model, index).items()
    }


def _commit(
    linears: Mapping[str, nn.Linear],
    masks: Mapping[str, Tensor],
    before: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor],
) -> None:
    """Write ``before + delta`` (float32, cast to the weight dtype) at the kept positions.

    :func:`recover` and :func:`apply_deltas` both end here, so the client's recovered matrix
    and a receiver's are the same operation on the same numbers: bit-identical. (Recovering
    the trained value as ``before + (after - before)`` can be one rounding off it otherwise.)
    """
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = linears[name].weight
            weight[masks[name]] = (before[name] + delta).to(weight.dtype)


def _check_delta(
    name: str, delta: Tensor, linears: Mapping[str, nn.Linear], masks: Mapping[str, Tensor]
) -> None:
    if name not in linears:
        raise ValueError(f"delta for '{name}': not a prunable matrix of this model")
    if name not in masks:
        raise ValueError(f"delta for '{name}': no keep-mask given for it")
    mask, shape = masks[name], tuple(linears[name].weight.shape)
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(
            f"mask for '{name}': expected a bool tensor of shape {shape}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if not isinstance(delta, Tensor) or delta.dim() != 1 or not delta.is_floating_point():
        raise ValueError(f"delta for '{name}': expected a 1-D floating-point tensor")
    kept = int(mask.sum())
    if delta.numel() != kept:
        raise ValueError(f"delta for '{name}': {delta.numel()} values, but its mask keeps {kept}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(f"delta for '{name}': has non-finite values (NaN or inf)")


def _check_inputs(model: PreTrainedModel, windows: Tensor) -> None:
    if layer_store(model) is not None:
        raise ValueError("recovery needs an eager model; this one loads its layers lazily")
    check_windows(model, windows)


def _require_float32(linears: Mapping[str, nn.Linear]) -> None:
    other = {str(linear.weight.dtype) for linear in linears.values()} - {"torch.float32"}
    if other:
        raise ValueError(
            f"masked recovery needs float32 prunable weights (got {sorted(other)}): AdamW "
            "steps round away in half precision; load the model in float32 or use 'lora'"
        )
