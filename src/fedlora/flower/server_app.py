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

from ..server import sample_clients
from ..simulate import Experiment, build_experiment, clients_per_round, run
from . import codec

log = logging.getLogger("fedlora.flower")
app = ServerApp()


class GridRounds:
    """The round function :func:`fedlora.simulate.run` calls, carried over a Flower grid."""

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
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=codec.QUERY)
                for n in self.grid.get_node_ids()]
        for reply in self.grid.send_and_receive(msgs, timeout=self.round_timeout):
            if reply.has_error():
                log.warning("node %s failed to register: %s", reply.metadata.src_node_id, reply.error)
                continue
            cid, budget, n = codec.decode_profile(reply.content)
            self.node_of[cid] = reply.metadata.src_node_id
            exp.server.budgets[cid] = budget
            exp.server.num_examples[cid] = n
        log.info("registered clients %s", {c: exp.server.budgets[c] for c in sorted(self.node_of)})

    def __call__(self, exp: Experiment, rnd: int) -> dict:
        if not self.node_of:
            self.register(exp)
        cfg = exp.cfg
        online = set(self.grid.get_node_ids())
        sampled = sample_clients(cfg.data.num_clients, clients_per_round(cfg), cfg.seed, rnd)
        cids = [c for c in sampled if self.node_of.get(c) in online]
        for c in sorted(set(sampled) - set(cids)):
            log.warning("round %d: client %d dropped: its node %s is not connected", rnd, c,
                        self.node_of.get(c, "(never registered)"))
        tasks = exp.server.configure(rnd, cids)
        msgs = [Message(codec.encode_task(t, rnd), dst_node_id=self.node_of[c], message_type=codec.TRAIN)
                for c, t in tasks.items()]
        cid_of = {n: c for c, n in self.node_of.items()}
        pairs = []
        for reply in self.grid.send_and_receive(msgs, timeout=self.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %s (client %s) failed: %s", rnd, node, cid_of.get(node),
                            reply.error.reason)
                continue
            cid = cid_of.get(node, -1)
            pairs.append((cid, codec.decode_update(reply.content, tasks[cid]) if cid in tasks else None))
        answered = {c for c, _ in pairs}
        for c in sorted(set(tasks) - answered):
            log.warning("round %d: node %s (client %d) dropped: no reply within %.0f s",
                        rnd, self.node_of[c], c, self.round_timeout)
        metrics = exp.server.aggregate(rnd, tasks, [(c, u) for c, u in pairs if u is not None])
        metrics["dropped_clients"] = sorted(set(sampled) - answered)
        return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = codec.config_from_run_config(rc)
    if rc.get(codec.RUN_OUTPUT):
        cfg.output_dir = str(rc[codec.RUN_OUTPUT])
    rounds = GridRounds(grid, min_nodes=int(rc.get(codec.RUN_MIN_NODES, cfg.data.num_clients)),
                        round_timeout=float(rc.get(codec.RUN_ROUND_TIMEOUT, 600)))
    summary = run(cfg, overwrite=True, progress=False, exp=build_experiment(cfg), round_fn=rounds)
    log.warning("fedlora run finished: %s", summary)
