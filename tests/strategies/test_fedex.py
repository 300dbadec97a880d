"""FedEx-LoRA: the global model is the exact FedAvg of the clients' effective weights; the
residual has rank <= (K − 1) r and vanishes for identical clients."""

import torch

from fedlora.types import ClientUpdate, Factors

from .common import SHAPES, SPECS, build, global_dense, naive_dense, train, weights

R = 2  # the smallest budget


def dense_delta(task, name):
    d = task.base_delta.get(name)
    return torch.zeros(SHAPES[name], dtype=torch.float64) if d is None else d.B.double() @ d.A.double()


def test_fedex_global_model_is_the_exact_fedavg_of_the_effective_weights():
    s = build("fedex")
    for rnd, cids in ((1, [0, 1, 3]), (2, [1, 2]), (3, [0, 1, 2, 3])):  # the delta passes min(m, n)
        tasks = s.configure(rnd, [SPECS[c] for c in cids])
        assert all(f.rank == R for t in tasks.values() for f in t.factors.values())  # everyone at min budget
        ups = train(tasks, seed=rnd)
        s.aggregate(rnd, ups)
        p = weights(cids)
        for name in SHAPES:  # W_new + s B̄ Ā = Σ p_i (W_old + s B_i A_i), W_old what each client trained on
            fedavg = sum(p[c] * (dense_delta(tasks[c], name) + naive_dense(ups[c].factors[name], tasks[c].scale))
                         for c in cids)
            torch.testing.assert_close(global_dense(s, name), fedavg, rtol=1e-9, atol=1e-9)
            mean_B = sum(p[c] * ups[c].factors[name].B for c in cids)  # the pair is FedIT's average
            torch.testing.assert_close(s.factors[name].B, mean_B, rtol=1e-12, atol=1e-12)
            assert s.delta[name].rank <= min(SHAPES[name])


def test_fedex_residual_has_rank_at_most_k_minus_one_times_r():
    s = build("fedex")
    tasks = s.configure(1, SPECS[:3])  # K = 3: (K − 1) r = 4 < min(m, n), so nothing is re-factored
    s.aggregate(1, train(tasks))
    for name in SHAPES:
        assert s.delta[name].rank == 2 * R  # stacked (K − 1) r columns, not K r
        assert torch.linalg.matrix_rank(dense_delta(s.global_task(), name)) <= 2 * R
    one = build("fedex")
    ups = train(one.configure(1, SPECS[1:2]))
    one.aggregate(1, ups)  # K = 1: no residual, the global model is that client's
    assert one.delta == {}
    for name in SHAPES:
        torch.testing.assert_close(global_dense(one, name), naive_dense(ups[1].factors[name], one.scale))


def test_fedex_identical_clients_leave_a_zero_residual():
    s = build("fedex")
    tasks = s.configure(1, SPECS)
    trained = train({0: tasks[0]})[0].factors
    same = {c: ClientUpdate(factors={n: Factors(A=f.A.clone(), B=f.B.clone()) for n, f in trained.items()},
                            num_examples=n) for c, n in zip(tasks, [10, 70, 5, 15])}
    s.aggregate(1, same)
    for name in SHAPES:
        assert dense_delta(s.global_task(), name).abs().max() == 0
        torch.testing.assert_close(global_dense(s, name), naive_dense(trained[name], s.scale), rtol=1e-12, atol=1e-12)
