"""The layer group a round takes, sized from ``memory-budget-gb``, and what it costs.

tiny-llama (float32): hidden 64, intermediate 128, 4 heads of 16, 2 key-value heads, 4 layers.
Per layer its 7 prunable matrices hold q 64x64 + k 32x64 + v 32x64 + o 64x64 + gate, up
128x64 + down 64x128 = d = 36,864 weights, plus two norms of 64: 36,992 parameters.
"""

import json

import pytest
import torch

from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, RunConfig
from fedspallm_strategy.merge.packed_masks import PackedMasks
from fedspallm_strategy.strategies.memory_plan import (
    fixed_bytes,
    layer_bytes,
    planned_layers_per_round,
)
from llm_pruning.models import load_model
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

D = 36_864  # prunable weights a layer
KEPT = D // 2  # at 50 %
RESIDENT = 4 * 36_992  # the layer's parameters, float32
# The re-solve round (uniform mean, int8 on the wire) holds the dense kept values (4 B) and
# one reply's, decoded to float32 (4 B) from its codes (1 B), one matrix's mask unpacked (the
# largest, 8192), and the merger's float32 sum a kept weight plus an int32 count per input
# column (6 inputs of 64 and down_proj's 128).
RESOLVE = KEPT * (4 + 4 + 1) + 8192 + 4 * KEPT + 4 * (6 * 64 + 128)
# The prune round holds the votes (2 B a weight), one reply's mask (1 B) and its values decoded
# to float32 (4 B), and the float64 running sum of the values (8 B, a float32 model): 15 B.
PRUNE = 15 * D
LAYER = RESIDENT + PRUNE
# lean-uplink: the prune replies are masks only (3 B a weight), and the re-solve round is larger
LEAN_LAYER = RESIDENT + RESOLVE


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")[0]


def test_a_layers_bytes_are_its_larger_rounds_by_hand(tiny):
    config = RunConfig(model="tiny-llama")
    assert RESOLVE < PRUNE
    assert [layer_bytes(tiny, i, config, clients=2) for i in range(4)] == [LAYER] * 4
    lean = RunConfig(model="tiny-llama", lean_uplink=True)
    assert 3 * D < RESOLVE
    assert [layer_bytes(tiny, i, lean, clients=2) for i in range(4)] == [LEAN_LAYER] * 4


def test_the_group_is_what_fits_the_budget_and_at_least_one_layer(tiny):
    fixed = fixed_bytes(tiny)
    # embeddings 256 x 64 + the final norm, float32, + 4 layers' masks at a bit a weight
    embeddings = sum(p.numel() for p in tiny.parameters()) - 4 * 36_992
    assert fixed == 4 * embeddings + 4 * D // 8

    def group(budget_bytes: float) -> int:
        config = RunConfig(model="tiny-llama", memory_budget_gb=budget_bytes / 2**30)
        return planned_layers_per_round(tiny, config, clients=2)

    assert group(fixed + 2 * LAYER) == 2
    assert group(fixed + 3 * LAYER - 1) == 2
    assert group(fixed + 100 * LAYER) == 4  # all: the paper's single round
    assert group(fixed / 2) == 1  # nothing fits: still a layer a round
    explicit = RunConfig(model="tiny-llama", layers_per_round=3, memory_budget_gb=1e-9)
    assert planned_layers_per_round(tiny, explicit, clients=2) == 3
    assert planned_layers_per_round(tiny, RunConfig(calibration="global"), clients=2) == 1


def test_values_on_the_wire_or_robust_rules_cost_more_per_layer(tiny):
    lean = layer_bytes(tiny, 0, RunConfig(lean_uplink=True), clients=4)
    sent = layer_bytes(tiny, 0, RunConfig(), clients=4)
    robust = layer_bytes(tiny, 0, RunConfig(lean_uplink=True, aggregation="median"), clients=4)
    assert lean < sent and lean < robust


def test_the_budget_must_be_positive():
    with pytest.raises(ConfigError, match="memory-budget-gb"):
        RunConfig.from_mapping({"memory-budget-gb": 0})


def test_packed_masks_give_back_every_bit_at_an_eighth_of_the_bytes():
    masks = PackedMasks()
    generator = torch.Generator().manual_seed(0)
    odd = torch.rand(7, 13, generator=generator) > 0.5  # 91 bits: not a whole byte
    masks["a"] = odd
    masks["b"] = torch.ones(64, 64, dtype=torch.bool)
    assert torch.equal(masks["a"], odd) and masks["a"].shape == (7, 13)
    assert bool(masks["b"].all())
    assert masks.nbytes() == 12 + 512  # ceil(91 / 8) + 4096 / 8
    assert torch.equal(masks.pop("a"), odd) and list(masks) == ["b"]
    with pytest.raises(ValueError, match="bool"):
        masks["c"] = torch.zeros(3)


def test_a_budget_that_splits_the_layers_gives_the_one_round_model(tmp_path, tiny):
    base = {"model": "tiny-llama", "seqlen": 64, "calib-samples": 4, "eval-windows": 1}
    fixed = fixed_bytes(tiny)
    runs = {}
    for label, budget in (("split", fixed + 2 * LAYER), ("whole", 1.0 * 2**30)):
        config = RunConfig.from_mapping(
            {**base, "output-dir": str(tmp_path / label), "memory-budget-gb": budget / 2**30}
        )
        run_dir = run_federation(
            InProcessGrid.simulation(client_app, 2, {}), config, run_id=61 + len(runs)
        )
        report = json.loads((run_dir / "report.json").read_text())
        runs[label] = (report, load_model(str(run_dir / "model"))[0])
    split, whole = runs["split"][0]["layerwise"], runs["whole"][0]["layerwise"]
    assert (split["layers-per-round"], split["rounds"]) == (2, 4)  # 2 prune + 2 re-solve
    assert (whole["layers-per-round"], whole["rounds"]) == (4, 2)
    for (name, a), (_, b) in zip(
        runs["split"][1].named_parameters(), runs["whole"][1].named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
