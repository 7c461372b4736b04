"""Tests for llm_pruning.recovery: fine-tuning that keeps a pruned model's zeros exactly."""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from dataclasses import dataclass

import pytest
import torch

from llm_pruning import recovery
from llm_pruning.engine import prune_model
from llm_pruning.models import load_model
from llm_pruning.pruners import SparsityPattern, get_pruner
from llm_pruning.recovery import (
    RecoveryResult,
    RecoverySettings,
    apply_deltas,
    recover,
    sparsity_masks,
    teacher_targets,
)

SEQLEN = 24
PATTERNS = {"unstructured": SparsityPattern(0.5), "2:4": SparsityPattern(0.5, 2, 4)}
# Learning rates at which a dozen steps visibly lower the loss of the tiny random model.
LR = {"masked": 1e-3, "lora": 1e-2}


def settings(
    method: str, *, steps: int = 12, seed: int = 3, distill: float = 0.0
) -> RecoverySettings:
    return RecoverySettings(
        method, steps=steps, lr=LR[method], batch_size=4, distill=distill, seed=seed
    )


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    """Random byte windows (N, T): the tiny model's weights are random, so is its text."""
    return torch.randint(0, 256, (8, SEQLEN), generator=torch.Generator().manual_seed(0))


def pruned_model(name: str, pattern: str, windows: torch.Tensor):
    model, _ = load_model(name)
    prune_model(model, windows, get_pruner("magnitude"), PATTERNS[pattern], progress=False)
    return model


def window_loss(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=windows, labels=windows, use_cache=False).loss.item()


@dataclass
class Recovered:
    method: str
    pattern: str
    pruned: torch.nn.Module  # the pruned model, untouched
    model: torch.nn.Module  # a copy of it after recovery
    masks: dict[str, torch.Tensor]  # the pruned model's keep-masks
    result: RecoveryResult


@pytest.fixture(
    scope="module",
    params=[(m, p) for m in ("masked", "lora") for p in PATTERNS],
    ids=lambda param: "-".join(param),
)
def recovered(request, tiny_cache, windows) -> Recovered:
    method, pattern = request.param
    pruned = pruned_model("tiny-llama", pattern, windows)
    model = copy.deepcopy(pruned)
    result = recover(model, windows, settings(method))
    return Recovered(method, pattern, pruned, model, sparsity_masks(pruned), result)


# ------------------------------------------------------------------ (a) zeros kept exactly


def test_recovery_keeps_exactly_the_zero_set(recovered: Recovered) -> None:
    after = sparsity_masks(recovered.model)
    assert after.keys() == recovered.masks.keys()
    for name, mask in recovered.masks.items():
        assert torch.equal(after[name], mask), name
        assert int(mask.sum()) * 2 == mask.numel(), name  # still exactly 50 % sparse
    if recovered.pattern == "2:4":
        for name, mask in after.items():
            groups = mask.reshape(mask.shape[0], -1, 4).sum(dim=-1)
            assert bool((groups == 2).all()), f"{name}: a 2:4 group broken"


def test_recovery_changes_kept_values(recovered: Recovered) -> None:
    """The property above is not vacuous: the kept values did move."""
    changed = [bool(delta.abs().max() > 0) for delta in recovered.result.deltas.values()]
    assert all(changed)


# ------------------------------------------------------------------ (b) the loss goes down


def test_training_loss_falls_and_windows_loss_is_lower(recovered: Recovered, windows) -> None:
    losses = recovered.result.losses
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0]
    assert window_loss(recovered.model, windows) < window_loss(recovered.pruned, windows)


def test_result_counts_tokens_and_time(recovered: Recovered) -> None:
    assert recovered.result.tokens == 12 * 4 * SEQLEN
    assert recovered.result.seconds > 0


# ------------------------------------------------------------------ (c) deltas reproduce


def test_apply_deltas_reproduces_the_recovered_weights_exactly(recovered: Recovered) -> None:
    receiver = copy.deepcopy(recovered.pruned)
    deltas = recovered.result.deltas
    for name, mask in recovered.masks.items():
        assert deltas[name].dtype == torch.float32
        assert deltas[name].shape == (int(mask.sum()),)
    apply_deltas(receiver, deltas, sparsity_masks(receiver))
    expected = recovered.model.state_dict()
    for name, value in receiver.state_dict().items():
        assert torch.equal(value, expected[name]), name


# ------------------------------------------------------------------ (d) the rest is frozen


def test_non_prunable_parameters_unchanged(recovered: Recovered) -> None:
    before = recovered.pruned.state_dict()
    after = recovered.model.state_dict()
    others = [name for name in before if name not in recovered.masks]
    assert any("embed_tokens" in name for name in others)
    assert any("norm" in name for name in others)
    for name in others:
        assert torch.equal(after[name], before[name]), name


def test_model_state_restored(recovered: Recovered) -> None:
    """Eval mode and the requires_grad flags are as they were before training."""
    assert not recovered.model.training
    flags = {name: p.requires_grad for name, p in recovered.pruned.named_parameters()}
    assert {name: p.requires_grad for name, p in recovered.model.named_parameters()} == flags


# ------------------------------------------------------------------ (e) no adapters left


LORA_CASES = [("lora", pattern) for pattern in PATTERNS]


@pytest.mark.parametrize("recovered", LORA_CASES, indirect=True, ids=lambda p: "-".join(p))
def test_lora_leaves_a_plain_model(recovered: Recovered) -> None:
    model = recovered.model
    assert type(model) is type(recovered.pruned)
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in recovered.pruned.named_parameters()]
    assert not any("lora" in name for name in names)
    assert [name for name, _ in model.named_modules()] == [
        name for name, _ in recovered.pruned.named_modules()
    ]
    assert not any(module._forward_hooks for module in model.modules())


# ------------------------------------------------------------------ (f) bad deltas


def bad_deltas_cases(recovered: Recovered):
    name = next(iter(recovered.masks))
    good = recovered.result.deltas[name]
    nan = good.clone()
    nan[0] = float("nan")
    return name, {
        "wrong count": (name, good[:-1]),
        "nan": (name, nan),
        "inf": (name, torch.full_like(good, float("inf"))),
        "2-D": (name, good[None]),
        "integer": (name, good.long()),
        "unknown name": ("model.layers.0.mlp.nonsense.weight", good),
    }


@pytest.mark.parametrize("case", ["wrong count", "nan", "inf", "2-D", "integer", "unknown name"])
def test_bad_deltas_raise_naming_the_matrix_and_change_nothing(recovered, case) -> None:
    receiver = copy.deepcopy(recovered.pruned)
    masks = sparsity_masks(receiver)
    _, cases = bad_deltas_cases(recovered)
    bad_name, bad = cases[case]
    # A good delta for another matrix first: nothing is applied unless every one is good.
    deltas = {name: d for name, d in recovered.result.deltas.items() if name != bad_name}
    deltas[bad_name] = bad
    with pytest.raises(ValueError, match=re.escape(bad_name)):
        apply_deltas(receiver, deltas, masks)
    expected = recovered.pruned.state_dict()
    for name, value in receiver.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_mask_of_the_wrong_shape_raises(recovered: Recovered) -> None:
    receiver = copy.deepcopy(recovered.pruned)
    masks = sparsity_masks(receiver)
    name = next(iter(masks))
    masks[name] = masks[name].flatten()
    with pytest.raises(ValueError, match=re.escape(name)):
        apply_deltas(receiver, recovered.result.deltas, masks)


def test_lora_recomputes_activations_in_training_only(tiny_cache, windows, monkeypatch) -> None:
    """lora trains with every decoder layer checkpointed (a 7B's activations would not fit
    24 GB otherwise), which gives the deltas it gives without, and is undone afterwards."""
    pruned = pruned_model("tiny-llama", "unstructured", windows)
    seen, real_step = [], recovery._step

    def watching_step(model, *args, **kwargs):
        layers = model.model.layers
        seen.append(
            all(isinstance(layer.__dict__.get("forward"), functools.partial) for layer in layers)
        )
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(recovery, "_step", watching_step)
    model = copy.deepcopy(pruned)
    recomputed = recover(model, windows, settings("lora", steps=3))
    assert seen == [True, True, True]
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)
    monkeypatch.setattr(recovery, "recomputed_activations", lambda _model: contextlib.nullcontext())
    kept = recover(copy.deepcopy(pruned), windows, settings("lora", steps=3))
    assert seen[3:] == [False, False, False]
    for name, delta in kept.deltas.items():
        torch.testing.assert_close(recomputed.deltas[name], delta, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ (g) reproducible


@pytest.mark.parametrize("method", ["masked", "lora"])
def test_same_seed_gives_bit_identical_deltas(tiny_cache, windows, method) -> None:
    pruned = pruned_model("tiny-llama", "2:4", windows)
    runs = [recover(copy.deepcopy(pruned), windows, settings(method, steps=3)) for _ in range(2)]
    other = recover(copy.deepcopy(pruned), windows, settings(method, steps=3, seed=4))
    first, second = (run.deltas for run in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert runs[0].losses == runs[1].losses
    assert any(not torch.equal(first[name], other.deltas[name]) for name in first)


def test_recover_leaves_the_callers_rng_alone(tiny_cache, windows) -> None:
    model = pruned_model("tiny-llama", "unstructured", windows)
    state = torch.get_rng_state()
    recover(model, windows, settings("lora", steps=2))
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ other models and dtypes


@pytest.mark.parametrize("method", ["masked", "lora"])
def test_opt_keeps_zeros_and_biases(tiny_cache, windows, method) -> None:
    """OPT's prunable Linears have biases: they are not trained either."""
    pruned = pruned_model("tiny-opt", "2:4", windows)
    model = copy.deepcopy(pruned)
    result = recover(model, windows, settings(method, steps=3))
    masks = sparsity_masks(pruned)
    assert all(torch.equal(sparsity_masks(model)[n], m) for n, m in masks.items())
    before, after = pruned.state_dict(), model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before if n not in masks)
    receiver = copy.deepcopy(pruned)
    apply_deltas(receiver, result.deltas, sparsity_masks(receiver))
    assert all(torch.equal(receiver.state_dict()[n], after[n]) for n in masks)


def test_lora_on_a_bfloat16_base_keeps_zeros(tiny_cache, windows) -> None:
    pruned = pruned_model("tiny-llama", "2:4", windows).to(torch.bfloat16)
    model = copy.deepcopy(pruned)
    result = recover(model, windows, settings("lora", steps=3))
    masks = sparsity_masks(pruned)
    assert all(torch.equal(sparsity_masks(model)[n], m) for n, m in masks.items())
    assert all(delta.dtype == torch.float32 for delta in result.deltas.values())
    receiver = copy.deepcopy(pruned)
    apply_deltas(receiver, result.deltas, sparsity_masks(receiver))
    after = model.state_dict()
    assert all(torch.equal(receiver.state_dict()[n], after[n]) for n in masks)


def test_masked_refuses_half_precision(tiny_cache, windows) -> None:
    model = pruned_model("tiny-llama", "2:4", windows).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        recover(model, windows, settings("masked", steps=1))


def test_error_mid_training_leaves_the_model_as_it_was(tiny_cache, windows, monkeypatch) -> None:
    pruned = pruned_model("tiny-llama", "2:4", windows)
    model = copy.deepcopy(pruned)
    real_step, calls = recovery._step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recovery, "_step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        recover(model, windows, settings("masked", steps=5))
    expected = pruned.state_dict()
    assert all(torch.equal(value, expected[n]) for n, value in model.state_dict().items())
    flags = {name: p.requires_grad for name, p in pruned.named_parameters()}
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not model.training


# ------------------------------------------------------------------ refused inputs


def test_lazy_models_are_refused(tiny_cache, windows) -> None:
    model, _ = load_model("tiny-llama", lazy=True)
    with pytest.raises(ValueError, match="eager"):
        recover(model, windows, settings("masked", steps=1))


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(8, dtype=torch.long),  # 1-D
        torch.zeros(2, 8),  # float
        torch.zeros(2, 1, dtype=torch.long),  # nothing to predict
        torch.full((2, 8), 10_000, dtype=torch.long),  # outside the vocabulary
    ],
)
def test_bad_windows_are_refused(tiny_llama, bad) -> None:
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="windows"):
        recover(model, bad, settings("masked", steps=1))
    with pytest.raises(ValueError, match="windows"):  # before any forward pass of the dense model
        teacher_targets(model, bad, settings("masked", steps=1, distill=0.5))


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "full"},
        {"steps": 0},
        {"batch_size": 1.5},
        {"lr": float("nan")},
        {"lr": -1e-3},
        {"lora_rank": 0},
        {"lora_alpha": 0},
        {"distill": 1.5},
        {"distill": -0.1},
    ],
)
def test_bad_settings_are_refused(changes) -> None:
    values = {"method": "lora", "steps": 1, "lr": 1e-3, "batch_size": 1, **changes}
    with pytest.raises(ValueError, match="recovery"):
        RecoverySettings(**values)


# ------------------------------------------------------------------ learning from the dense model


def first_batch(count: int, seed: int) -> list[int]:
    """The windows of a run's first step: the head of its seeded permutation."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:4].tolist()


def test_teacher_targets_are_the_dense_models_top_k_on_the_trained_windows(
    tiny_llama, windows
) -> None:
    model, _ = tiny_llama
    one_step = settings("masked", steps=1, distill=0.5)
    targets = teacher_targets(model, windows, one_step, k=5)
    trained = first_batch(len(windows), one_step.seed)
    assert sorted(torch.nonzero(targets.used).flatten().tolist()) == sorted(trained)
    assert targets.ids.shape == targets.probs.shape == (8, SEQLEN - 1, 5)
    with torch.no_grad():
        logits = model(input_ids=windows[trained], use_cache=False).logits[:, :-1]
    top = logits.topk(5, dim=-1)
    assert torch.equal(targets.ids[trained].long(), top.indices)
    torch.testing.assert_close(targets.probs[trained], torch.softmax(top.values, dim=-1))
    torch.testing.assert_close(targets.probs[trained].sum(-1), torch.ones(4, SEQLEN - 1))
    untrained = [i for i in range(8) if i not in trained]
    assert not targets.probs[untrained].any()  # nothing computed for windows never used
    assert teacher_targets(model, windows, settings("masked", steps=1)) is None  # no distill


@pytest.mark.parametrize("weight", [0.25, 1.0])
def test_distilled_loss_mixes_nll_and_cross_entropy_to_the_dense_targets(
    tiny_cache, windows, weight
) -> None:
    dense, _ = load_model("tiny-llama")
    one_step = settings("masked", steps=1, distill=weight)
    targets = teacher_targets(dense, windows, one_step)
    model = pruned_model("tiny-llama", "unstructured", windows)
    batch = windows[first_batch(len(windows), one_step.seed)]
    with torch.no_grad():  # by hand, on the pruned model before its step
        log_probs = torch.log_softmax(model(input_ids=batch, use_cache=False).logits, dim=-1)
        nll = model(input_ids=batch, labels=batch, use_cache=False).loss
        chosen = first_batch(len(windows), one_step.seed)
        ids, probs = targets.ids[chosen].long(), targets.probs[chosen]
        cross = -(probs * log_probs[:, :-1].gather(-1, ids)).sum(-1).mean()
    result = recover(model, windows, one_step, teacher=targets)
    assert result.losses[0] == pytest.approx(float((1 - weight) * nll + weight * cross), rel=1e-5)
    assert abs(float(cross - nll)) > 0.01  # so the mix is told apart from the NLL alone


@pytest.mark.parametrize("method", ["masked", "lora"])
def test_distilled_recovery_keeps_the_zeros_and_moves_towards_the_dense_model(
    tiny_cache, windows, method
) -> None:
    dense, _ = load_model("tiny-llama")
    distilled = settings(method, distill=1.0)
    targets = teacher_targets(dense, windows, distilled)
    pruned = pruned_model("tiny-llama", "2:4", windows)
    model = copy.deepcopy(pruned)
    result = recover(model, windows, distilled, teacher=targets)
    masks = sparsity_masks(pruned)
    assert all(torch.equal(mask, sparsity_masks(model)[name]) for name, mask in masks.items())
    assert sum(result.losses[-3:]) / 3 < result.losses[0]  # closer to the dense model's targets


def test_distill_zero_ignores_any_teacher(tiny_cache, windows) -> None:
    dense, _ = load_model("tiny-llama")
    targets = teacher_targets(dense, windows, settings("masked", steps=3, distill=0.5))
    pruned = pruned_model("tiny-llama", "unstructured", windows)
    plain = recover(copy.deepcopy(pruned), windows, settings("masked", steps=3))
    given = recover(copy.deepcopy(pruned), windows, settings("masked", steps=3), teacher=targets)
    assert all(torch.equal(plain.deltas[name], given.deltas[name]) for name in plain.deltas)


def test_distill_without_matching_targets_is_refused(tiny_cache, windows) -> None:
    dense, _ = load_model("tiny-llama")
    model = pruned_model("tiny-llama", "unstructured", windows)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="dense model's targets"):
        recover(model, windows, settings("masked", steps=1, distill=0.5))
    few = teacher_targets(dense, windows[:4], settings("masked", steps=1, distill=0.5))
    with pytest.raises(ValueError, match="do not match 8 windows"):
        recover(model, windows, settings("masked", steps=1, distill=0.5), teacher=few)
    one_step = teacher_targets(dense, windows, settings("masked", steps=1, distill=0.5))
    with pytest.raises(ValueError, match="lack windows"):  # 3 steps use windows it skipped
        recover(model, windows, settings("masked", steps=3, distill=0.5), teacher=one_step)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
