"""StreamingReplies: a round's replies are pulled one at a time, in push order, and dropped."""

import gc
import time
import weakref

import pytest
from flwr.app import ArrayRecord

from client_app.app import app as client_app
from fedspallm_strategy.config import RunConfig
from fedspallm_strategy.strategies.grids import StreamingReplies
from fedspallm_strategy.strategies.one_shot import MergeStrategy
from llm_pruning.models import load_model
from server_app.inprocess import InProcessGrid


class _Reply:
    def __init__(self, message_id: str):
        self.message_id = message_id


class _ScheduledGrid:
    """Replies become available after a number of pulls (never, for ``None``)."""

    def __init__(self, arrivals: dict[str, int | None]):
        self.arrivals = arrivals
        self.pulls = 0
        self.pulled_ids: list[list[str]] = []
        self.handed_out: list[weakref.ref] = []
        self.alive_at_pull: list[int] = []

    def push_messages(self, messages):
        return list(messages)  # the "messages" are their own ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        gc.collect()
        self.alive_at_pull.append(sum(ref() is not None for ref in self.handed_out))
        self.pulled_ids.append(list(message_ids))
        ready = []
        for mid in message_ids:
            due = self.arrivals.get(mid)
            if due is not None and self.pulls >= due:
                self.arrivals[mid] = None  # a reply is pulled once
                reply = _Reply(mid)
                self.handed_out.append(weakref.ref(reply))
                ready.append(reply)
        return ready


def _stream(arrivals, timeout=None):
    grid = _ScheduledGrid(dict(arrivals))
    return grid, StreamingReplies(grid, poll_seconds=0.001).send_and_receive(
        list(arrivals), timeout=timeout
    )


def test_replies_come_in_push_order_whatever_order_they_arrive_in():
    # c arrives first, a last: still a, b, c.
    grid, stream = _stream({"a": 5, "b": 3, "c": 1})
    assert [reply.message_id for reply in stream] == ["a", "b", "c"]
    assert all(len(ids) == 1 for ids in grid.pulled_ids)  # one message id per pull


def test_no_reply_is_held_while_the_next_is_pulled():
    grid, stream = _stream({"a": 1, "b": 1, "c": 4, "d": 2})
    taken = 0
    for reply in stream:
        taken += 1
        del reply  # what a streaming consumer does
    assert taken == 4
    assert grid.alive_at_pull and max(grid.alive_at_pull) == 0


def test_messages_are_pushed_before_the_first_reply_is_asked_for():
    pushed = []

    class Grid(_ScheduledGrid):
        def push_messages(self, messages):
            pushed.extend(messages)
            return list(messages)

    StreamingReplies(Grid({"a": 1}), poll_seconds=0.001).send_and_receive(["a"], timeout=1)
    assert pushed == ["a"]  # the iterator was never consumed


def test_after_the_deadline_what_arrived_still_counts():
    # "a" never replies; "b" and "c" arrived meanwhile and are still handed on.
    grid, stream = _stream({"a": None, "b": 1, "c": 2}, timeout=0.05)
    assert [reply.message_id for reply in stream] == ["b", "c"]


def test_no_timeout_waits_for_every_reply():
    grid, stream = _stream({"a": 40, "b": 1})
    assert [reply.message_id for reply in stream] == ["a", "b"]
    assert grid.pulls >= 40


@pytest.mark.parametrize("num_nodes", [3])
def test_a_fedspallm_round_holds_one_reply_at_a_time(num_nodes):
    model, _ = load_model("tiny-llama")
    config = RunConfig.from_mapping(
        {"model": "tiny-llama", "calib-samples": 2, "seqlen": 32, "resolve": False}
    )
    inner = InProcessGrid.simulation(client_app, num_nodes, {})
    pulled: list[weakref.ref] = []
    alive: list[int] = []
    pull = inner.pull_messages

    def counting_pull(message_ids):
        gc.collect()
        alive.append(sum(ref() is not None for ref in pulled))
        replies = list(pull(message_ids))
        pulled.extend(weakref.ref(reply) for reply in replies)
        return replies

    inner.pull_messages = counting_pull
    strategy = MergeStrategy(model, config)
    strategy.start(grid=StreamingReplies(inner), initial_arrays=ArrayRecord(), num_rounds=1)
    assert len(pulled) == num_nodes and not strategy.remaining
    assert alive == [0] * num_nodes  # no earlier reply is alive when the next is pulled


def test_a_grid_that_delivers_on_push_is_not_waited_for():
    class Grid(_ScheduledGrid):
        delivers_on_push = True

    grid = Grid({"a": None, "b": 1})
    started = time.monotonic()
    stream = StreamingReplies(grid, poll_seconds=0.001).send_and_receive(["a", "b"], timeout=60)
    assert [reply.message_id for reply in stream] == ["b"]
    assert time.monotonic() - started < 5  # not the round's 60 s timeout
