"""The server around a strategy: every update screened (typed rejections; the global state equals the
aggregate of the valid updates alone), min_clients, weighting, DP noise and its accounting."""


import pytest
import torch

from fedlora import state as S
from fedlora.server import FederatedServer
from fedlora.strategies.fslora import FSLoRA
from fedlora.types import ClientUpdate, Factors
from fedlora.validate import Reject

SHAPES = {"q": (6, 5), "v": (4, 5)}


def make_server(fingerprint="base-1", min_clients=1):
    strat = FSLoRA(SHAPES, global_rank=8, alpha=8.0, seed=0)
    head = {"classifier.weight": torch.zeros(3, 4)}
    return FederatedServer(strat, head, budgets=[4, 2, 8, 4, 2, 6, 4, 8], num_examples=[10, 20, 30, 40, 50, 60, 70, 80],
                           fingerprint=fingerprint, min_clients=min_clients)


def honest(task, cid, n):
    g = torch.Generator().manual_seed(cid)
    f = {k: Factors(A=v.A + torch.randn(v.A.shape, generator=g), B=v.B + torch.randn(v.B.shape, generator=g))
         for k, v in task.factors.items()}
    head = {k: v + torch.randn(v.shape, generator=g) for k, v in task.head.items()}
    return ClientUpdate(factors=f, num_examples=n, head=head, fingerprint="base-1")


def corrupt(kind, u):
    f = S.clone(u.factors)
    if kind == "nan":
        f["q"].A[0, 0] = float("nan")
    elif kind == "inf":
        f["v"].B[0, 0] = float("inf")
    elif kind == "rank":
        f["q"] = Factors(A=torch.zeros(f["q"].rank + 1, 5), B=torch.zeros(6, f["q"].rank + 1))
    elif kind == "transposed":
        f["q"] = Factors(A=torch.zeros(f["q"].rank, 6),  # (out, in) swapped
                         B=torch.zeros(5, f["q"].rank))
    elif kind == "missing":
        del f["v"]
    elif kind == "extra":
        f["k"] = f["q"]
    elif kind == "dtype":
        f["q"] = Factors(A=f["q"].A.double(), B=f["q"].B.double())
    head = dict(u.head)
    if kind.startswith("head-"):  # a head in another dtype would change the global head's dtype
        head = {k: v.to(getattr(torch, kind[5:])) for k, v in head.items()}
    n = 10**9 if kind == "huge" else (0 if kind == "zero" else u.num_examples)
    fp = "other-base" if kind == "fingerprint" else u.fingerprint
    return ClientUpdate(factors=f, num_examples=n, head=head, fingerprint=fp)


REASONS = {"nan": Reject.NON_FINITE, "inf": Reject.NON_FINITE, "rank": Reject.WRONG_SHAPE,
           "transposed": Reject.WRONG_SHAPE, "missing": Reject.MISSING_MODULES,
           "extra": Reject.EXTRA_MODULES, "dtype": Reject.WRONG_DTYPE,
           "huge": Reject.BAD_EXAMPLE_COUNT, "zero": Reject.BAD_EXAMPLE_COUNT,
           "fingerprint": Reject.FINGERPRINT, "head-float64": Reject.WRONG_DTYPE,
           "head-float16": Reject.WRONG_DTYPE, "head-int64": Reject.WRONG_DTYPE}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_bad_update_is_rejected_and_the_rest_aggregate(kind, caplog):
    cids = [0, 1, 2, 3]
    bad_cid = 2
    server_a, server_b = make_server(), make_server()
    tasks_a = server_a.configure(1, cids)
    tasks_b = server_b.configure(1, [c for c in cids if c != bad_cid])
    good = {c: honest(tasks_a[c], c, server_a.num_examples[c]) for c in cids}
    pairs = [(c, corrupt(kind, good[c]) if c == bad_cid else good[c]) for c in cids]
    with caplog.at_level("WARNING"):
        metrics = server_a.aggregate(1, tasks_a, pairs)
    assert metrics["rejected"] == 1
    assert REASONS[kind].value in caplog.text and f"client {bad_cid}" in caplog.text
    # the reference: the same round with the bad client never sampled
    server_b.aggregate(1, tasks_b, {c: good[c] for c in cids if c != bad_cid})
    for n in SHAPES:
        assert torch.isfinite(server_a.strategy.factors[n].A).all()
        torch.testing.assert_close(server_a.strategy.factors[n].A, server_b.strategy.factors[n].A)
        torch.testing.assert_close(server_a.strategy.factors[n].B, server_b.strategy.factors[n].B)
    torch.testing.assert_close(server_a.head["classifier.weight"], server_b.head["classifier.weight"])


def test_duplicate_answers_reject_the_client():
    server = make_server()
    tasks = server.configure(1, [0, 1])
    u0, u1 = honest(tasks[0], 0, 10), honest(tasks[1], 1, 20)
    metrics = server.aggregate(1, tasks, [(0, u0), (1, u1), (1, u1)])
    assert metrics["rejected"] == 1  # the duplicate; client 1's first answer is dropped too
    ref = make_server()
    rt = ref.configure(1, [0])
    ref.aggregate(1, rt, {0: u0})
    torch.testing.assert_close(server.strategy.factors["q"].A, ref.strategy.factors["q"].A)


def test_unexpected_client_and_min_clients_skip_leave_state_unchanged():
    server = make_server(min_clients=2)
    before = S.clone(server.strategy.factors)
    tasks = server.configure(1, [0, 1])
    metrics = server.aggregate(1, tasks, [(0, honest(tasks[0], 0, 10)), (5, honest(tasks[1], 5, 10))])
    assert metrics["skipped"] == 1 and metrics["rejected"] == 1
    for n in SHAPES:
        assert torch.equal(server.strategy.factors[n].A, before[n].A)


def test_uniform_weighting_ignores_example_counts():
    server = make_server()
    server.weighting = "uniform"
    tasks = server.configure(1, [0, 1, 2])
    ups = {c: honest(tasks[c], c, server.num_examples[c]) for c in tasks}
    ref = make_server()
    ref.num_examples = [7] * 8  # the reference: equal example counts, weighted by examples
    rt = ref.configure(1, [0, 1, 2])
    ref.aggregate(1, rt, {c: ClientUpdate(u.factors, 7, u.head, fingerprint="base-1") for c, u in ups.items()})
    server.aggregate(1, tasks, ups)
    torch.testing.assert_close(server.strategy.factors["q"].B, ref.strategy.factors["q"].B)
    torch.testing.assert_close(server.head["classifier.weight"], ref.head["classifier.weight"])


def test_weights_are_the_servers_example_counts_not_the_declared_ones():
    server, ref = make_server(), make_server()
    tasks, rt = server.configure(1, [0, 1, 2]), ref.configure(1, [0, 1, 2])
    ups = {c: honest(tasks[c], c, server.num_examples[c]) for c in tasks}
    low = {c: ClientUpdate(u.factors, 1 if c == 2 else u.num_examples, u.head, fingerprint="base-1")
           for c, u in ups.items()}  # client 2 declares 1 example: it still weighs its 30
    server.aggregate(1, tasks, low)
    ref.aggregate(1, rt, ups)
    torch.testing.assert_close(server.strategy.factors["q"].B, ref.strategy.factors["q"].B)
    torch.testing.assert_close(server.head["classifier.weight"], ref.head["classifier.weight"])


def test_nonces_are_fresh_and_an_update_without_this_rounds_nonce_is_stale(caplog):
    server = make_server()
    assert all(t.nonce == "" for t in server.configure(1, [0, 1]).values())  # in-process: not asked for
    t1 = server.configure(1, [0, 1], nonce=True)
    t2 = server.configure(2, [0, 1], nonce=True)
    nonces = [t.nonce for t in (*t1.values(), *t2.values())]
    assert len(set(nonces)) == 4 and all(len(n) == 32 for n in nonces)
    old = honest(t1[0], 0, 10)
    old.nonce = t1[0].nonce
    new = honest(t2[1], 1, 20)
    new.nonce = t2[1].nonce
    with caplog.at_level("WARNING"):
        metrics = server.aggregate(2, t2, {0: old, 1: new})  # client 0 replays its round-1 answer
    assert metrics["rejected"] == 1 and "client 0: stale" in caplog.text


def test_replies_that_do_not_decode_are_rejected_as_malformed_and_the_round_goes_on(caplog):
    server, ref = make_server(), make_server()
    tasks, rt = server.configure(1, [0, 1, 2]), ref.configure(1, [0, 1])
    good = {c: honest(tasks[c], c, server.num_examples[c]) for c in tasks}

    def decode(reply, task):
        if reply == "garbage":
            raise KeyError("fedlora.meta")
        return good[reply]

    with caplog.at_level("WARNING"):
        metrics = server.aggregate(1, tasks, [(0, 0), (1, 1), (2, "garbage"), (7, 2)], decode=decode)
    assert metrics["rejected"] == 2 and metrics["dropped"] == 0
    assert "client 2: malformed (KeyError: 'fedlora.meta')" in caplog.text
    assert "client 7: unexpected_client" in caplog.text
    ref.aggregate(1, rt, {c: good[c] for c in (0, 1)})
    torch.testing.assert_close(server.strategy.factors["q"].B, ref.strategy.factors["q"].B)
