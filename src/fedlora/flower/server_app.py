"""Flower ServerApp: fedlora's FederatedServer driving real nodes through Flower's grid.

Each round: sample clients as the simulator does, build one task per node (per-client
shapes), send, collect replies until the round timeout, decode, aggregate. A node that
errs or does not answer in time is dropped for the round and named in the log;
screening and ``reliability.min_clients`` then decide whether the round counts.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..experiment import Experiment, build_experiment
from ..runner import run
from . import codec
from .run_config import RUN_MIN_NODES, RUN_ROUND_TIMEOUT, config_from_run_config

log = logging.getLogger("fedlora.flower")
app = ServerApp()


class GridRounds:
    """The round function :func:`fedlora.runner.run` calls, carried over a Flower grid."""

    def __init__(self, grid: Grid, min_nodes: int, round_timeout: float, wait_timeout: float = 300):
        self.grid, self.round_timeout = grid, round_timeout
        self.min_nodes, self.wait_timeout = min_nodes, wait_timeout
        self.node_of: dict[int, int] = {}  # client id -> node id

    def register(self, exp: Experiment) -> None:
        """Ask every node for its client id, budget and example count."""
        deadline = time.monotonic() + self.wait_timeout
        while len(list(self.grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {self.min_nodes} nodes connected in {self.wait_timeout} s")
            time.sleep(0.5)
        msgs = {n: Message(RecordDict(), dst_node_id=n, message_type=codec.QUERY) for n in self.grid.get_node_ids()}
        replies, failed = self._send(msgs)
        for node, reason in failed.items():
            log.warning("node %s failed to register: %s", node, reason)
        for reply in replies.values():
            cid, budget, n = codec.decode_profile(reply.content)
            self.node_of[cid] = reply.metadata.src_node_id
            exp.server.budgets[cid] = budget
            exp.server.num_examples[cid] = n
        log.info("registered clients %s", {c: exp.server.budgets[c] for c in sorted(self.node_of)})

    def _send(self, msgs: dict[int, Message]) -> tuple[dict[int, Message], dict[int, str]]:
        """Send, wait up to the round timeout; (replies, failure reasons), keyed like ``msgs``.

        Replies are matched to the message they answer, not to their sender: when a node
        stops heartbeating, the "node unavailable" error comes from the SuperLink (node 1).
        """
        replies = self.grid.send_and_receive(list(msgs.values()), timeout=self.round_timeout)
        key_of = {m.metadata.message_id: k for k, m in msgs.items()}  # ids are set by the push
        ok, failed = {}, {}
        for reply in replies:
            k = key_of.get(reply.metadata.reply_to_message_id)
            if k is not None and reply.has_error():
                failed[k] = reply.error.reason
            elif k is not None:
                ok[k] = reply
        for k in msgs.keys() - ok.keys() - failed.keys():
            failed[k] = f"no reply within {self.round_timeout:.0f} s"
        return ok, failed

    def __call__(self, exp: Experiment, rnd: int) -> dict:
        if not self.node_of:
            self.register(exp)
        online = set(self.grid.get_node_ids())
        sampled = exp.server.sample(rnd)
        cids = [c for c in sampled if self.node_of.get(c) in online]
        for c in sorted(set(sampled) - set(cids)):
            log.warning("round %d: client %d dropped: its node %s is not connected", rnd, c,
                        self.node_of.get(c, "(never registered)"))
        tasks = exp.server.configure(rnd, cids)
        msgs = {c: Message(codec.encode_task(t, rnd), dst_node_id=self.node_of[c], message_type=codec.TRAIN)
                for c, t in tasks.items()}
        replies, failed = self._send(msgs)
        for c, reason in sorted(failed.items()):
            log.warning("round %d: node %s (client %d) dropped: %s", rnd, self.node_of[c], c, reason)
        updates = [(c, codec.decode_update(r.content, tasks[c])) for c, r in sorted(replies.items())]
        metrics = exp.server.aggregate(rnd, tasks, updates)
        metrics["dropped_clients"] = sorted(set(sampled) - set(replies))
        return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = config_from_run_config(rc)
    rounds = GridRounds(grid, min_nodes=int(rc.get(RUN_MIN_NODES, cfg.data.num_clients)),
                        round_timeout=float(rc.get(RUN_ROUND_TIMEOUT, 600)))
    summary = run(cfg, rounds, overwrite=True, progress=False, exp=build_experiment(cfg))
    log.warning("fedlora run finished: %s", summary)
