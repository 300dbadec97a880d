"""Rank recovery: can small budgets jointly learn a known rank-64 update? Every method's ceiling.

A frozen 256 × 256 map ``W0``, a target ``ΔW* = U diag(σ) Vᵀ`` of rank 64 (``σ_j = exp(−2j/64)``);
12 clients (budgets 4, 8, 16) see inputs from their own random subspace of dimension 64–96,
``y = (W0 + ΔW*) x + 0.01 ε``. Real rounds (``LoRAModel``, ``local_train`` with AdamW,
``FederatedServer``) for every registered method on the same data, batches and seed, each at
its best learning rate of a grid on another seed. Reported: ``‖ΔW − ΔW*‖_F / ‖ΔW*‖_F`` of the
global update (``server.global_task()``, base delta included) by round and by uploaded bytes,
and the final update's effective rank. ``--quick``: 64 × 64, rank 16, budgets {2, 4}.

Predictions (written before the first full run, from the strategy code; the reasons are in
docs/rank_recovery.md; "floor k" = error of the best rank-k approximation of ΔW*):

    fedit: 4 = min k_i | >= floor 4 (0.880), a little above
    fedex: unbounded (base delta) | below FedIT, above FLoRA (residual is 2nd order)
    hetlora: 16 = max k_i | 0.77-0.88 (padded factors shrink slots 5-16)
    ffa: 16, row space of frozen A | 0.97-0.99 (row-space floor ~0.968)
    flexlora: 16 kept (eval <= sum k_i) | 0.65-0.80 (rank collapse)
    raflora: 16 = r_max | 0.60-0.65 (floor 16 = 0.597)
    flora: unbounded (base delta) | below floor 16, towards noise
    florist: unbounded (base delta) | near FLoRA, slightly above
    fslora: 64 | ~0.80: sketch variance = nuclear-norm^2 penalty
    plora: 64 = R | below floor 16, towards noise
    fullrank: 64 (ignores budgets) | below floor 16, towards noise
    fslora-u: 64 | 0.05-0.15, stable over the grid (no sketch shrinkage)

    python benchmarks/rank_recovery.py [--quick] [--out docs/rank_recovery.md] [--methods fslora fslora-u ...]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import print_summary, summary_row
from torch import Tensor, nn

from fedlora.client import local_train
from fedlora.config import PrivacyConfig, TrainConfig
from fedlora.export import merged_factors
from fedlora.lora import LoRAModel
from fedlora.seeding import torch_generator
from fedlora.server import FederatedServer
from fedlora.state import dense
from fedlora.strategies import METHODS, build_strategy

PREDICTIONS = dict(ln.strip().split(": ", 1) for ln in __doc__.split("first full run")[1].splitlines()
                   if ln.startswith("    ") and ": " in ln and " | " in ln)
MARK = ("<!-- rank_recovery.py: begin -->", "<!-- rank_recovery.py: end -->")


@dataclass(frozen=True)
class Setup:
    dim: int
    target_rank: int
    budgets: tuple[int, ...]  # one per client
    sub_dims: tuple[int, int]  # each client's input subspace dimension, uniform in [lo, hi]
    examples: int
    rounds: int
    steps: int
    batch: int
    lrs: tuple[float, ...]  # AdamW grid; one value: no tuning
    noise: float = 0.01
    alpha: float = 16.0
    server_lr: float = 1.0  # for the methods that have one (fslora, fslora-u)


FULL = Setup(256, 64, (4, 8, 16) * 4, (64, 96), 256, rounds=100, steps=10, batch=32, lrs=(1e-3, 3e-3, 1e-2, 3e-2))
QUICK = Setup(64, 16, (2, 4) * 3, (16, 24), 64, rounds=5, steps=5, batch=16, lrs=(1e-2,))


class OneLinear(nn.Module):
    """The frozen map and an MSE loss, with the HF calling convention (batch -> .loss)."""

    def __init__(self, w0: Tensor) -> None:
        super().__init__()
        self.map = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        self.map.weight.data.copy_(w0)

    def forward(self, x: Tensor, labels: Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=((self.map(x) - labels) ** 2).mean())


@dataclass
class Problem:
    w0: Tensor
    target: Tensor  # ΔW*
    sigma: Tensor  # its singular values
    xs: list[Tensor]  # per client (examples, dim)
    ys: list[Tensor]


def make_problem(s: Setup, seed: int) -> Problem:
    g = torch_generator("rank-recovery", seed)
    d, k = s.dim, s.target_rank
    U, V = (torch.linalg.qr(torch.randn(d, k, generator=g))[0] for _ in range(2))
    sigma = torch.exp(-2 * torch.arange(k, dtype=torch.float32) / k)
    target = (U * sigma) @ V.T
    w0 = torch.randn(d, d, generator=g) / math.sqrt(d)
    xs, ys = [], []
    for _ in s.budgets:
        sub = int(torch.randint(s.sub_dims[0], s.sub_dims[1] + 1, (1,), generator=g))
        q = torch.linalg.qr(torch.randn(d, sub, generator=g))[0]  # (d, d_i) orthonormal basis
        x = torch.randn(s.examples, q.shape[1], generator=g) @ q.T
        xs.append(x)
        ys.append(x @ (w0 + target).T + s.noise * torch.randn(s.examples, d, generator=g))
    return Problem(w0, target, sigma, xs, ys)


def rank_floor(sigma: Tensor, k: int) -> float:
    """Relative error of the best rank-k approximation."""
    return (sigma[k:].square().sum() / sigma.square().sum()).sqrt().item()


def sketch_floor(sigma: Tensor, budgets: list[int], r: int) -> tuple[float, int]:
    """FSLoRA's predicted fixed point: argmin ‖M − T‖² + c (‖M‖_*² − ‖M‖_F²), c = mean (r − k)/(k (r − 1)),
    i.e. m_j = max(σ_j − c N, 0) / (1 − c) with N = Σ m_j (bisection on N). Returns (error, rank)."""
    c = sum((r - k) / (k * (r - 1)) for k in budgets) / len(budgets)
    lo, hi = 0.0, sigma.sum().item()
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (sigma - c * mid).clamp(min=0).sum().item() / (1 - c) > mid else (lo, mid)
    m = (sigma - c * lo).clamp(min=0) / (1 - c)
    return ((m - sigma).norm() / sigma.norm()).item(), int((m > 0).sum())


def pooled_lstsq(p: Problem) -> float:
    """Noise floor: the unconstrained least-squares ΔW from every client's data at once."""
    x, y = torch.cat(p.xs).double(), torch.cat(p.ys).double()
    w = torch.linalg.lstsq(x, y - x @ p.w0.double().T).solution.T
    return ((w - p.target.double()).norm() / p.target.norm()).item()


def frozen_A_floors(s: Setup, p: Problem) -> dict[str, float]:
    """For methods whose A stays frozen (FFA-LoRA): the best error with ΔW in A's row space, ‖T (I − A⁺A)‖/‖T‖."""
    out = {}
    for name in METHODS:
        strategy = build_strategy(name, {"map": (s.dim, s.dim)}, list(s.budgets), 0, s.target_rank, s.alpha)
        task = strategy.global_task()  # seed 0, as the reported run
        if task.freeze_A:
            A = task.factors["map"].A.double()
            T = p.target.double()
            out[name] = ((T - T @ torch.linalg.pinv(A) @ A).norm() / T.norm()).item()
    return out


def global_update(server: FederatedServer) -> Tensor:
    """ΔW of the global model: scale·B·A plus any base delta (the one module)."""
    return dense(merged_factors(server.global_task())["map"])


def run(name: str, s: Setup, p: Problem, lr: float, seed: int) -> tuple[list[float], list[float], float, Tensor]:
    """Errors and cumulative uploaded bytes after rounds 0..R, the total bytes down, and the final ΔW."""
    lm = LoRAModel(OneLinear(p.w0), ["map"])
    budgets = list(s.budgets)
    settings = METHODS[name].default_settings()
    if hasattr(settings, "server_lr"):
        settings.server_lr = s.server_lr
    strategy = build_strategy(name, lm.shapes(), budgets, seed, global_rank=s.target_rank, alpha=s.alpha,
                              settings=settings)
    # plain averaging, as the methods' papers aggregate (and as the committed results were measured):
    # the robust defaults (adaptive clip, outlier zeroing) would change every method's dynamics
    server = FederatedServer(strategy, lm.head_state(), budgets, [s.examples] * len(s.budgets),
                             fingerprint=lm.fingerprint, seed=seed,
                             privacy=PrivacyConfig(clip_norm=0.0, outlier_factor=0.0))
    cfg = TrainConfig(local_steps=s.steps, batch_size=s.batch, lr=lr, optimizer="adamw", max_grad_norm=0.0)
    norm = p.target.norm().item()
    errors, uploads, down = [1.0], [0.0], 0.0
    for rnd in range(1, s.rounds + 1):
        tasks = server.configure(rnd, list(range(len(s.budgets))))
        updates = {}
        for c, task in tasks.items():
            rows = torch.randint(s.examples, (s.steps, s.batch), generator=torch_generator(seed, "batch", rnd, c))
            batches = [{"x": p.xs[c][i], "labels": p.ys[c][i]} for i in rows]
            updates[c] = local_train(lm, task, batches, cfg, s.examples)
        metrics = server.aggregate(rnd, tasks, updates)
        uploads.append(uploads[-1] + metrics["bytes_up"])
        down += metrics["bytes_down"]
        errors.append((global_update(server) - p.target).norm().item() / norm)
    return errors, uploads, down, global_update(server)


@dataclass
class Run:
    lr: float
    grid: dict[float, float]  # lr -> final error on the tuning seed
    errors: list[float]  # after rounds 0..R
    uploads: list[float]  # cumulative bytes up after rounds 0..R
    down: float  # total bytes down (what the codec encodes: a grown delta dense)
    delta: Tensor  # the final global ΔW


def tuning_error(name: str, s: Setup, p: Problem, lr: float) -> float:
    """Final error on the tuning problem (seed 1); inf if local training diverged."""
    try:
        return float(np.nan_to_num(run(name, s, p, lr, seed=1)[0][-1], nan=math.inf))
    except FloatingPointError:
        return math.inf


def spectrum_stats(dw: Tensor, k: int) -> tuple[float, float]:
    """(entropy effective rank exp(H(σ/Σσ)), share of ‖ΔW‖² in its top-k directions)."""
    sv = torch.linalg.svdvals(dw.double())
    if sv.sum() == 0:
        return 0.0, 0.0
    q = sv / sv.sum()
    return math.exp(-(q[q > 0] * q[q > 0].log()).sum().item()), (sv[:k].square().sum() / sv.square().sum()).item()


def first_below(errors: list[float], level: float) -> str:
    return next((str(r) for r, e in enumerate(errors) if e < level), "-")


def md(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def write_section(path: Path, text: str) -> None:
    """Replace the script's marked section of ``path`` (or append it), leaving the rest as written."""
    before, _, rest = (path.read_text(encoding="utf-8") if path.exists() else "").partition(MARK[0])
    after = rest.partition(MARK[1])[2]
    path.write_text(f"{before.rstrip()}\n\n{MARK[0]}\n{text}\n{MARK[1]}\n\n{after.lstrip()}".lstrip(), encoding="utf-8")


def report(s: Setup, results: dict[str, Run], floors: dict[int, float], tuned: bool) -> str:
    """The Markdown tables: summary, error by round, error by cumulative upload."""
    lo, hi = min(s.budgets), max(s.budgets)
    equal = min(r.uploads[-1] for r in results.values())  # the smallest total upload any method reached
    rows = []
    for name, r in results.items():
        erank, top = spectrum_stats(r.delta, s.target_rank)
        edge = "*" if tuned and r.lr in (min(s.lrs), max(s.lrs)) else ""
        rows.append([name + ("" if METHODS[name].respects_budgets else " (ref.)"), f"{r.lr:g}{edge}",
                     (PREDICTIONS.get(name, "?").split(" | ") + ["?"])[1], f"{r.errors[-1]:.3f}",
                     f"{np.interp(equal, r.uploads, r.errors):.3f}", first_below(r.errors, floors[lo]),
                     first_below(r.errors, floors[hi]), f"{erank:.1f}", f"{top:.3f}", f"{r.uploads[-1] / 1e6:.3g}",
                     f"{r.down / 1e6:.3g}", f"{(r.uploads[-1] + r.down) / 1e6:.3g}"])
    marks = [m for m in (1, 2, 5, 10, 20, 50, 100, 200) if m <= s.rounds]
    most = max(r.uploads[-1] for r in results.values())
    levels = [equal * f for f in (0.25, 0.5, 1, 2, 4, 8, 16) if equal * f <= most]
    return "\n\n".join([
        md(["method", "lr", "predicted", "final error", f"error @ {equal / 1e6:.3g} MB up", f"rounds < floor {lo}",
            f"rounds < floor {hi}", "eff. rank", f"top-{s.target_rank} energy", "MB up", "MB down", "MB total"], rows),
        f"lr: {'the best final error on seed 1 (* = an edge of the grid)' if tuned else 'one, untuned'}. "
        "Relative error by round:",
        md(["method", *(f"round {m}" for m in marks)], [[n, *(f"{r.errors[m]:.3f}" for m in marks)]
                                                         for n, r in results.items()]),
        "By cumulative upload (all clients; '-': the method never uploaded that much):",
        md(["method", *(f"{v / 1e6:.3g} MB" for v in levels)],
           [[n, *(f"{np.interp(v, r.uploads, r.errors):.3f}" if v <= r.uploads[-1] else "-" for v in levels)]
            for n, r in results.items()]),
        *(["Learning-rate grid, final error on seed 1:",
           md(["method", *(f"lr {x:g}" for x in s.lrs)], [[n, *map("{:.3f}".format, r.grid.values())]
                                                          for n, r in results.items()])] if tuned else [])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 x 64, rank 16, budgets {2, 4}, 5 rounds")
    ap.add_argument("--out", type=Path, default=None,
                    help="Markdown file for the tables (default docs/rank_recovery.md; none with --quick)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    help="run only these (the table is then theirs alone: use with --out elsewhere)")
    ap.add_argument("--server-lr", type=float, default=1.0, help="server_lr of the methods that have one")
    args = ap.parse_args()
    # tiny matmuls: one thread; on the shared 2-core machine two threads ran 10.5 s a round instead of 0.046 s
    torch.set_num_threads(1)
    s = replace(QUICK if args.quick else FULL, server_lr=args.server_lr)
    out = args.out or (None if args.quick else Path(__file__).resolve().parents[1] / "docs" / "rank_recovery.md")
    start = time.perf_counter()
    prob = make_problem(s, seed=0)
    floors = {k: rank_floor(prob.sigma, k) for k in sorted({*s.budgets, s.target_rank})}
    sk_err, sk_rank = sketch_floor(prob.sigma, list(s.budgets), s.target_rank)
    head = (f"{s.dim}x{s.dim}, ΔW* rank {s.target_rank} (σ_j = exp(-2j/{s.target_rank})), {len(s.budgets)} clients "
            f"at budgets {sorted(set(s.budgets))}, subspaces of dim {s.sub_dims[0]}-{s.sub_dims[1]}, {s.examples} "
            f"examples each, {s.rounds} rounds x {s.steps} AdamW steps of {s.batch}, global rank {s.target_rank}, "
            f"alpha {s.alpha:g}" + (f", server_lr {s.server_lr:g}" if s.server_lr != 1 else ""))
    refs = (", ".join(f"floor {k} = {v:.3f}" for k, v in floors.items())
            + f"; noise floor (pooled least squares) = {pooled_lstsq(prob):.3f}; FSLoRA sketch-bias fixed point = "
            f"{sk_err:.3f} ({sk_rank} directions); effective rank of ΔW* = {spectrum_stats(prob.target, 1)[0]:.1f}"
            + "".join(f"; {n} row-space floor = {v:.3f}" for n, v in frozen_A_floors(s, prob).items()))
    print(head, refs, "\npredictions for the full size (rank ceiling | final error), before the first full run:",
          *(f"  {n:>9}: {PREDICTIONS.get(n, '? | none (added after them)')}" for n in args.methods), sep="\n")
    tune = make_problem(s, seed=1) if len(s.lrs) > 1 else None
    results: dict[str, Run] = {}
    for name in args.methods:
        grid = {x: tuning_error(name, s, tune, x) for x in s.lrs} if tune is not None else {s.lrs[0]: math.nan}
        lr = min(grid, key=grid.__getitem__)
        results[name] = Run(lr, grid, *run(name, s, prob, lr, seed=0))
        print(f"  ran {name} (lr {lr:g}), {time.perf_counter() - start:.0f} s", flush=True)
    text = (f"{head}; {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads.\n{refs}.\n\n"
            + report(s, results, floors, tune is not None))
    print("\n" + text)
    if out is not None:
        write_section(out, text)
        print(f"wrote {out}")
    final = {n: r.errors[-1] for n, r in results.items()}
    print_summary([summary_row("rank_recovery", f"{n} final relative error ({s.rounds} rounds)", f"{e:.3f}",
                               PREDICTIONS.get(n, "-").split(" | ")[-1], None) for n, e in final.items()]
                  + [summary_row("rank_recovery", "FSLoRA final error vs FedIT's", f"{final['fslora']:.3f} vs "
                                 f"{final['fedit']:.3f}", "FSLoRA below FedIT", final["fslora"] < final["fedit"])
                     for _ in [0] if {"fslora", "fedit"} <= set(final)]
                  + [summary_row("rank_recovery", "fslora-u final error", f"{final['fslora-u']:.3f}", "<= 0.15",
                                 final["fslora-u"] <= 0.15) for _ in [0] if "fslora-u" in final and not args.quick])

if __name__ == "__main__":
    main()
