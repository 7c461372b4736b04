"""What a run did, per node: assignments, rejections, bytes and client metrics (for the report)."""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Accounting:
    """Who was rejected and how many bytes moved, for the report."""

    rejected: list[dict] = field(default_factory=list)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    largest_up: int = 0  # the largest accepted reply, in bytes
    client_metrics: dict[int, dict] = field(default_factory=dict)
    assignments: dict[int, dict[int, list[int]]] = field(
        default_factory=dict
    )  # round -> node -> layers

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Accounting:
        """JSON turned the int keys into strings; turn them back."""

        def ints(mapping: dict) -> dict:
            return {int(k): v for k, v in mapping.items()}

        return cls(
            rejected=data["rejected"],
            bytes_up=ints(data["bytes_up"]),
            bytes_down=ints(data["bytes_down"]),
            largest_up=data.get("largest_up", 0),
            client_metrics=ints(data["client_metrics"]),
            assignments={int(r): ints(a) for r, a in data["assignments"].items()},
        )

    def add_up(self, node: int, size: int) -> None:
        """An accepted reply of ``size`` bytes from ``node``."""
        self.bytes_up[node] = self.bytes_up.get(node, 0) + size
        self.largest_up = max(self.largest_up, size)

    def add_metrics(self, node: int, metrics: dict) -> None:
        """A node's metrics summed over the rounds it answered (``rounds`` counts them)."""
        totals = self.client_metrics.setdefault(node, {"rounds": 0})
        totals["rounds"] += 1
        for key, value in metrics.items():
            if key == "num-examples":
                totals[key] = value
            elif isinstance(value, int | float):
                totals[key] = round(totals.get(key, 0) + value, 3)

    def rejected_in(self, server_round: int) -> set[int]:
        return {r["node"] for r in self.rejected if r["round"] == server_round}

    def reject_silent(
        self, server_round: int, assignments: Mapping[int, list[int]], answered: Container[int]
    ) -> list[int]:
        """Record every node asked in ``server_round`` that neither answered nor was rejected
        (the grid's timeout passed); returns them."""
        rejected = self.rejected_in(server_round)
        silent = sorted(n for n in assignments if n not in answered and n not in rejected)
        for node in silent:
            self.reject(server_round, node, assignments[node], "no reply in time")
        return silent

    def reject(self, server_round: int, node: int, layers: list[int], reason: str) -> None:
        log.warning(
            "round %d: rejected reply of node %d (layers %s): %s",
            server_round,
            node,
            layers,
            reason,
        )
        self.rejected.append(
            {"round": server_round, "node": node, "layers": layers, "reason": reason}
        )
