"""The local channel between a node's per-message ClientApp and its long-running worker.

A Unix socket that only its owner can reach (0600, in a directory no one else can write),
length-prefixed frames with a size cap, one request at a time. A request is three frames:
a JSON header (message type, run id, node id, run config, node config), the message's
RecordDict and the node's ``context.state``, both as Flower's own protobuf bytes; a reply is
a JSON header (``{"ok": true}`` or ``{"ok": false, "error": "..."}``) then, if ok, the reply's
RecordDict and the state. Nothing is ever unpickled.

:func:`worker_mod` is the Flower mod every ClientApp handler goes through: with node-config
``worker`` set it hands the message to the worker and returns the worker's reply; without,
the handler runs in this process as usual. This module imports Flower only (no torch): the
per-message process of a node with a worker stays light (:mod:`.node_app`).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

NODE_WORKER = "worker"  # node-config: the Unix socket of the node's long-running worker; unset: none
LENGTH = struct.Struct("!Q")
MAX_FRAME = 2 << 30  # protobuf's own message limit (2 GiB); a bogus length prefix allocates nothing
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with its NUL


class WorkerError(RuntimeError):
    """The worker could not be reached, broke the protocol, or its handler failed."""


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(LENGTH.pack(len(payload)))
    if payload:  # an empty frame is its prefix alone: the peer may already have answered and closed
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WorkerError("the connection closed mid-frame")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, cap: int = MAX_FRAME) -> bytes:
    (n,) = LENGTH.unpack(_recv_exact(sock, LENGTH.size))
    if n > cap:
        raise WorkerError(f"frame of {n} bytes exceeds the cap of {cap}")
    return _recv_exact(sock, n)


def records_to_bytes(records: RecordDict) -> bytes:
    return recorddict_to_proto(records).SerializeToString()


def records_from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def check_socket_path(path: Path) -> None:
    """Refuse a socket path that is too long, or whose directory another user could write
    (they could replace the socket); create a missing directory as 0700."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"worker socket {path}: longer than {MAX_SOCKET_PATH} bytes (a Unix socket limit)")
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ValueError(f"worker socket {path}: its directory must be yours and writable by you alone "
                         f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")


def listen(path: Path) -> socket.socket:
    """A listening socket at ``path`` that only this user can connect to."""
    check_socket_path(path)
    if path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ValueError(f"worker socket {path}: exists and is not a socket")
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise ValueError(f"worker socket {path}: another worker is serving there")
        path.unlink()  # a dead worker's leftover
    sock = socket.socket(socket.AF_UNIX)
    old = os.umask(0o177)  # born 0600: no window in which another user could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def forward(path: str, message_type: str, content: RecordDict, context: Context) -> tuple[RecordDict, RecordDict]:
    """Hand one message to the worker at ``path``; its reply content and the node's new state."""
    st = _stat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise WorkerError(f"worker socket {path} is not a socket of this user")
    node_config = {k: v for k, v in context.node_config.items() if k != NODE_WORKER}
    header = {"type": message_type, "run_id": context.run_id, "node_id": context.node_id,
              "run_config": dict(context.run_config), "node_config": node_config}
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            raise WorkerError(f"worker at {path} is not running ({e.strerror})") from None
        try:
            for frame in (json.dumps(header).encode(), records_to_bytes(content), records_to_bytes(context.state)):
                send_frame(sock, frame)
            reply = json.loads(recv_frame(sock))
            if not reply.get("ok"):
                raise WorkerError(f"worker: {reply.get('error', 'failed')}")
            return records_from_bytes(recv_frame(sock)), records_from_bytes(recv_frame(sock))
        except (OSError, WorkerError) as e:
            if isinstance(e, WorkerError) and str(e).startswith("worker: "):
                raise
            raise WorkerError(f"worker at {path} broke off the task (did it die?): {e}") from None


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise WorkerError(f"worker at {path} is not running ({e.strerror})") from None


def worker_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """With node-config ``worker``: the worker at that socket answers; otherwise this process does."""
    path = context.node_config.get(NODE_WORKER)
    if not path:
        return call_next(msg, context)
    content, context.state = forward(str(path), msg.metadata.message_type, msg.content, context)
    return Message(content, reply_to=msg)
