"""The run configuration, read and validated in one place.

Every key is kebab-case in ``[tool.flwr.app.config]`` and ``--run-config``. A bad value fails
here, before any model is loaded or any node is contacted, with a message that names the key
and what it accepts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fedspallm_strategy.config.values import (
    ConfigError,
    at_least,
    check_device,
    check_shard_size,
    coerce,
    one_of,
)
from llm_pruning.data import PARTITIONS
from llm_pruning.pruners import PRUNERS, RECONSTRUCTIONS, SparsityPattern
from llm_pruning.recovery import DEFAULT_LR as RECOVERY_DEFAULT_LR
from llm_pruning.recovery import METHODS as RECOVERY_METHODS
from llm_pruning.recovery import RecoverySettings

STRATEGIES = ("fedspallm", "fedavg", "fedprllm", "standalone", "centralized", "exact")
# Strategies that merge the clients' pruned layers: calibration and layers-per-round apply to
# them (the others prune once, alone, or centrally: the keys do not apply there).
LAYERWISE_STRATEGIES = ("fedspallm", "fedavg", "fedprllm")
CALIBRATIONS = ("local", "global")  # local: the paper's; global: on the merged layers below
RESOLVE_WEIGHTINGS = ("uniform", "hessian-diagonal")
AGGREGATIONS = ("mean", "trimmed-mean", "median")
SPARSITY_PROFILES = ("uniform", "owl")  # owl: outlier-weighed layer-wise (llm_pruning/owl.py)
PAYLOAD_DTYPES = ("auto", "int8", "float32", "float16", "bfloat16")
RECOVERY_WINDOWS = ("same", "fresh")
RECOVERY_BATCH = 4  # windows per recovery step (fewer if recovery-samples is smaller)
MODEL_DTYPES = ("float32", "bfloat16", "float16")
_IGNORE_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")  # fnmatch on module names
# A Hugging Face repository id, owner/name (push-to-hub; also how a hub model id looks).
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"  # built-in name, local dir, .gguf file, or HF hub id
    dtype: str = "float32"  # the model's dtype on every role (pruners compute in float32)
    ignore: tuple[str, ...] = ()  # Linears left dense: fnmatch patterns such as mlp.down_proj
    strategy: str = "fedspallm"  # one of STRATEGIES
    pruner: str = "sparsegpt"  # sparsegpt | wanda | magnitude
    # How kept values are set once a mask is fixed (pruner sparsegpt): sparsegpt (its one-pass
    # sweep) or lsq (the exact masked least squares per output row, on the same statistics)
    reconstruction: str = "sparsegpt"
    sparsity: float = 0.5  # fraction of each prunable matrix set to zero
    pattern: str = "unstructured"  # unstructured | N:M (2:4, 4:8)
    num_rounds: int = 1  # rounds; a further round only re-assigns layers nobody delivered
    layer_fraction: float = 1.0  # default share of layers per client (node `layer-budget` wins)
    calib_data: str = "python-docs"  # built-in, local .txt/.jsonl/dir, wikitext2/c4/ptb, owner/name
    partition: str = "by-document"  # by-document | iid
    calib_samples: int = 8  # calibration segments per client
    seqlen: int = 512  # tokens per calibration segment and evaluation window
    eval_data: tuple[str, ...] = ("python-docs",)  # comma-separated list in run config
    eval_windows: int = 8  # at most this many windows per eval set (0 = all)
    eval_tasks: tuple[str, ...] = ()  # lm-eval task names or task YAML paths (the eval extra)
    seed: int = 0  # seeds shards, layer sampling and tie-breaks: same seed, same model
    output_dir: str = "runs"  # where run folders go (relative: to where the SuperLink started)
    device: str = "cpu"  # server-side evaluation device; nodes may override in node config
    compare_centralized: bool = False  # also prune centrally on the pooled shards (simulation)
    standalone_eval: bool = True  # also score each client's own model (and after its own recovery)
    round_timeout: float = 3600.0  # seconds to wait for replies in a round
    max_payload_mb: float = 2048.0  # replies larger than this are rejected unread
    # Kept values on the wire: int8 (per-row scaled, 8 bits a kept value) or a float dtype
    payload_dtype: str = "auto"  # (bit-exact); auto: int8
    min_clients: int = 1  # wait for this many connected nodes before starting
    resume_from: str = ""  # a run folder whose checkpoint this run continues
    exact_layers_per_round: int = 1  # exact: decoder layers per round (1 = exactly centralized)
    max_stats_mb: float = 1024.0  # exact: most statistics one client may upload in a run (MiB)
    secure_aggregation: bool = False  # exact: SecAgg+, the server sees sums (and recovery means)
    secure_clipping_range: float = 16777216.0  # exact + SecAgg+: bound on per-token mean x²
    resolve: bool = True  # fedspallm: re-solve kept weights under the merged mask (+1 round)
    calibration: str = "local"  # local (the paper's) | global (clients advance on merged layers)
    # Decoder layers per round. 0: as many as fit memory-budget-gb on the server (all of a
    # small model: the paper's one round); global calibration: 1
    layers_per_round: int = 0
    memory_budget_gb: float = 4.0  # layers-per-round=0: the server's tensors a round may hold
    resolve_pipelined: bool = True  # global + resolve: re-solve a group while pruning the next
    resolve_weighting: str = "uniform"  # uniform | hessian-diagonal: how re-solves are averaged
    aggregation: str = "mean"  # mean (the paper's l0 mean) | trimmed-mean | median, per entry
    trim_fraction: float = 0.25  # trimmed-mean: share of the keepers cut at each end
    max_relative_change: float = 1.0  # reject kept values further than this from the dense ones
    sparsity_profile: str = "uniform"  # uniform | owl: layers with more outliers keep more
    owl_m: float = 5.0  # owl: a Wanda score above owl-m x its layer's mean is an outlier
    owl_lambda: float = 0.08  # owl: the most a layer's sparsity may differ from the target
    push_to_hub: str = ""  # server only: a hub repo id (owner/name) to push model/ to, or ""
    max_shard_size: str = "50GB"  # split model/'s weights into files of at most this, e.g. 500MB
    keep_replies: bool = False  # keep every client's pruned layers in the run folder (replies/)
    # With resolve: the prune round sends masks only (and each matrix's input energy per
    # column); about 0.31x a dense fp16 model per client at 50 % with int8 values, not 0.56x,
    # but the merged mask's ties are broken without the clients' values
    lean_uplink: bool = False
    # Federated recovery after pruning: rounds in which every client fine-tunes the global
    # sparse model on its own shard, keeping its zeros, and the server averages the changes:
    recovery_rounds: int = 0  # 0 = off
    recovery_method: str = "masked"  # masked (the kept weights, float32 model) | lora
    recovery_steps: int = 8  # optimizer steps per client per recovery round (batches of 4)
    # AdamW learning rate (lora: of the adapters); auto: 1e-4 for masked, 1e-3 for lora
    recovery_lr: float | str = "auto"
    recovery_samples: int = 16  # windows of seqlen tokens from each client's shard, per round
    # fresh: each round on windows of its own (round k: the k-th block of one seeded draw of
    # recovery-rounds x recovery-samples); same: every round on the same windows
    recovery_windows: str = "fresh"
    # weight in [0, 1] of the dense model's top-32 next-token probabilities in the loss, the
    # rest next-token NLL (0: NLL only; > 0: a forward pass of the dense model first)
    recovery_distill: float = 0.0

    @property
    def resolves(self) -> bool:
        """Whether the run re-solves under the merged mask: ``resolve`` is FedSpaLLM's (the
        baselines ``fedavg`` and ``fedprllm`` run as published, whatever it says)."""
        return self.resolve and self.strategy == "fedspallm"

    @property
    def sends_pruned_values(self) -> bool:
        """Whether a client's pruned layers travel with their kept values, not the mask alone.

        A mask-only pruner keeps the dense values the server holds. With the re-solve the
        clients' pruned values are replaced by their re-solved ones a round later, and serve
        only to break the merged mask's ties (by the merged value's magnitude) and to score each
        member's own model; ``lean-uplink`` sends masks only, unless ``keep-replies`` asks for
        each client's own model.
        """
        if not PRUNERS[self.pruner].updates_weights:
            return False
        return self.keep_replies or not (self.resolves and self.lean_uplink)

    @property
    def sends_column_norms(self) -> bool:
        """Whether a prune reply's matrices come with the client's input energy per column
        (``Σ x_j²``): when their values stay home, the server breaks the expansion's ties by
        ``|W| · ‖x_j‖`` (Wanda's saliency, pooled over the clients) instead of by a value."""
        return self.resolves and not self.sends_pruned_values

    @property
    def clients_score_standalone(self) -> bool:
        """Whether each client scores its own pruned model on ``eval-data`` and reports the
        perplexity: its values stay home (:attr:`sends_pruned_values`) or travel as int8, so
        only it holds that model. Local calibration only: under global calibration a client's
        layers are pruned on the federation's merged layers, no model of its own."""
        return (
            self.standalone_eval
            and self.calibration == "local"
            and PRUNERS[self.pruner].updates_weights
            and (self.int8_wire or not self.sends_pruned_values)
        )

    @property
    def clients_recover_standalone(self) -> bool:
        """Whether each client that scores its own pruned model also fine-tunes it on its own
        recovery windows, with the steps a federated recovery gives it in all
        (``recovery-rounds`` x ``recovery-steps``), and reports that perplexity too: the
        standalone comparison of a run with recovery. The model stays on the client."""
        return self.recovery_rounds > 0 and self.clients_score_standalone

    @property
    def recovery_settings(self) -> RecoverySettings:
        """How every client fine-tunes in a recovery round (and the centralized bound)."""
        return RecoverySettings(
            method=self.recovery_method,
            steps=self.recovery_steps,
            lr=self.recovery_learning_rate,
            batch_size=min(RECOVERY_BATCH, self.recovery_samples),
            distill=self.recovery_distill,
            seed=self.seed,
        )

    @property
    def recovery_learning_rate(self) -> float:
        """``recovery-lr``, or the method's own where it says ``auto``."""
        if self.recovery_lr == "auto":
            return RECOVERY_DEFAULT_LR[self.recovery_method]
        return self.recovery_lr

    @property
    def int8_wire(self) -> bool:
        """Whether kept values travel as int8 (``payload-dtype`` int8, or auto): lossy."""
        return self.payload_dtype in ("auto", "int8")

    def wire_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype kept values travel in: ``payload-dtype``; ``auto`` is int8 whatever
        ``model_dtype``: 8 bits a kept value and a float32 scale per row, each value within
        half a step of the client's (``wire/int8_values.py``). The float dtypes are exact."""
        return torch.int8 if self.int8_wire else getattr(torch, self.payload_dtype)

    @property
    def layerwise(self) -> bool:
        """Whether the run goes through layer-wise rounds (``layerwise.py``) rather than the
        paper's one-shot round. Only strategies that merge pruned layers have them."""
        return self.strategy in LAYERWISE_STRATEGIES and (
            self.resolves or self.calibration == "global" or self.layers_per_round > 0
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern, self.sparsity)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> RunConfig:
        """Build from Flower's ``run_config`` (kebab-case keys); validates everything."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        parsed = {}
        for key, value in values.items():
            field = known[key]
            parsed[field.name] = coerce(key, value, field.type)
        config = cls(**parsed)
        config.validate()
        return config

    def validate(self) -> None:
        check_shard_size(self.max_shard_size)
        one_of("strategy", self.strategy, STRATEGIES)
        one_of("pruner", self.pruner, tuple(sorted(PRUNERS)))
        one_of("partition", self.partition, PARTITIONS)
        one_of("payload-dtype", self.payload_dtype, PAYLOAD_DTYPES)
        one_of("reconstruction", self.reconstruction, RECONSTRUCTIONS)
        if self.reconstruction != "sparsegpt" and not PRUNERS[self.pruner].updates_weights:
            raise ConfigError(
                f"reconstruction={self.reconstruction!r} sets the kept values, but pruner "
                f"{self.pruner!r} keeps the dense ones: use pruner='sparsegpt'"
            )
        one_of("dtype", self.dtype, MODEL_DTYPES)
        for pattern in self.ignore:
            if not _IGNORE_PATTERN.match(pattern):
                raise ConfigError(
                    f"ignore: {pattern!r} is not a pattern of a Linear's name in a decoder layer "
                    "(letters, digits, '_', '.', and the wildcards * ? [ ] !), e.g. mlp.down_proj"
                )
        try:
            SparsityPattern.parse(self.pattern, self.sparsity)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if not 0 < self.layer_fraction <= 1:
            raise ConfigError(f"layer-fraction must be in (0, 1], got {self.layer_fraction}")
        at_least("num-rounds", self.num_rounds, 1)
        at_least("calib-samples", self.calib_samples, 1)
        at_least("seqlen", self.seqlen, 2)
        at_least("eval-windows", self.eval_windows, 0)
        at_least("min-clients", self.min_clients, 1)
        if not 0 <= self.seed < 2**63:  # what numpy's default_rng and torch's manual_seed take
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.round_timeout <= 0:
            raise ConfigError(f"round-timeout must be positive, got {self.round_timeout}")
        if self.max_payload_mb <= 0:
            raise ConfigError(f"max-payload-mb must be positive, got {self.max_payload_mb}")
        at_least("exact-layers-per-round", self.exact_layers_per_round, 1)
        if self.max_stats_mb <= 0:
            raise ConfigError(f"max-stats-mb must be positive, got {self.max_stats_mb}")
        if self.strategy == "exact" and self.pruner == "magnitude":
            raise ConfigError(
                "strategy exact sums the pruners' calibration statistics; pruner magnitude "
                "has none: choose pruner sparsegpt or wanda"
            )
        if self.secure_aggregation and self.strategy != "exact":
            raise ConfigError(
                f"secure-aggregation needs strategy exact (clients send sums of statistics); "
                f"got strategy {self.strategy!r}"
            )
        if not 0 < self.secure_clipping_range < 2**60:
            raise ConfigError(
                f"secure-clipping-range must be in (0, 2**60), got {self.secure_clipping_range}"
            )
        one_of("calibration", self.calibration, CALIBRATIONS)
        one_of("resolve-weighting", self.resolve_weighting, RESOLVE_WEIGHTINGS)
        one_of("aggregation", self.aggregation, AGGREGATIONS)
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not self.max_relative_change > 0:
            raise ConfigError(
                f"max-relative-change must be positive, got {self.max_relative_change}"
            )
        self._validate_owl()
        if self.aggregation != "mean" and self.strategy != "fedspallm":
            raise ConfigError(
                f"aggregation={self.aggregation!r} is a rule of strategy fedspallm (its mean over "
                f"the clients that kept each entry); strategy {self.strategy!r} has no such mean: "
                f"set aggregation='mean'"
            )
        if self.aggregation != "mean" and self.resolve_weighting != "uniform" and self.resolves:
            raise ConfigError(
                f"resolve-weighting={self.resolve_weighting!r} is a weighted mean; with "
                f"aggregation={self.aggregation!r} set resolve-weighting='uniform'"
            )
        at_least("layers-per-round", self.layers_per_round, 0)
        if not self.memory_budget_gb > 0:
            raise ConfigError(f"memory-budget-gb must be positive, got {self.memory_budget_gb}")
        if self.resolves and not PRUNERS[self.pruner].updates_weights:
            raise ConfigError(
                f"resolve=true (the default) re-solves the kept weights under the merged mask, "
                f"but pruner {self.pruner!r} keeps the dense values, so there is nothing to "
                f"re-solve: set resolve=false, or pruner='sparsegpt'"
            )
        if self.layerwise and self.resume_from:
            raise ConfigError(
                "resume-from: runs with resolve, calibration='global' or layers-per-round > 0 "
                "keep no checkpoint yet; resume works for the one-shot run (resolve=false "
                "calibration='local' layers-per-round=0)"
            )
        self._validate_recovery()
        check_device("device", self.device)
        for name, value in (("model", self.model), ("calib-data", self.calib_data)):
            if not value.strip():
                raise ConfigError(f"{name} must not be empty")
        if not self.eval_data:
            raise ConfigError("eval-data must name at least one text source")
        if len(set(self.eval_tasks)) < len(self.eval_tasks):
            raise ConfigError(f"eval-tasks lists a task twice: {', '.join(self.eval_tasks)}")
        if self.push_to_hub and not HUB_REPO_ID.match(self.push_to_hub):
            raise ConfigError(
                f"push-to-hub must be a Hugging Face repository id 'owner/name' (letters, "
                f"digits, '-', '_', '.'), or '' not to push; got {self.push_to_hub!r}"
            )

    def _validate_recovery(self) -> None:
        at_least("recovery-rounds", self.recovery_rounds, 0)
        one_of("recovery-method", self.recovery_method, RECOVERY_METHODS)
        one_of("recovery-windows", self.recovery_windows, RECOVERY_WINDOWS)
        at_least("recovery-steps", self.recovery_steps, 1)
        at_least("recovery-samples", self.recovery_samples, 1)
        if isinstance(self.recovery_lr, str):
            if self.recovery_lr != "auto":
                raise ConfigError(
                    f"recovery-lr must be a positive number or 'auto', got {self.recovery_lr!r}"
                )
        elif not (math.isfinite(self.recovery_lr) and self.recovery_lr > 0):
            raise ConfigError(
                f"recovery-lr must be a positive number or 'auto', got {self.recovery_lr}"
            )
        if not 0 <= self.recovery_distill <= 1:
            raise ConfigError(
                f"recovery-distill must be a number in [0, 1], got {self.recovery_distill}"
            )
        if not self.recovery_rounds:
            return
        if self.strategy == "standalone":
            raise ConfigError(
                "recovery-rounds: strategy standalone has no global model to recover, and a "
                "member's recovered model never leaves it; for each member's own recovery, "
                "run a federated strategy with standalone-eval=true (the report's standalone "
                "'after-recovery'), or set recovery-rounds=0"
            )
        if self.recovery_method == "masked" and self.dtype != "float32":
            raise ConfigError(
                f"recovery-method='masked' trains the kept weights in the model's dtype, and "
                f"AdamW steps round away in {self.dtype}: set dtype='float32', or "
                f"recovery-method='lora' (the base stays frozen in {self.dtype})"
            )
        if self.resume_from:
            raise ConfigError("resume-from: a run with recovery-rounds keeps no checkpoint yet")
        if self.secure_aggregation and self.recovery_method != "masked":
            raise ConfigError(
                f"recovery-method={self.recovery_method!r} with secure-aggregation: SecAgg+ "
                "clips each change to a range, and only 'masked' changes have one (the most "
                "recovery-steps AdamW steps at recovery-lr move a weight); set "
                "recovery-method='masked'"
            )

    def _validate_owl(self) -> None:
        one_of("sparsity-profile", self.sparsity_profile, SPARSITY_PROFILES)
        if not self.owl_m > 0:
            raise ConfigError(f"owl-m must be positive, got {self.owl_m}")
        if self.sparsity_profile != "owl":
            return
        bound = min(self.sparsity, 1 - self.sparsity)
        if not 0 <= self.owl_lambda < bound:
            raise ConfigError(
                f"owl-lambda must be in [0, min(sparsity, 1 - sparsity)) = [0, {bound:g}) so "
                f"that every layer's sparsity stays in (0, 1); got {self.owl_lambda}"
            )
        if self.pattern.strip().lower() != "unstructured":
            raise ConfigError(
                f"sparsity-profile='owl' sets a sparsity per layer, but pattern={self.pattern!r} "
                "fixes every matrix's ratio at 1 - N/M: use pattern='unstructured' or "
                "sparsity-profile='uniform'"
            )
        if self.secure_aggregation:
            raise ConfigError(
                "sparsity-profile='owl' with secure-aggregation: the profile round sends each "
                "client's dense statistics in the clear; set sparsity-profile='uniform'"
            )

    def as_dict(self) -> dict[str, object]:
        """Kebab-case keys, as a user writes them."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}

    def reply_limit(self, implied: int) -> int:
        """The most bytes a reply may hold: what its assignment implies, within the
        ``max-payload-mb`` cap."""
        return min(implied, int(self.max_payload_mb * 2**20))

    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()
