"""A Flower Grid that delivers messages synchronously to ClientApps in this process.

It runs the real ServerApp logic and the real ClientApp handlers without a SuperLink
or Ray: for tests and debugging (a round costs what local training costs).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE_ID = 1000  # node id 1 (SUPERLINK_NODE_ID) is the SuperLink's own


class InProcessGrid(Grid):
    """Nodes ``FIRST_NODE_ID + i`` run ``client_app`` with ``node_configs[i]`` (and, as a
    SuperNode would, hold ``public_keys[i]``, PEM; default: none)."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict], run_config: dict,
                 run_id: int = 1, public_keys: list[bytes] | None = None) -> None:
        self.client_app = client_app
        self.run_id, self.run_config = run_id, run_config
        self.contexts: dict[int, Context] = {}
        self.public_keys: dict[int, bytes] = {}
        for i, nc in enumerate(node_configs):
            self.add_node(nc, public_keys[i] if public_keys else b"")
        # fault injection: `offline` nodes are no longer listed; `silent` ones take messages
        # and answer none while silent (a message is handled when it is pulled after the node
        # leaves `silent`, as a SuperNode that wakes up handles what waited for it); messages
        # to `unreachable` ones come back as the SuperLink's "node unavailable" error (what a
        # SuperLink sends once a node stops heartbeating)
        self.offline: set[int] = set()
        self.silent: set[int] = set()
        self.unreachable: set[int] = set()
        # a node in `tamper` answers with tamper[node](message, its honest reply) instead
        self.tamper: dict[int, Callable[[Message, Message], Message]] = {}
        self.sent: Counter[tuple[int, str]] = Counter()  # (node, message type) -> messages delivered
        self._replies: dict[str, Message] = {}
        self._held: dict[str, Message] = {}  # messages a silent node took
        self._ids = itertools.count()
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 1

    @property
    def run(self):  # pragma: no cover - not needed in process
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def add_node(self, node_config: dict, public_key: bytes = b"") -> int:
        node = max(self.contexts, default=FIRST_NODE_ID - 1) + 1
        self.contexts[node] = Context(run_id=self.run_id, node_id=node, node_config=dict(node_config),
                                      state=RecordDict(), run_config=self.run_config)
        self.public_keys[node] = public_key
        return node

    def restart(self, node: int, public_key: bytes | None = None, linger: bool = False) -> int:
        """The SuperNode restarts: it comes back under a new node id, with the same key
        unless ``public_key`` is given (a SuperNode without a persistent key draws a new one
        at each start). ``linger``: the old id stays listed but unreachable (the SuperLink
        has not noticed yet)."""
        new = self.add_node(self.contexts[node].node_config, self.public_keys[node] if public_key is None
                            else public_key)
        (self.unreachable if linger else self.offline).add(node)
        return new

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.public_keys[n]) for n in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            key = msg.metadata.__dict__["_message_id"] = str(next(self._ids))  # as Flower's grids do
            ids.append(key)
            if node in self.silent:
                self._held[key] = msg
                continue
            self._deliver(key, msg)
        return ids

    def _deliver(self, key: str, msg: Message) -> None:
        node = msg.metadata.dst_node_id
        if node in self.unreachable:
            reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # sent by the SuperLink
            self._replies[key] = reply
            return
        self.sent[node, msg.metadata.message_type] += 1
        try:
            reply = self.client_app(msg, self.contexts[node])
            self._replies[key] = self.tamper[node](msg, reply) if node in self.tamper else reply
        except Exception as e:  # as a SuperNode does: the failure becomes an error reply
            self._replies[key] = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        for i in message_ids:
            msg = self._held.get(i)
            if msg is not None and msg.metadata.dst_node_id not in self.silent | self.offline:
                self._deliver(i, self._held.pop(i))
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
