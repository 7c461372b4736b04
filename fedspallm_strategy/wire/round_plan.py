"""Which layers each round of a layer-wise FedSpaLLM run prunes, re-solves and hands down.

The decoder layers split into groups of ``layers-per-round`` consecutive layers (0: one group
of every layer). A client keeps the calibration inputs entering some layer in its cache-dir
between rounds, so every round says where the client starts, what it does per layer, and
where it keeps its inputs for the next round. Per round and layer, a client either

- *advances* through the merged global layer the message carries (``calibration='global'``),
- *re-solves* its kept weights under the global mask the message carries (``resolve``),
- *prunes* the layer on its own (the paper's local step), or
- runs it as it holds it (a dense layer it was not assigned: the paper's cached dense layers).

The plans:

- ``local`` (the paper's): round g prunes group g, each client advancing through its *own*
  pruned layers; with ``resolve``, rounds G+1..2G then re-solve the groups in order, starting
  again from the shard. One group (``layers-per-round=0``) is the paper's one-shot (+1 round).
- ``global``: round g hands down the merged group g-1 and prunes group g on inputs that went
  through it, so every client prunes on what the global model will see. With ``resolve``,
  unpipelined, a round prunes group g and the next re-solves it (2G rounds); pipelined, round
  r hands down group r-2, re-solves group r-1 and prunes group r (G+1 rounds), so a group's
  pruning sees the group below it through the clients' own re-solved weights, not the merged.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedspallm_strategy.config import CALIBRATIONS


@dataclass(frozen=True)
class RoundStep:
    """What every client does in one round (all layer tuples are consecutive and ordered)."""

    prune: tuple[int, ...] = ()  # layers pruned this round (each node: its assigned ones)
    resolve: tuple[int, ...] = ()  # layers re-solved under the global masks sent down
    advance: tuple[int, ...] = ()  # merged global layers sent down to advance through
    start: int = 0  # first layer the client runs: 0 = capture from its shard, else its cache
    keep_from: int | None = None  # keep the inputs entering this layer for the next round

    @property
    def end(self) -> int:
        """One past the last layer the client must run."""
        last = max((*self.prune, *self.resolve, *self.advance), default=self.start - 1)
        return max(last + 1, self.keep_from or 0)

    def as_dict(self) -> dict[str, object]:
        """Flat, Flower-record-friendly: ``keep-from`` -1 stands for None."""
        return {
            "prune": list(self.prune),
            "resolve": list(self.resolve),
            "advance": list(self.advance),
            "start": self.start,
            "keep-from": -1 if self.keep_from is None else self.keep_from,
        }

    @classmethod
    def from_dict(cls, values: dict) -> RoundStep:
        """The inverse of :meth:`as_dict`, checked (it arrives in a message)."""
        if set(values) != {"prune", "resolve", "advance", "start", "keep-from"}:
            raise ValueError(f"round step: unexpected keys {sorted(values)}")
        layers = {}
        for key in ("prune", "resolve", "advance"):
            ids = values[key]
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"round step: '{key}' must be a list of layer ids, got {ids!r}")
            if ids != sorted(set(ids)):
                raise ValueError(f"round step: '{key}' must be sorted and distinct, got {ids}")
            layers[key] = tuple(ids)
        start, keep = values["start"], values["keep-from"]
        if not isinstance(start, int) or not isinstance(keep, int) or start < 0 or keep < -1:
            raise ValueError(f"round step: bad start {start!r} or keep-from {keep!r}")
        if any(i < start for ids in layers.values() for i in ids):
            raise ValueError(f"round step: layers {layers} precede the start layer {start}")
        return cls(**layers, start=start, keep_from=None if keep == -1 else keep)

    def for_node(self, prune: tuple[int, ...], resolve: tuple[int, ...]) -> RoundStep:
        """This step as one node sees it: only its own layers to prune and re-solve."""
        return RoundStep(prune, resolve, self.advance, self.start, self.keep_from)


def layer_groups(num_layers: int, layers_per_round: int) -> list[tuple[int, ...]]:
    """Consecutive groups of ``layers_per_round`` layers (0: a single group of all)."""
    size = layers_per_round or num_layers
    return [tuple(range(s, min(s + size, num_layers))) for s in range(0, num_layers, size)]


def plan_rounds(
    num_layers: int,
    *,
    calibration: str,
    resolve: bool,
    layers_per_round: int,
    pipelined: bool = True,
) -> list[RoundStep]:
    """The rounds of a layer-wise run (see the module docstring).

    ``calibration='global'`` treats ``layers_per_round=0`` as 1; ``pipelined`` only matters
    for ``global`` with ``resolve``.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(
            f"calibration must be one of {', '.join(CALIBRATIONS)}; got {calibration!r}"
        )
    if calibration == "local":
        groups = layer_groups(num_layers, layers_per_round)
        steps = [_sequential(groups, i, "prune") for i in range(len(groups))]
        if resolve:
            steps += [_sequential(groups, i, "resolve") for i in range(len(groups))]
        return steps
    groups = layer_groups(num_layers, layers_per_round or 1)
    if not resolve:
        return [_global_prune(groups, i, keep=i + 1 < len(groups)) for i in range(len(groups))]
    if not pipelined:
        steps = []
        for i, group in enumerate(groups):
            steps.append(_global_prune(groups, i, keep=True))
            last = i + 1 == len(groups)
            steps.append(
                RoundStep(resolve=group, start=group[0], keep_from=None if last else group[0])
            )
        return steps
    steps = []
    for r in range(len(groups) + 1):  # round r: advance r-2, re-solve r-1, prune r
        advance = groups[r - 2] if r >= 2 else ()
        resolve_group = groups[r - 1] if r >= 1 else ()
        prune = groups[r] if r < len(groups) else ()
        start = (advance or resolve_group or prune)[0] if r >= 1 else 0
        keep = resolve_group[0] if r >= 1 else 0
        steps.append(
            RoundStep(
                prune=prune,
                resolve=resolve_group,
                advance=advance,
                start=start,
                keep_from=keep if r < len(groups) else None,
            )
        )
    return steps


def _sequential(groups: list[tuple[int, ...]], i: int, action: str) -> RoundStep:
    """Local calibration: group i, continuing from where group i-1 left the inputs."""
    keep = groups[i + 1][0] if i + 1 < len(groups) else None
    return RoundStep(**{action: groups[i]}, start=groups[i][0], keep_from=keep)


def _global_prune(groups: list[tuple[int, ...]], i: int, *, keep: bool) -> RoundStep:
    """Global calibration: advance through merged group i-1, then prune group i."""
    advance = groups[i - 1] if i else ()
    start = advance[0] if advance else 0
    return RoundStep(
        prune=groups[i], advance=advance, start=start, keep_from=groups[i][0] if keep else None
    )
