"""A node's long-running worker: runs the ClientApp's own handlers in one process for the whole
federation, so what they cache (the base model on its device, the tokenised data, the LoRA
wrapper) loads once instead of once per message.

    python -m fedlora.flower.worker --socket /run/user/1000/fedlora/worker.sock [--data PATH]

Flower 1.41 runs every message in a fresh ``flwr-clientapp`` process; with node-config
``worker=SOCK`` that process only forwards the message here (:mod:`.worker_link`) and returns
the reply. The worker answers one request at a time and knows nothing of what the handlers do:
it rebuilds the Message and Context and calls the same ClientApp. ``fedlora node`` starts it
beside the SuperNode and restarts it if it dies.
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
    ap.add_argument("--socket", required=True, type=Path, help="the Unix socket to serve (made 0600)")
    ap.add_argument("--data", default="", help="the node's data file: checked and counted at start")
    ap.add_argument("--device", default="", help="the node's device: checked at start")
    ap.add_argument("--cache-dir", default="", help="cache tokenised data here (default: no cache)")
    args = ap.parse_args(argv)
    from ..device import resolve_device
    from ..errors import ConfigError
    from . import client_app
    from .run_config import NODE_DEVICE

    try:
        held = describe_data(args.data) if args.data else "shared-data mode (partition-id)"
        device = resolve_device(args.device, f"node-config {NODE_DEVICE}") if args.device else "the run's train.device"
        listener = listen(args.socket)
    except (ConfigError, ValueError, OSError) as e:
        print(f"fedlora worker: {e}", file=sys.stderr)
        return 2
    if args.cache_dir:
        token_cache.enable(args.cache_dir)
    count_model_loads()
    log(f"ready on {args.socket} (pid {os.getpid()}); {held}; device {device}")
    with listener:
        serve(listener, client_app.app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
