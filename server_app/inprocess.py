"""A Flower ``Grid`` that calls the ClientApp in this process: no SuperLink, no Ray.

Strategies run through it exactly as under ``flwr run`` (same ``Strategy.start``, same
messages, same ClientApp handlers), in milliseconds of overhead. Tests and benchmarks use it
to run many federations quickly; ``fail`` lets a test replace a node's reply.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from itertools import count

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

log = logging.getLogger(__name__)

# A hook that may replace (or drop, by returning None) a node's reply before the strategy sees it.
ReplyFilter = Callable[[int, Message], Message | None]


def _set_task_identity(run_id: int) -> None:
    """Messages read the run/task/node identity of the process (set by Flower's runtime)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older flwr: identity is not process-wide
        return
    TaskIdentity.run_id = run_id
    TaskIdentity.task_id = 0
    TaskIdentity.node_id = 0


class InProcessGrid(Grid):
    """Delivers every message to ``client_app`` with the destination node's own Context."""

    delivers_on_push = True  # a reply the filter dropped never arrives: nobody waits for it

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Mapping[int, dict],
        run_config: dict,
        *,
        reply_filter: ReplyFilter | None = None,
        run_id: int = 1,
    ):
        _set_task_identity(run_id)
        self.client_app = client_app
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id, node_config in node_configs.items()
        }
        self.reply_filter = reply_filter
        self._run = Run.create_empty(run_id)
        self._ids = count(1)
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []  # every message pushed, for tests to inspect

    @classmethod
    def simulation(
        cls, client_app: ClientApp, num_nodes: int, run_config: dict, **kwargs
    ) -> InProcessGrid:
        """Nodes 1..K with ``partition-id``/``num-partitions``, like Flower's simulation."""
        configs = {
            node: {"partition-id": node - 1, "num-partitions": num_nodes}
            for node in range(1, num_nodes + 1)
        }
        return cls(client_app, configs, run_config, **kwargs)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content=content,
            message_type=message_type,
            dst_node_id=dst_node_id,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent.append(message)
            reply = self._deliver(message)
            if reply is not None:
                self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message | None:
        node_id = message.metadata.dst_node_id
        try:
            # A copy, as over the wire: handlers and mods may change what they receive (Flower's
            # SecAgg+ workflow sends one content object to every node; its mod pops from it).
            reply = self.client_app(copy.deepcopy(message), self.contexts[node_id])
        except Exception as error:  # noqa: BLE001 - mirrors Flower's error replies
            log.warning("node %d failed: %s", node_id, error)
            reply = Message(
                Error(code=1, reason=f"{type(error).__name__}: {error}"), reply_to=message
            )
        if self.reply_filter is not None:
            return self.reply_filter(node_id, reply)
        return reply
