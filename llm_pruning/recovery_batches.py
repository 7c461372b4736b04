"""Recovery's training batches and its dense-model targets (``recovery-distill``).

:func:`teacher_targets` records the dense model's top-k next-token distributions on the windows
a recovery run will train on; :class:`Batches` yields the seeded batches and the loss of each
(next-token NLL, mixed with the cross-entropy to those targets where ``distill`` > 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

# ``settings`` below: a ``llm_pruning.recovery.RecoverySettings`` (not imported: that module
# imports this one).
# Next tokens kept per position from the dense model, renormalised: the whole distribution
# would cost N x T x vocab floats (16 x 2048 x 32000 x 4 B ~ 4 GB at 7B), 32 of them 8 MB.
TEACHER_TOP_K = 32


@dataclass(frozen=True)
class TeacherTargets:
    """The dense model's ``k`` most likely next tokens at every position of the windows.

    Attributes
    ----------
    ids
        ``(N, T - 1, k)`` int32: for window n and position t, the tokens most likely to follow.
    probs
        ``(N, T - 1, k)`` float32, summing to 1 over k (the top-k renormalised). Zero for the
        windows the run never trains on (``used`` is False).
    used
        ``(N,)`` bool: the windows whose targets were computed.
    """

    ids: Tensor
    probs: Tensor
    used: Tensor


def teacher_targets(
    model: PreTrainedModel,
    windows: Tensor,
    settings,
    device: str | torch.device = "cpu",
    k: int = TEACHER_TOP_K,
) -> TeacherTargets | None:
    """The dense ``model``'s top-``k`` next-token distributions on the windows that
    :func:`recover` with ``settings`` will train on (its seeded batches), one batch at a time;
    None where ``settings.distill`` is 0 (nothing to compute).

    Call it on the dense model, before the pruned values are written into it. The model is
    moved to ``device`` and back to the CPU, in its former train/eval mode.
    """
    if not settings.distill:
        return None
    check_windows(model, windows)
    count, length = windows.shape
    k = min(k, model.config.vocab_size)
    chosen = sorted(_trained_windows(count, settings))
    ids = torch.zeros(count, length - 1, k, dtype=torch.int32)
    probs = torch.zeros(count, length - 1, k)
    used = torch.zeros(count, dtype=torch.bool)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            for start in range(0, len(chosen), settings.batch_size):
                part = chosen[start : start + settings.batch_size]
                logits = model(input_ids=windows[part].to(device), use_cache=False).logits
                top = logits[:, :-1].float().topk(k, dim=-1)
                ids[part] = top.indices.to("cpu", torch.int32)
                probs[part] = torch.softmax(top.values, dim=-1).cpu()
                used[part] = True
    finally:
        model.to("cpu")
        model.train(was_training)
    return TeacherTargets(ids, probs, used)


def check_windows(model: PreTrainedModel, windows: Tensor) -> None:
    """Raise ``ValueError`` unless ``windows`` is an ``(N, T)`` LongTensor of ``model``'s token
    ids with N >= 1 and T >= 2 (a window predicts T - 1 next tokens)."""
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("recovery windows must be a LongTensor of shape (N, T)")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"recovery needs N >= 1 windows of T >= 2 tokens; got {windows.shape}")
    vocab = model.config.vocab_size
    if int(windows.min()) < 0 or int(windows.max()) >= vocab:
        raise ValueError(f"recovery windows hold token ids outside the vocabulary [0, {vocab})")


def check_teacher(
    teacher: TeacherTargets | None, windows: Tensor, settings
) -> TeacherTargets | None:
    """The targets the loss uses: ``teacher`` where ``settings.distill`` > 0, else None."""
    if not settings.distill:
        return None
    if teacher is None:
        raise ValueError(
            "recovery distill > 0 needs the dense model's targets (teacher_targets, computed "
            "before the model was pruned)"
        )
    count, length = windows.shape
    if teacher.ids.shape[:2] != (count, length - 1) or teacher.probs.shape != teacher.ids.shape:
        raise ValueError(
            f"recovery teacher targets of shape {tuple(teacher.ids.shape)} do not match "
            f"{count} windows of {length} tokens"
        )
    if not all(bool(teacher.used[index]) for index in _trained_windows(count, settings)):
        raise ValueError("recovery teacher targets lack windows these settings train on")
    return teacher


class Batches:
    """The training batches in their seeded order, and the loss of the next one."""

    def __init__(self, windows: Tensor, settings, teacher: TeacherTargets | None) -> None:
        self.windows = windows
        self.settings = settings
        self.teacher = teacher
        self._order = _batch_indices(windows.shape[0], settings)

    def next_loss(self, model: PreTrainedModel, device: torch.device) -> Tensor:
        """``(1 - distill)`` x next-token NLL ``+ distill`` x cross-entropy to the dense
        model's top-k distributions, both averaged over the batch's predicted tokens."""
        chosen = next(self._order)
        batch = self.windows[chosen].to(device)
        if self.teacher is None:
            return model(input_ids=batch, labels=batch, use_cache=False).loss
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        nll = -log_probs.gather(-1, batch[:, 1:, None]).mean()
        ids = self.teacher.ids[chosen].to(device, torch.long)
        probs = self.teacher.probs[chosen].to(device)
        distilled = -(probs * log_probs.gather(-1, ids)).sum(dim=-1).mean()
        weight = self.settings.distill
        return (1 - weight) * nll + weight * distilled


def _trained_windows(count: int, settings) -> set[int]:
    """The indices of the windows ``settings.steps`` batches use."""
    batches = _batch_indices(count, settings)
    return {index for _ in range(settings.steps) for index in next(batches)}


def _batch_indices(count: int, settings) -> Iterator[list[int]]:
    """``batch_size`` window indices at a time, cycling through seeded permutations."""
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    while True:
        while len(order) < settings.batch_size:
            order += torch.randperm(count, generator=generator).tolist()
        chosen, order = order[: settings.batch_size], order[settings.batch_size :]
        yield chosen
