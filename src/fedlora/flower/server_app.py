"""Flower ServerApp: fedlora's FederatedServer driving real nodes through Flower's grid.

Before round 1 it registers nodes (:mod:`.registry`: the server checks what each node
claims, and decides example counts) until ``min-nodes`` clients are bound, then builds
the strategy from the registered budgets. Each round: sample clients as the simulator
does, build one task per node (per-client shapes, a fresh nonce each), send, collect
replies until all are in, or a quorum plus ``round-grace`` seconds, or ``round-timeout``
(:mod:`.collect`; a node silent ``silent-rounds`` times in a row is benched until it
answers a ping), decode and screen them (a malformed, stale or otherwise
bad reply rejects that client only), aggregate. Nodes that joined since (a restarted
SuperNode comes back under a new node id) are asked who they are alongside the round's
tasks and train from the next round. A node that errs or does not answer in time is
dropped for the round and named in the log; screening and ``reliability.min_clients``
then decide whether the round counts. A relaunched ServerApp resumes from the newest good
checkpoint (run config ``resume``, default true). A run that fails raises
:class:`RunFailed` with its reason in one line (Flower then exits 201).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..atomic import write_atomic
from ..checkpoint import latest_checkpoint
from ..config import RunConfig
from ..errors import check
from ..experiment import ClientScores, Experiment, build_experiment, build_global_strategy
from ..methods import get_method
from ..outdir import SUMMARY
from ..runner import read_metrics, run
from ..types import ClientTask
from . import codec
from .collect import Strikes, Wait, collect
from .coordinator import count_declared, never_contributed, round_line, server_experiment
from .registry import ClientRegistry, Refuse, load_registry
from .run_config import ServerSettings, config_from_run_config, example_cap, server_settings
from .supernode_launch import quicker_pulls

log = logging.getLogger("fedlora.flower")
app = ServerApp()
# while registering, a node whose profile query failed (a late ClientApp start, a crash) is asked
# again after this long: not every half second (each ask starts a ClientApp process on a real
# SuperNode), and not never (one slow answer would leave min-nodes out of reach)
REASK_S = 5.0


class RunFailed(Exception):
    """The run stopped; its message is the reason, in one line."""


class GridRounds:
    """The round function :func:`fedlora.runner.run` calls, carried over a Flower grid."""

    def __init__(self, grid: Grid, registry: ClientRegistry, wait: Wait, respects_budgets: bool = True,
                 silent_rounds: int = 0):
        self.grid, self.registry, self.wait = grid, registry, wait
        self.respects_budgets = respects_budgets
        self.asked: set[int] = set()  # nodes whose profile came back (registered or refused)
        self.strikes = Strikes(silent_rounds)
        self.example_cap: int | None = None  # set: nodes declare their example counts (node-local data)

    def _online(self) -> dict[int, bytes]:
        """Connected nodes and the public key each signs its requests with (b"" where none).
        A node that left is forgotten as asked: back under the same id, it is asked again."""
        online = {n.node_id: bytes(n.public_key) for n in self.grid.get_nodes()}
        self.asked &= online.keys()
        return online

    def _queries(self, online: dict[int, bytes], skip: set[int] = frozenset()) -> dict[tuple[str, int], Message]:
        return {(codec.QUERY, n): Message(RecordDict(), dst_node_id=n, message_type=codec.QUERY)
                for n in online if n not in self.asked and n not in skip and n not in self.strikes.benched}

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
            if self.example_cap is not None:
                self._declared(node, cid, reply.content)

    def _declared(self, node: int, cid: int, content: RecordDict) -> None:
        try:
            declared = codec.decode_declared_count(content)
        except codec.Malformed as e:
            log.warning("node %s (client %d): unreadable example count (%s)", node, cid, e)
            declared = None
        count_declared(self.registry, node, cid, declared, self.example_cap)

    def register(self, min_clients: int, timeout: float) -> None:
        """Ask every connected node who it is until ``min_clients`` clients are bound."""
        deadline, retry_at = time.monotonic() + timeout, {}  # node -> when a node that failed is asked again
        while True:
            online, now = self._online(), time.monotonic()
            if queries := self._queries(online, skip={n for n, t in retry_at.items() if t > now}):
                self._read_profiles(*self._send(queries), online)
                retry_at.update((n, time.monotonic() + REASK_S) for _, n in queries if n not in self.asked)
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
        """Send, collect (:func:`.collect.collect`); (replies, failure reasons), keyed like ``msgs``.
        Silent nodes get a strike; a benched node's answer to its ping brings it back."""
        online = self._online()
        self.strikes.ping(self.grid, online, codec.QUERY)
        got = collect(self.grid, msgs, self.wait, self.strikes.pings)
        node = {k: m.metadata.dst_node_id for k, m in msgs.items()}
        pinged = {n: r for n, r in got.pings.items() if not r.has_error()}
        for n in got.pings.keys() - pinged.keys():  # e.g. the SuperLink's "node unavailable": ping again
            self.strikes.pings.pop(n, None)
        self.strikes.record([node[k] for k in (*got.replies, *got.errors)] + list(pinged),
                            [node[k] for k in got.unanswered])
        new = {(codec.QUERY, n): r for n, r in pinged.items() if n not in self.asked}
        self._read_profiles(new, {}, online)  # a node benched before it registered: its ping is its profile
        return got.replies, {**got.errors, **got.unanswered}

    def __call__(self, exp: Experiment, rnd: int) -> dict:
        reg = self.registry
        online = self._online()
        exp.server.budgets, exp.server.num_examples = list(reg.budgets), list(reg.num_examples)
        sampled = exp.server.sample(rnd)
        cids = [c for c in sampled if reg.node_of(c) in online]
        for c in sorted(set(sampled) - set(cids)):
            node = reg.node_of(c)
            log.warning("round %d: client %d dropped: its node %s is not connected", rnd, c,
                        "(never registered)" if node is None else node)
        tasks = exp.server.configure(rnd, cids, nonce=True)
        for c in sorted(tasks):
            if reg.node_of(c) in self.strikes.benched:
                log.warning("round %d: client %d not sent its task: its node %s is benched (silent)",
                            rnd, c, reg.node_of(c))
                del tasks[c]
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
        metrics["answered_clients"] = [c for c, _ in answers]
        return metrics

    def evaluate_nodes(self, exp: Experiment, task: ClientTask) -> ClientScores:
        """``task`` (the global model) sent to every registered client's node, each scoring it on its own
        held-out rows; a node that errs or does not answer is left out (and named in the log)."""
        online, reg = self._online(), self.registry
        msgs = {(codec.EVALUATE, c): Message(codec.encode_task(task, 0), dst_node_id=h.node_id,
                                             message_type=codec.EVALUATE)
                for c, h in sorted(reg.holders.items()) if h.node_id in online}
        replies, failed = self._send(msgs)
        for (_, c), reason in sorted(failed.items()):
            log.warning("evaluation: node %s (client %d) not counted: %s", reg.node_of(c), c, reason)
        scores: ClientScores = {}
        for (_, c), reply in sorted(replies.items()):
            try:
                n, metrics = codec.decode_scores(reply.content)
            except Exception as e:  # noqa: BLE001 - untrusted input
                log.warning("evaluation: node %s (client %d) sent no evaluation: %s", reg.node_of(c), c, e)
                continue
            if n >= 1:  # weighed by its held-out rows, at most the example cap
                scores[c] = min(n, self.example_cap or n), metrics
        return scores


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
    exp = server_experiment(cfg) if s.node_data else build_experiment(cfg)
    # example counts from the server's split, the operator's file or (node-local data) the nodes' word;
    # default budgets from the config
    registry = ClientRegistry([len(c) for c in exp.data.clients], exp.budgets, r, allowed,
                              floor=s.min_budget)
    rounds = GridRounds(grid, registry, Wait(s.round_timeout, s.round_grace, s.round_quorum),
                        get_method(cfg.strategy.name).respects_budgets, s.silent_rounds)
    rounds.example_cap = example_cap(run_config) if s.node_data else None
    exp.client_evaluator = rounds.evaluate_nodes
    rounds.register(s.min_nodes, s.register_timeout)
    kept = resumed_budgets(cfg) if resume else None
    if kept is not None:
        log.warning("resuming the run in %s: the strategy keeps the budgets it was built with, %s",
                    cfg.resolved_output_dir(), kept)
    use_budgets(exp, kept if kept is not None else registry.budgets, registry)
    out = cfg.resolved_output_dir()

    def round_fn(e: Experiment, rnd: int) -> dict:
        report(out, cfg.federation.rounds)  # the round before, evaluation included
        if before_round is not None:
            before_round(e, rnd)
        return rounds(e, rnd)

    summary = run(cfg, round_fn, overwrite=s.overwrite, resume=resume, progress=False, exp=exp)
    report(out, cfg.federation.rounds)
    summary["never_contributed"] = never_contributed(read_metrics(out), sorted(registry.holders))
    if summary["never_contributed"]:
        log.warning("registered clients that never contributed: %s", summary["never_contributed"])
    write_atomic(out / SUMMARY, json.dumps(summary, indent=1) + "\n")
    return summary


def report(out, rounds: int) -> None:
    """The coordinator's console line about the newest round in metrics.jsonl."""
    rows = read_metrics(out)
    if rows:
        log.warning("%s", round_line(rows[-1], rounds))


@app.main()
def main(grid: Grid, context: Context) -> None:
    from flwr.superlink.grid import http_grid

    quicker_pulls(http_grid, 0.5)  # replies: pulled as soon as their content is in, not 1 s later
    try:
        summary = serve(grid, context.run_config)
    except Exception as e:
        line = f"fedlora run failed: {type(e).__name__}: {' '.join(str(e).split())}"
        log.error("%s", line)
        raise RunFailed(line) from None
    log.warning("fedlora run finished: %s", summary)
