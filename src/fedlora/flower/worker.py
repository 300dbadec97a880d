"""A node's long-running worker: runs the ClientApp's own handlers in one process for the whole
federation, so what they cache (the base model on its device, the tokenised data, the LoRA
wrapper) loads once instead of once per message.

    python -m fedlora.flower.worker --runtime-api 127.0.0.1:9094 --secret-file F [--data PATH]
    python -m fedlora.flower.worker --socket /run/user/1000/fedlora/worker.sock [--data PATH]

Two ways to receive the node's messages. ``--runtime-api``: the worker is the SuperNode's task
executor (``flower-supernode --isolation process``, :mod:`.node_executor`), so no process is
started per message; ``fedlora node`` runs it so. ``--socket``: a SuperNode in ``--isolation
subprocess`` still starts a ``flwr-clientapp`` process per message, and with node-config
``worker=SOCK`` that process only forwards the message here (:mod:`.worker_link`). Either way the
worker answers one message at a time with the same ClientApp, knowing nothing of what its
handlers do. ``fedlora node`` starts it beside the SuperNode and restarts it if it dies.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from .. import experiment, token_cache
from .worker_link import MAX_FRAME, listen, records_from_bytes, records_to_bytes, recv_frame, send_frame

HEADER_CAP = 1 << 20  # the JSON header holds two small config dicts


def log(text: str) -> None:
    print(f"fedlora worker: {text}", flush=True)


def count_model_loads(say: Callable[[str], None] = log) -> list[int]:
    """Log every base-model load of this process ("loaded model X (load 1)"); the returned list
    holds the count. Wraps the loader the experiment builder calls, whatever handler asks."""
    loads = [0]
    load = experiment.load_model

    def counted(cfg, *args, **kwargs):
        t0 = time.perf_counter()
        out = load(cfg, *args, **kwargs)
        loads[0] += 1
        say(f"loaded model {cfg.name} (load {loads[0]}) in {time.perf_counter() - t0:.1f} s")
        return out

    experiment.load_model = counted
    return loads


def answer(conn: socket.socket, app: ClientApp) -> str:
    """Serve one forwarded message on ``conn``; returns its type (for the log)."""
    header = json.loads(recv_frame(conn, HEADER_CAP))
    log(f"{header['type']} from node {header['node_id']}: started")
    content, state = records_from_bytes(recv_frame(conn, MAX_FRAME)), records_from_bytes(recv_frame(conn, MAX_FRAME))
    context = Context(run_id=int(header["run_id"]), node_id=int(header["node_id"]),
                      node_config=header["node_config"], state=state, run_config=header["run_config"])
    # the identity Flower gives a ClientApp process; Message() reads it
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, context.run_id, context.node_id
    msg = Message(content, dst_node_id=context.node_id, message_type=str(header["type"]))
    msg.metadata.__dict__["_message_id"] = f"worker-{time.monotonic_ns()}"  # reply_to needs one (as grids set it)
    try:
        reply = app(msg, context)
        error = f"{reply.error.code}: {reply.error.reason}" if reply.has_error() else ""
    except Exception as e:  # the handler's failure is the node's, reported to its ClientApp in one line
        error = f"{type(e).__name__}: {e}"
    if error:
        send_frame(conn, json.dumps({"ok": False, "error": error}).encode())
    else:
        for frame in (json.dumps({"ok": True}).encode(), records_to_bytes(reply.content),
                      records_to_bytes(context.state)):
            send_frame(conn, frame)
    return str(header["type"]) + (f" failed: {error}" if error else "")


def serve(listener: socket.socket, app: ClientApp, requests: int | None = None) -> None:
    """Answer forwarded messages one at a time (``requests``: stop after that many; None: forever)."""
    served = 0
    while requests is None or served < requests:
        conn, _ = listener.accept()
        t0 = time.perf_counter()
        with conn:
            if not conn.recv(1, socket.MSG_PEEK):
                continue  # a readiness probe (connect, close): no request
            try:
                what = answer(conn, app)
            except Exception as e:  # a broken, oversized or garbled request costs that request, not the worker
                what = f"request dropped: {type(e).__name__}: {e}"
        log(f"{what} ({time.perf_counter() - t0:.2f} s)")
        served += 1


def describe_data(path: str) -> str:
    """How many rows the node's data file holds (read as ``data.name`` would be)."""
    from ..config.schema import DataConfig
    from ..sources import read_rows

    rows = read_rows(DataConfig(name=path))
    return f"data {rows.where}: {len(rows.train) + len(rows.test or [])} rows"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedlora.flower.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime-api", default="", metavar="HOST:PORT",
                    help="the SuperNode's Runtime API (--isolation process): answer its tasks in this process")
    ap.add_argument("--secret-file", type=Path, help="with --runtime-api: the SuperNode's SuperExec secret")
    ap.add_argument("--ready-file", type=Path, help="with --runtime-api: created once the checks passed")
    ap.add_argument("--task-file", type=Path, help="with --runtime-api: holds the token of the task in hand "
                    "(default: beside the secret file)")
    ap.add_argument("--socket", type=Path, help="the Unix socket to serve (made 0600) for forwarded messages")
    ap.add_argument("--data", default="", help="the node's data file: checked and counted at start")
    ap.add_argument("--device", default="", help="the node's device: checked at start")
    ap.add_argument("--cache-dir", default="", help="cache tokenised data here (default: no cache)")
    args = ap.parse_args(argv)
    if bool(args.runtime_api) == bool(args.socket):
        ap.error("give --runtime-api (with --secret-file) or --socket")
    if args.runtime_api and args.secret_file is None:
        ap.error("--runtime-api needs --secret-file")
    from ..device import resolve_device
    from ..errors import ConfigError
    from . import client_app
    from .run_config import NODE_DEVICE

    try:
        held = describe_data(args.data) if args.data else "shared-data mode (partition-id)"
        device = resolve_device(args.device, f"node-config {NODE_DEVICE}") if args.device else "the run's train.device"
        secret = args.secret_file.read_bytes() if args.runtime_api else b""
        listener = listen(args.socket) if args.socket else None
    except (ConfigError, ValueError, OSError) as e:
        print(f"fedlora worker: {e}", file=sys.stderr)
        return 2
    if args.cache_dir:
        token_cache.enable(args.cache_dir)
    count_model_loads()
    log(f"ready on {args.runtime_api or args.socket} (pid {os.getpid()}); {held}; device {device}")
    if listener is None:
        from .node_executor import serve_tasks

        if args.ready_file:
            args.ready_file.touch()
        task_file = args.task_file or args.secret_file.with_name("task.token")
        serve_tasks(args.runtime_api, secret, client_app.app, task_file, say=log)
        return 0
    with listener:
        serve(listener, client_app.app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
