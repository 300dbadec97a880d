"""Collecting a batch of replies on a fake grid and a fake clock: all in ends at once, a quorum
plus the grace period, never past the timeout; strikes bench a silent node until it answers."""

import pytest

pytest.importorskip("flwr")

from flwr.app import Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedlora.flower import collect as C  # noqa: E402


class FakeGrid:
    """Nodes in ``answer`` reply at once to what they are sent; the others never do."""

    def __init__(self, answer):
        self.answer, self.replies, self.sent, self.n = set(answer), {}, {}, 0

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            self.n += 1
            m.metadata.__dict__["_message_id"] = str(self.n)
            ids.append(str(self.n))
            self.sent[str(self.n)] = m
            if m.metadata.dst_node_id in self.answer:
                self.replies[str(self.n)] = Message(RecordDict(), reply_to=m)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0  # every look at the clock: one second later
        return self.t


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    monkeypatch.setattr(C.time, "sleep", lambda s: None)


def batch(nodes):
    return {n: Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes}


@pytest.mark.parametrize("answer, wait, elapsed, why", [
    ({10, 11, 12}, C.Wait(100, 5, 0.5), 1, None),  # all in: no wait at all
    ({10, 11}, C.Wait(100, 5, 0.5), 6, "no reply within 5 s after 2 of 3 answered (round-grace)"),
    ({10}, C.Wait(100, 5, 0.3), 6, "no reply within 5 s after 1 of 3 answered (round-grace)"),
    ({10}, C.Wait(100, 5, 0.5), 100, "no reply within 100 s (round-timeout)"),  # 1 < the quorum of 2
    (set(), C.Wait(100, 5, 0.5), 100, "no reply within 100 s (round-timeout)"),  # quorum never reached
    ({10}, C.Wait(100, 5, 1.0), 100, "no reply within 100 s (round-timeout)"),
])
def test_a_batch_ends_when_all_are_in_or_grace_after_the_quorum_or_at_the_timeout(answer, wait, elapsed, why):
    clock = Clock()
    got = C.collect(FakeGrid(answer), batch([10, 11, 12]), wait, clock=clock)
    assert set(got.replies) == answer and clock.t - 1 == elapsed
    assert got.unanswered == {n: why for n in {10, 11, 12} - answer}


def test_a_node_silent_limit_times_in_a_row_is_benched_pinged_once_and_back_when_it_answers(caplog):
    s, grid = C.Strikes(2), FakeGrid(set())
    s.record([10], [11])
    s.record([11], [])  # an answer resets the count
    s.record([], [11])
    assert s.benched == set()
    s.record([], [11])
    assert s.benched == {11}
    s.ping(grid, [10, 11, 12], "query")
    s.ping(grid, [10, 11, 12], "query")  # one outstanding ping, not one a round
    assert list(s.pings) == [11] and grid.n == 1
    got = C.collect(grid, {}, C.Wait(1, 1, 0.5), pings=s.pings)
    assert got.pings == {}  # it was asleep when the ping was pushed: nothing yet
    grid.replies["1"] = Message(RecordDict(), reply_to=grid.sent["1"])  # it wakes and answers the ping
    got = C.collect(grid, {}, C.Wait(1, 1, 0.5), pings=s.pings)
    s.record(list(got.pings), [])
    assert s.benched == set() and s.pings == {}
    assert "node 11 benched: no answer 2 times in a row" in caplog.text and "node 11 answers again" in caplog.text
    never = C.Strikes(0)
    for _ in range(5):
        never.record([], [11])
    assert never.benched == set()
