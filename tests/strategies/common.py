"""What the strategy tests share: four clients of unequal ranks and weights, a deterministic
float64 "training" that moves every trainable factor, and the dense references.

Every aggregator is checked against a naive float64 loop over these clients.
"""

import torch

from fedlora.strategies import build_strategy
from fedlora.types import ClientSpec, ClientUpdate, Factors

SHAPES = {"q": (9, 7), "v": (6, 11)}
BUDGETS = [2, 5, 3, 4]
EXAMPLES = [10, 70, 5, 15]
SPECS = [ClientSpec(cid=i, budget=b, num_examples=n) for i, (b, n) in enumerate(zip(BUDGETS, EXAMPLES))]


def build(name, settings=None):
    return build_strategy(name, SHAPES, BUDGETS, seed=0, global_rank=6, alpha=4.0, settings=settings)


def train(tasks, seed=0):
    """Deterministic fake training in float64: every trainable factor moves."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for cid, t in tasks.items():
        f = {}
        for n, x in t.factors.items():
            A = x.A.double() + (torch.randn(x.A.shape, generator=g, dtype=torch.float64) if not t.freeze_A else 0)
            B = x.B.double() + torch.randn(x.B.shape, generator=g, dtype=torch.float64)
            f[n] = Factors(A=A, B=B)
        out[cid] = ClientUpdate(factors=f, num_examples=EXAMPLES[cid], freeze_A=t.freeze_A)
    return out


def weights(cids):
    total = sum(EXAMPLES[c] for c in cids)
    return {c: EXAMPLES[c] / total for c in cids}


def naive_dense(update_factors, scale):
    return scale * update_factors.B @ update_factors.A


def global_dense(strategy, name):
    t = strategy.global_task()
    d = t.scale * t.factors[name].B.double() @ t.factors[name].A.double()
    if name in t.base_delta:
        d = d + t.base_delta[name].B.double() @ t.base_delta[name].A.double()
    return d


def echo(tasks):
    """A round in which every client returns exactly what it was sent."""
    return {c: ClientUpdate(factors={n: Factors(A=f.A.clone(), B=f.B.clone()) for n, f in t.factors.items()},
                            num_examples=EXAMPLES[c], freeze_A=t.freeze_A) for c, t in tasks.items()}


def no_op_change(strategy):
    """After one trained round, the relative change of each module's global ΔW in a no-op round."""
    strategy.aggregate(1, train(strategy.configure(1, SPECS)))
    before = {n: global_dense(strategy, n) for n in SHAPES}
    strategy.aggregate(2, echo(strategy.configure(2, SPECS)))
    return {n: float((global_dense(strategy, n) - before[n]).norm() / before[n].norm()) for n in SHAPES}


def padded_increment_rounds(strategy):
    """Two rounds of unequal clients; after each, the naive float64 loop
    ``before + Σ p_i pad(update_i - sent_i)`` per module and factor."""
    for rnd, specs in ((1, SPECS[:3]), (2, SPECS[1:])):
        ref = {n: Factors(A=f.A.double().clone(), B=f.B.double().clone()) for n, f in strategy.factors.items()}
        tasks = strategy.configure(rnd, specs)
        ups = train(tasks, seed=rnd)
        strategy.aggregate(rnd, ups)
        p = weights(sorted(ups))
        for c, u in ups.items():
            for n, f in u.factors.items():
                ref[n].A[:f.rank] += p[c] * (f.A - tasks[c].factors[n].A.double())
                ref[n].B[:, :f.rank] += p[c] * (f.B - tasks[c].factors[n].B.double())
        yield ref
