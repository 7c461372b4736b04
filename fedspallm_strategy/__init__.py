"""FedSpaLLM on Flower: the server's side of federated pruning, and the wire both sides share.

The folders say what kind of code each module is:

- ``config/``: run and node configuration, validated in one place;
- ``wire/``: message keys, the round plan, the codecs of what travels, the reply funnel;
- ``merge/``: the Flower-free maths (l0 aggregation, mask expansion, merging, plausibility,
  layer sampling);
- ``run/``: a run's state (accounting, checkpoint, logging);
- ``strategies/``: the Flower strategies, one a file, and their registry.

What users of the maths need is importable from here without Flower.
"""

from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig
from fedspallm_strategy.merge.aggregation import L0Accumulator, l0_aggregate, robust_centre
from fedspallm_strategy.merge.expansion import expand_mask, expand_mask_nm
from fedspallm_strategy.merge.merging import MatrixMerger
from fedspallm_strategy.merge.plausibility import check_kept_values
from fedspallm_strategy.merge.sampling import layer_budget, sample_layers
from fedspallm_strategy.wire.payload import decode, encode
from fedspallm_strategy.wire.payload_spec import MatrixSpec, validate_layer
from fedspallm_strategy.wire.round_plan import RoundStep, plan_rounds
from fedspallm_strategy.wire.safetensors_reader import PayloadError
from fedspallm_strategy.wire.stats_payload import decode_statistics, encode_statistics
from fedspallm_strategy.wire.values_payload import decode_values, encode_values

__all__ = [
    "ConfigError",
    "L0Accumulator",
    "MatrixMerger",
    "MatrixSpec",
    "NodeConfig",
    "PayloadError",
    "RoundStep",
    "RunConfig",
    "check_kept_values",
    "decode",
    "decode_statistics",
    "decode_values",
    "encode",
    "encode_statistics",
    "encode_values",
    "expand_mask",
    "expand_mask_nm",
    "l0_aggregate",
    "layer_budget",
    "plan_rounds",
    "robust_centre",
    "sample_layers",
    "validate_layer",
]
