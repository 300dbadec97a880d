"""Collecting replies over a Flower grid without letting one silent node set a round's length.

A batch of messages ends as soon as every message is answered; otherwise once a quorum
of them is answered, it waits at most ``grace`` seconds more (NVIDIA FLARE's
``min_responses`` + ``wait_time_after_min_received``), and never past ``timeout``. A node
that leaves ``limit`` batches in a row unanswered is benched: it is sent no work, only a
ping (a profile query), and comes back once it answers one.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("fedlora.flower")
POLL_S = 0.1  # between pulls (a loopback call to the SuperLink); Flower's own send_and_receive sleeps 3 s


@dataclass(frozen=True)
class Wait:
    timeout: float  # the most a batch waits (run config round-timeout)
    grace: float = 30.0  # once the quorum has answered, the most it waits for the rest (round-grace)
    quorum: float = 0.5  # fraction of a batch's messages whose answers start the grace clock (round-quorum)


@dataclass
class Collected:
    replies: dict[Hashable, Message] = field(default_factory=dict)  # answers, keyed like the messages
    errors: dict[Hashable, str] = field(default_factory=dict)  # error replies: the reason
    unanswered: dict[Hashable, str] = field(default_factory=dict)  # no reply in time: why we stopped waiting
    pings: dict[int, Message] = field(default_factory=dict)  # node -> its answer to an outstanding ping


def collect(grid: Grid, msgs: Mapping[Hashable, Message], wait: Wait, pings: Mapping[int, str] | None = None,
            clock: Callable[[], float] = time.monotonic) -> Collected:
    """Push ``msgs``, pull their replies until all are in, or the quorum plus ``wait.grace``,
    or ``wait.timeout``. ``pings`` (node -> message id of an earlier ping) are pulled along,
    never waited for. Replies are matched to the message they answer, not to their sender."""
    out = Collected()
    start = clock()
    ids = set(grid.push_messages(list(msgs.values()))) if msgs else set()
    key_of = {m.metadata.message_id: k for k, m in msgs.items() if m.metadata.message_id in ids}
    ping_of = {i: n for n, i in (pings or {}).items()}
    need, quorum_at, waiting, why = math.ceil(wait.quorum * len(msgs)), None, set(key_of), ""
    while True:
        for reply in grid.pull_messages(list(waiting | ping_of.keys())):
            to = reply.metadata.reply_to_message_id
            if to in ping_of:
                out.pings[ping_of.pop(to)] = reply
            elif to in waiting:
                waiting.discard(to)
                k = key_of[to]
                if reply.has_error():
                    out.errors[k] = reply.error.reason
                else:
                    out.replies[k] = reply
        now = clock()
        if quorum_at is None and len(msgs) - len(waiting) >= need:
            quorum_at = now
        if not waiting:
            break
        if now - start >= wait.timeout:
            why = f"no reply within {wait.timeout:.0f} s (round-timeout)"
            break
        if quorum_at is not None and now - quorum_at >= wait.grace:
            answered = len(out.replies) + len(out.errors)
            why = f"no reply within {wait.grace:g} s after {answered} of {len(msgs)} answered (round-grace)"
            break
        time.sleep(POLL_S)
    out.unanswered = {key_of[i]: why for i in waiting}
    out.unanswered.update({k: "not delivered (node gone)" for k in msgs.keys() - key_of.values()})
    return out


class Strikes:
    """Nodes that keep silent: counted per batch, benched at ``limit`` in a row (0: never)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count: Counter[int] = Counter()
        self.benched: set[int] = set()
        self.pings: dict[int, str] = {}  # benched node -> id of its outstanding ping

    def record(self, answered: Iterable[int], silent: Iterable[int]) -> None:
        for node in answered:
            self.count.pop(node, None)
            self.pings.pop(node, None)
            if node in self.benched:
                self.benched.discard(node)
                log.warning("node %s answers again: it is sent work again", node)
        for node in silent:
            self.count[node] += 1
            if self.limit and self.count[node] >= self.limit and node not in self.benched:
                self.benched.add(node)
                log.warning("node %s benched: no answer %d times in a row; it is sent no work until it "
                            "answers a ping", node, self.count[node])

    def ping(self, grid: Grid, online: Iterable[int], kind: str) -> None:
        """One outstanding ping per benched, connected node."""
        fresh = [Message(RecordDict(), dst_node_id=n, message_type=kind)
                 for n in sorted(set(online) & self.benched - self.pings.keys())]
        if fresh:
            pushed = set(grid.push_messages(fresh))
            self.pings.update({m.metadata.dst_node_id: m.metadata.message_id for m in fresh
                               if m.metadata.message_id in pushed})
