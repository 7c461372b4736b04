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
    # round -> {"bytes_up": node -> bytes, "bytes_down": node -> bytes}: that round alone
    # (bytes_up and bytes_down above are each node's totals over the run)
    per_round: dict[int, dict[str, dict[int, int]]] = field(default_factory=dict)
    current_round: int = 0  # the round that add_up and add_down count into

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
            per_round={
                int(r): {kind: ints(sizes) for kind, sizes in moved.items()}
                for r, moved in data.get("per_round", {}).items()
            },
            current_round=data.get("current_round", 0),
        )

    def start_round(self, server_round: int) -> None:
        """Count the bytes from now on into ``server_round`` (0: the profile round)."""
        self.current_round = server_round
        self.per_round.setdefault(server_round, {"bytes_up": {}, "bytes_down": {}})

    def _count(self, kind: str, node: int, size: int) -> None:
        totals = getattr(self, kind)
        totals[node] = totals.get(node, 0) + size
        this_round = self.per_round.setdefault(
            self.current_round, {"bytes_up": {}, "bytes_down": {}}
        )[kind]
        this_round[node] = this_round.get(node, 0) + size

    def add_down(self, node: int, size: int) -> None:
        """A message of ``size`` bytes sent to ``node`` in the current round."""
        self._count("bytes_down", node, size)

    def round_bytes(self, server_round: int) -> dict[str, int]:
        """``bytes-up`` and ``bytes-down`` of ``server_round`` alone, over every node."""
        moved = self.per_round.get(server_round, {})
        return {
            "bytes-up": sum(moved.get("bytes_up", {}).values()),
            "bytes-down": sum(moved.get("bytes_down", {}).values()),
        }

    def add_up(self, node: int, size: int) -> None:
        """An accepted reply of ``size`` bytes from ``node``, in the current round."""
        self._count("bytes_up", node, size)
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
