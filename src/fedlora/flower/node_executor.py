"""The worker as its node's task executor: every message answered in the long-running process.

Flower 1.41's SuperNode hands each message to a *task executor*: with ``--isolation subprocess``
its SuperExec starts a fresh ``flwr-clientapp`` process per message (Python, Flower's imports, the
FAB unpacked, the app loaded), which costs seconds a round even when that process only forwards
to a worker. With ``--isolation process`` the SuperNode waits for an outside executor instead, on
its Runtime API, and the worker is that executor: it acquires each task with the node's SuperExec
secret (so no other local user can take the node's tasks), pulls the message and the node's
context, runs fedlora's own ClientApp in this process (the model, the data and the LoRA wrapper
stay loaded), and pushes the reply and the context back, exactly what ``flwr-clientapp`` does.

The node runs the fedlora it has installed, never code the coordinator sends: a run whose app is not
a fedlora app is refused, in one line, with an error reply.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.clientapp import ClientApp
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, metadata_from_proto, metadata_to_proto
from flwr.proto.message_pb2 import Metadata as ProtoMetadata  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

FEDLORA_APPS = ("fedlora.flower.node_app:app", "fedlora.flower.client_app:app")
HEARTBEAT_S = 10.0  # what flwr-clientapp sends: a task whose heartbeats stop is given up by the SuperNode
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


def runtime_client(address: str, *, secret: bytes | None = None, token: str | None = None) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API on loopback: as the node's SuperExec (``secret``) or for
    one task (``token``)."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec" if token is None
                                                        else "flwr-clientapp")]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({ACQUIRE})))
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def acquire(client: RuntimeHttpClient) -> str | None:
    """The token of the node's next ClientApp task, if one waits."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return res.token if res.HasField("task") and res.token else None


def pull_task(client: RuntimeHttpClient) -> tuple[Message, Context, Fab]:
    """The task's message, the node's context and the run's FAB (``flwr-clientapp``'s pull). The SuperNode
    offers a task before it has the message's content from the SuperLink: waiting for it in steps of up
    to 0.25 s, not Flower's 1, 2, 4 ... s, saves seconds a round on loopback."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context = context_from_proto(res.context)
    got = client.PullMessages(PullAppMessagesRequest())
    if not got.messages_list:
        raise RuntimeError("the SuperNode offered a task without a message")
    node, tree = Node(node_id=context.node_id), got.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_tries_per_object=None, initial_backoff=0.02, backoff_cap=0.25)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it: the deflated message lacks it
    return message, context, fab_from_proto(res.fab)


def _beat(client: RuntimeHttpClient, cancelled: threading.Event, done: threading.Event) -> None:
    """Keep the task alive; a task the SuperNode no longer runs (``flwr stop``) is marked cancelled.
    (Flower's own heartbeat raises SIGINT in the process for that: not in a worker that lives on.)"""
    while not done.wait(HEARTBEAT_S):
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                cancelled.set()
                return
        except Exception:  # a missed beat: the SuperNode gives up the task after several
            continue


def fedlora_app(fab_content: bytes) -> str:
    """The run's ClientApp reference; raises ValueError unless it is one of fedlora's."""
    ref = get_fab_config(fab_content)["tool"]["flwr"]["app"]["components"]["clientapp"]
    if ref not in FEDLORA_APPS:
        raise ValueError(f"the run's app has clientapp = {ref!r}, not fedlora's ({FEDLORA_APPS[0]}): "
                         "this node runs only the fedlora it has installed")
    return ref


def run_task(address: str, token: str, app: ClientApp, say: Callable[[str], None] = print,
             task_file: Path | None = None) -> str:
    """Pull one task, answer it with ``app`` in this process, push the reply and the node's context back;
    a line for the worker's log (what it was, and where its time went)."""
    client = runtime_client(address, token=token)
    cancelled, done = threading.Event(), threading.Event()
    threading.Thread(target=_beat, args=(client, cancelled, done), daemon=True).start()
    try:
        t0 = time.perf_counter()
        message, context, fab = pull_task(client)
        what = f"{message.metadata.message_type} (run {context.run_id})"
        if task_file is not None:  # what a successor needs to answer this task, should this worker die
            meta = base64.b64encode(metadata_to_proto(message.metadata).SerializeToString()).decode()
            write_private(task_file, json.dumps({"token": token, "message_id": message.metadata.message_id,
                                                 "metadata": meta}))
        say(f"{what}: started")
        t1 = time.perf_counter()
        try:
            fedlora_app(fab.content)
            reply, status, details = app(message=message, context=context), SubStatus.COMPLETED, ""
        except Exception as e:  # the handler's failure is this node's, replied as Flower replies it
            details = f"{type(e).__name__}: {e}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
            status = SubStatus.FAILED
        t2 = time.perf_counter()
        if cancelled.is_set():
            return f"{what}: cancelled by the SuperNode"
        push_message(client, reply, context)
        push_task_output(client, context, status, details)
        return (f"{what}" + (f" failed: {details}" if details else "") +
                f" (pull {t1 - t0:.2f} s, answer {t2 - t1:.2f} s, push {time.perf_counter() - t2:.2f} s)")
    finally:
        done.set()
        client.close()


def fail_orphan(address: str, held: dict) -> str:
    """The task a dead worker left half done (its token and its message's metadata, kept in the task file):
    answered with an error at once, so the round drops this node now and the SuperNode takes the next
    message, instead of both waiting a minute for the task's heartbeat to run out. (The SuperNode hands a
    task's input and message out once, hence the metadata kept.)"""
    metadata = metadata_from_proto(ProtoMetadata.FromString(base64.b64decode(held["metadata"])))
    metadata.__dict__["_message_id"] = held["message_id"]
    reason = "the node's worker died during this task (it was restarted)"
    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                    reply_to=make_message(metadata=metadata, content=RecordDict()))
    node = Context(run_id=metadata.run_id, node_id=metadata.dst_node_id, node_config={}, state=RecordDict(),
                   run_config={})
    client = runtime_client(address, token=held["token"])
    try:
        push_message(client, reply, node)
        push_task_output(client, None, SubStatus.FAILED, reason)  # None: the node's stored context stays
    finally:
        client.close()
    return f"{metadata.message_type} (run {metadata.run_id}) left by the previous worker: failed"


def serve_tasks(address: str, secret: bytes, app: ClientApp, task_file: Path, poll_s: float = 0.1,
                say: Callable[[str], None] = print, stop: threading.Event | None = None) -> None:
    """Acquire and answer the node's tasks one at a time until ``stop`` is set (None: forever). The token of
    the task in hand is kept in ``task_file`` (for the next worker, should this one die); a SuperNode not
    yet (or no longer) up is waited for; one task's failure never ends the loop."""
    if task_file.exists():
        try:
            say(fail_orphan(address, json.loads(task_file.read_text())))
        except Exception as e:  # died before it had the message, or the task expired: nothing left to fail
            say(f"the previous worker's task is gone ({type(e).__name__})")
        task_file.unlink(missing_ok=True)
    executor = runtime_client(address, secret=secret)
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            token = acquire(executor)
        except Exception:  # the SuperNode is starting or restarting
            token = None
            stop.wait(max(poll_s, 0.5))
        if token is None:
            stop.wait(poll_s)
            continue
        write_private(task_file, json.dumps({"token": token}))
        t0 = time.perf_counter()
        try:
            line = run_task(address, token, app, say, task_file)
        except Exception as e:
            line = f"task dropped: {type(e).__name__}: {e}"
        task_file.unlink(missing_ok=True)
        say(f"{line} ({time.perf_counter() - t0:.2f} s)")


def write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by this user alone from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
