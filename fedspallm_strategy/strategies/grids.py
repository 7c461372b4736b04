"""Views of a Flower ``Grid`` that each change one thing, and delegate the rest.

:class:`StreamingReplies` is how a round's replies reach a strategy: Flower's own
``send_and_receive`` (``superlink/grid/http_grid.py``) collects every reply in a list before
``aggregate_train`` sees the first, so a server that streams into accumulators would still
hold K whole payloads. Here the replies are pulled one message id at a time, as the strategy
asks for the next, and nothing keeps a reply once it is handed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # between pulls of a reply that has not arrived yet


class GridView(Grid):
    """``grid`` as it is: every call goes to it. Subclasses override what they change."""

    def __init__(self, grid: Grid):
        self.grid = grid

    @property
    def delivers_on_push(self) -> bool:
        """Whether every reply exists once its message is pushed (an in-process grid): a
        reply missing then never comes, so nobody need wait for it."""
        return getattr(self.grid, "delivers_on_push", False)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class StreamingReplies(GridView):
    """``send_and_receive`` pushes the messages now and returns an iterator of the replies.

    The iterator pulls one reply at a time, in the order the messages were pushed: a run's
    sums are then the same whatever order the nodes finish in (float addition is not
    associative), and a reply that arrived early waits in the SuperLink, not here. Once
    ``timeout`` seconds have passed, every reply that has arrived is still handed on; the
    others are missing, exactly as with Flower's own ``send_and_receive``.
    """

    def __init__(self, grid: Grid, poll_seconds: float = POLL_SECONDS):
        super().__init__(grid)
        self.poll_seconds = poll_seconds

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterator[Message]:
        message_ids = [mid for mid in self.grid.push_messages(messages) if mid]
        del messages  # the strategy may free its requests while the replies come in
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._pull_in_order(message_ids, deadline)

    def _pull_in_order(self, message_ids: list[str], deadline: float | None) -> Iterator[Message]:
        pending = list(message_ids)
        if self.delivers_on_push:
            deadline = time.monotonic()  # what has not arrived never will
        while pending:
            if deadline is not None and time.monotonic() >= deadline:
                break
            replies = list(self.grid.pull_messages(pending[:1]))
            if not replies:
                time.sleep(self.poll_seconds)
                continue
            pending.pop(0)
            while replies:  # one id gives at most one reply; pop so no reference stays here
                yield replies.pop()
        # Past the deadline: what did arrive still counts, in push order.
        missing = 0
        for message_id in pending:
            replies = list(self.grid.pull_messages([message_id]))
            missing += not replies
            while replies:
                yield replies.pop()
        if missing:
            log.warning("%d of %d replies did not arrive in time", missing, len(message_ids))
