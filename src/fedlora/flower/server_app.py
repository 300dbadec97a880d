"""Flower ServerApp: fedlora's FederatedServer driving real nodes through Flower's grid.

Before round 1 it registers nodes (:mod:`.registry`: the server checks what each node
claims, and decides example counts) until ``min-nodes`` clients are bound, then builds
the strategy from the registered budgets. Each round: sample clients as the simulator
does, build one task per node (per-client shapes, a fresh nonce each), send, collect
replies until the round timeout, decode and screen them (a malformed, stale or otherwise
bad reply rejects that client only), aggregate. Nodes that joined since (a restarted
SuperNode comes back under a new node id) are asked who they are alongside the round's
tasks and train from the next round. A node that errs or does not answer in time is
dropped for the round and named in the log; screening and ``reliability.min_clients``
then decide whether the round counts. A relaunched ServerApp resumes from the newest good
checkpoint (run config ``resume``, default true). A run that fails raises
:class:`RunFailed` with its reason in one line (Flower then exits 201).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..checkpoint import latest_checkpoint
from ..config import RunConfig
from ..errors import check
from ..experiment import Experiment, build_experiment, build_global_strategy
from ..methods import get_method
from ..runner import run
from . import codec
from .registry import ClientRegistry, Refuse, load_registry
from .run_config import ServerSettings, config_from_run_config, server_settings

log = logging.getLogger("fedlora.flower")
app = ServerApp()


class RunFailed(Exception):
    """The run stopped; its message is the reason, in one line."""


class GridRounds:
    """The round function :func:`fedlora.runner.run` calls, carried over a Flower grid."""

    def __init__(self, grid: Grid, registry: ClientRegistry, round_timeout: float, respects_budgets: bool = True):
        self.grid, self.registry, self.round_timeout = grid, registry, round_timeout
        self.respects_budgets = respects_budgets
        self.asked: set[int] = set()  # nodes whose profile came back (registered or refused)

    def _online(self) -> dict[int, bytes]:
        """Connected nodes and the public key each signs its requests with (b"" where none)."""
        return {n.node_id: bytes(n.public_key) for n in self.grid.get_nodes()}

    def _queries(self, online: dict[int, bytes], skip: set[int] = frozenset()) -> dict[tuple[str, int], Message]:
        return {(codec.QUERY, n): Message(RecordDict(), dst_node_id=n, message_type=codec.QUERY)
                for n in online if n not in self.asked and n not in skip}

    def _read_profiles(self, replies: dict, failed: dict, online: dict[int, bytes]) -> None:
        for (_, node), reason in sorted(failed.items()):
            log.warning("node %s did not register: %s", node, reason)
        for (_, node), reply in sorted(replies.items()):
            self.asked.add(node)
            try:
                cid, budget = codec.decode_profile(reply.content)
            except Exception as e:  # noqa: BLE001 - untrusted input
                self.registry.refuse(node, Refuse.MALFORMED, f"{type(e).__name__}: {e}")
                continue
            self.registry.claim(node, online.get(node, b""), cid, budget, online)

    def register(self, min_clients: int, timeout: float) -> None:
        """Ask every connected node who it is until ``min_clients`` clients are bound."""
        deadline, tried = time.monotonic() + timeout, set()  # a node that failed is asked again next round
        while True:
            online = self._online()
            self.registry.retry(online)
            if queries := self._queries(online, skip=tried):
                tried.update(n for _, n in queries)
                self._read_profiles(*self._send(queries), online)
            bound = sum(node in online for node in (h.node_id for h in self.registry.holders.values()))
            if bound >= min_clients:
                log.warning("registered clients (client: node, budget): %s", {
                    c: (h.node_id, self.registry.budgets[c]) for c, h in sorted(self.registry.holders.items())})
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{bound} of the {min_clients} clients needed (run config min-nodes) "
                                   f"registered within {timeout:.0f} s")
            time.sleep(0.5)

    def _send(self, msgs: dict) -> tuple[dict, dict[object, str]]:
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
        reg = self.registry
        online = self._online()
        reg.retry(online)
        exp.server.budgets = list(reg.budgets)
        sampled = exp.server.sample(rnd)
        cids = [c for c in sampled if reg.node_of(c) in online]
        for c in sorted(set(sampled) - set(cids)):
            node = reg.node_of(c)
            log.warning("round %d: client %d dropped: its node %s is not connected", rnd, c,
                        "(never registered)" if node is None else node)
        tasks = exp.server.configure(rnd, cids, nonce=True)
        for c, t in sorted(tasks.items()):
            rank = max((f.rank for f in t.factors.values()), default=0)
            if self.respects_budgets and rank > reg.budgets[c]:  # e.g. a late node below FedIT's common rank
                log.warning("round %d: client %d not sent its task: rank %d exceeds its budget %d",
                            rnd, c, rank, reg.budgets[c])
                del tasks[c]
        msgs = {(codec.TRAIN, c): Message(codec.encode_task(t, rnd), dst_node_id=reg.node_of(c),
                                          message_type=codec.TRAIN) for c, t in tasks.items()}
        replies, failed = self._send({**msgs, **self._queries(online)})  # newcomers: asked alongside
        for (kind, c), reason in sorted(failed.items()):
            if kind == codec.TRAIN:
                log.warning("round %d: node %s (client %d) dropped: %s", rnd, reg.node_of(c), c, reason)
        self._read_profiles({k: r for k, r in replies.items() if k[0] == codec.QUERY},
                            {k: r for k, r in failed.items() if k[0] == codec.QUERY}, online)
        answers = sorted(((c, r.content) for (kind, c), r in replies.items() if kind == codec.TRAIN),
                         key=lambda pair: pair[0])
        metrics = exp.server.aggregate(rnd, tasks, answers, decode=codec.decode_update)
        metrics["dropped_clients"] = sorted(set(sampled) - {c for c, _ in answers})
        return metrics


def use_budgets(exp: Experiment, strategy_budgets: list[int], registry: ClientRegistry) -> None:
    """A fresh strategy built from ``strategy_budgets`` (FedIT's common rank, HetLoRA's global
    rank, ... follow from them); the server sends and weighs by the registry's numbers. A
    registered budget the method cannot serve (raFLoRA resumed with a smaller one) is refused
    here, in one line, before any round."""
    blocker = get_method(exp.cfg.strategy.name).budget_blocker(strategy_budgets, registry.budgets)
    check("budgets", blocker is None, str(blocker))
    exp.server.strategy = build_global_strategy(exp.cfg, exp.lm, strategy_budgets)
    exp.budgets = list(strategy_budgets)  # what checkpoints and clients.json record
    exp.server.budgets, exp.server.num_examples = list(registry.budgets), list(registry.num_examples)


def resumed_budgets(cfg: RunConfig) -> list[int] | None:
    """The budgets the run in the output directory was built from (its checkpoint's), if any."""
    out = cfg.resolved_output_dir()
    if not (out / "metrics.jsonl").exists():  # the runner starts afresh then
        return None
    found = latest_checkpoint(out / "checkpoints")
    return list(found[1]["budgets"]) if found is not None and "budgets" in found[1] else None


def serve(grid: Grid, run_config: dict, settings: ServerSettings | None = None,
          before_round: Callable[[Experiment, int], None] | None = None) -> dict:
    """The ServerApp's work: register, build the strategy, run (resuming by default).

    ``before_round(exp, rnd)`` runs before each round (tests inject faults with it)."""
    cfg = config_from_run_config(run_config)
    s = settings or server_settings(run_config, cfg)
    resume = s.resume and not s.overwrite
    r = cfg.strategy.global_rank
    allowed = load_registry(s.registry, cfg.data.num_clients, r) if s.registry else None  # before the model loads
    exp = build_experiment(cfg)
    # example counts from the server's split (or the operator's file); default budgets from the config
    registry = ClientRegistry([len(c) for c in exp.data.clients], exp.budgets, r, allowed)
    rounds = GridRounds(grid, registry, s.round_timeout, get_method(cfg.strategy.name).respects_budgets)
    rounds.register(s.min_nodes, s.register_timeout)
    kept = resumed_budgets(cfg) if resume else None
    if kept is not None:
        log.warning("resuming the run in %s: the strategy keeps the budgets it was built with, %s",
                    cfg.resolved_output_dir(), kept)
    use_budgets(exp, kept if kept is not None else registry.budgets, registry)
    round_fn = rounds if before_round is None else lambda e, rnd: (before_round(e, rnd), rounds(e, rnd))[1]
    return run(cfg, round_fn, overwrite=s.overwrite, resume=resume, progress=False, exp=exp)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        summary = serve(grid, context.run_config)
    except Exception as e:
        line = f"fedlora run failed: {type(e).__name__}: {' '.join(str(e).split())}"
        log.error("%s", line)
        raise RunFailed(line) from None
    log.warning("fedlora run finished: %s", summary)
