"""Tests for llm_pruning.evaluate: perplexity against a hand computation, sparsity report."""

from __future__ import annotations

import math

import pytest
import torch

from llm_pruning.evaluate import evaluation_windows, perplexity, sparsity_report
from llm_pruning.families import prunable_weights

SEQLEN = 16


def hand_perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(-mean log p(next token)) over the given windows, each scored on its own."""
    log_probs = []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]  # (T, V)
            predicted = torch.log_softmax(logits[:-1].double(), dim=-1)  # (T-1, V)
            log_probs.append(predicted.gather(1, window[1:, None]).squeeze(1))  # (T-1,)
    return math.exp(-torch.cat(log_probs).mean().item())


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """3 full windows and a 5-token tail."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3 * SEQLEN + 5,), generator=generator)


def test_perplexity_uses_non_overlapping_windows_and_drops_the_tail(tiny_model, tokens):
    model, _ = tiny_model
    windows = [tokens[i * SEQLEN : (i + 1) * SEQLEN] for i in range(3)]
    expected = hand_perplexity(model, windows)
    assert perplexity(model, tokens, seqlen=SEQLEN) == pytest.approx(expected, rel=1e-5)
    # The test can tell the right answer from the likely wrong ones.
    with_tail = hand_perplexity(model, [*windows, tokens[3 * SEQLEN :]])
    overlapping = hand_perplexity(model, [tokens[i : i + SEQLEN] for i in range(0, 37, 8)])
    for wrong in (with_tail, overlapping, hand_perplexity(model, windows[:2])):
        assert wrong != pytest.approx(expected, rel=1e-5)


def test_capped_windows_are_evenly_spaced_by_floor_of_i_times_total_over_cap():
    # floor(i * 10 / 4) for i = 0..3: 0, 2.5 -> 2, 5, 7.5 -> 7.
    assert evaluation_windows(10, 4) == [0, 2, 5, 7]
    assert evaluation_windows(10, 1) == [0]
    assert evaluation_windows(7, 3) == [0, 2, 4]  # 0, 2.33, 4.67
    assert evaluation_windows(10, None) == list(range(10))
    assert evaluation_windows(3, 3) == evaluation_windows(3, 99) == [0, 1, 2]
    for total in range(1, 40):
        for cap in range(1, total + 1):
            chosen = evaluation_windows(total, cap)
            assert len(chosen) == cap == len(set(chosen)) and chosen == sorted(chosen)
            assert chosen[0] == 0 and chosen[-1] < total


def test_max_windows_scores_evenly_spaced_windows_not_the_first_ones(tiny_model):
    model, _ = tiny_model
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (10 * SEQLEN + 3,), generator=generator)
    windows = [tokens[i * SEQLEN : (i + 1) * SEQLEN] for i in range(10)]
    expected = hand_perplexity(model, [windows[i] for i in (0, 2, 5, 7)])
    capped = perplexity(model, tokens, seqlen=SEQLEN, max_windows=4)
    assert capped == pytest.approx(expected, rel=1e-5)
    assert hand_perplexity(model, windows[:4]) != pytest.approx(expected, rel=1e-5)
    everything = perplexity(model, tokens, seqlen=SEQLEN)
    assert everything == pytest.approx(hand_perplexity(model, windows), rel=1e-5)
    assert perplexity(model, tokens, seqlen=SEQLEN, max_windows=99) == everything


def test_perplexity_of_a_random_model_is_near_the_vocabulary_size(tiny_llama, tokens):
    """A sanity bound: random weights predict about uniformly over 257 tokens."""
    model, _ = tiny_llama
    assert 100 < perplexity(model, tokens, seqlen=SEQLEN) < 700


def test_too_short_text(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="too short"):
        perplexity(model, torch.arange(SEQLEN - 1), seqlen=SEQLEN)


@pytest.mark.parametrize(
    ("seqlen", "max_windows", "message"), [(1, None, "seqlen"), (SEQLEN, 0, "eval-windows")]
)
def test_nothing_to_score_is_an_error(tiny_llama, tokens, seqlen, max_windows, message):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=message):
        perplexity(model, tokens, seqlen=seqlen, max_windows=max_windows)


def test_sparsity_report_on_a_hand_zeroed_model(tiny_llama):
    model, _ = tiny_llama
    weights = {
        name: linear.weight for i in range(4) for name, linear in prunable_weights(model, i).items()
    }
    assert all(int((w == 0).sum()) == 0 for w in weights.values())  # random init has no zeros
    q0 = weights["model.layers.0.self_attn.q_proj.weight"]  # (64, 64)
    down3 = weights["model.layers.3.mlp.down_proj.weight"]  # (64, 128)
    k2 = weights["model.layers.2.self_attn.k_proj.weight"]  # (32, 64)
    with torch.no_grad():
        q0.zero_()
        down3[:32] = 0.0  # half of the rows
        k2[0, :3] = 0.0  # 3 of 2048
    report = sparsity_report(model)
    assert set(report["per_matrix"]) == set(weights)
    assert report["per_matrix"]["model.layers.0.self_attn.q_proj.weight"] == 1.0
    assert report["per_matrix"]["model.layers.3.mlp.down_proj.weight"] == 0.5
    assert report["per_matrix"]["model.layers.2.self_attn.k_proj.weight"] == 3 / 2048
    assert report["per_matrix"]["model.layers.1.mlp.up_proj.weight"] == 0.0
    # Per layer: q 4096 + k 2048 + v 2048 + o 4096 + gate 8192 + up 8192 + down 8192 = 36864.
    assert report["overall"] == (4096 + 4096 + 3) / (4 * 36864)
