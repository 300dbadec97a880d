"""Traffic as the wire carries it: every method's bytes_down / bytes_up (the in-process
server's accounting) equal the tensor bytes the Flower codec encodes for that round, over
several rounds (so accumulated deltas grow); a grown delta goes dense, never above m·n."""

import pytest
import torch

from fedlora.export import merged_factors
from fedlora.server import FederatedServer
from fedlora.state import dense
from fedlora.strategies import METHODS
from fedlora.types import ClientTask, Factors, dense_is_cheaper

from .strategies.common import BUDGETS, EXAMPLES, SHAPES, build, train

flwr = pytest.importorskip("flwr")
from fedlora.flower import codec  # noqa: E402

ROUNDS = 4


def encoded_nbytes(record) -> int:
    """Tensor bytes in a codec record, read off the raw blob: its length less the 8-byte length
    prefix and the JSON header that prefix counts (the codec's layout check makes the rest exactly
    the tensors' numel x itemsize)."""
    data = codec.blob_in(record.array_records[codec.ARRAYS])
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def rounds(name):
    """(round, tasks, updates, the server's metrics) for ROUNDS rounds of every client."""
    server = FederatedServer(build(name), {}, BUDGETS, EXAMPLES)
    for rnd in range(1, ROUNDS + 1):
        tasks = server.configure(rnd, list(range(len(BUDGETS))))
        ups = train(tasks, seed=rnd)
        for u in ups.values():  # the server takes the dtype it sent
            u.factors = {n: Factors(A=f.A.float(), B=f.B.float()) for n, f in u.factors.items()}
        metrics = server.aggregate(rnd, tasks, ups)
        assert metrics["bytes_up"] > 0  # every update was taken
        yield rnd, tasks, ups, metrics


@pytest.mark.parametrize("name", sorted(METHODS))
def test_reported_bytes_equal_what_the_codec_encodes(name):
    for rnd, tasks, ups, metrics in rounds(name):
        assert metrics["bytes_down"] == sum(encoded_nbytes(codec.encode_task(t, rnd)) for t in tasks.values())
        assert metrics["bytes_up"] == sum(encoded_nbytes(codec.encode_update(u)) for u in ups.values())


def delta_nbytes(record, name: str) -> int:
    """Bytes the codec encoded for module ``name``'s base delta."""
    return sum(t.numel() * t.element_size() for k, t in codec.tensors_in(record.array_records[codec.ARRAYS]).items()
               if k.startswith(f"delta.{name}."))


@pytest.mark.parametrize("name", ["fedex", "flora", "florist"])
def test_accumulated_deltas_never_cost_more_than_dense_and_decode_to_the_same_model(name):
    went_dense = False
    for rnd, tasks, _, _ in rounds(name):
        for t in tasks.values():
            record = codec.encode_task(t, rnd)
            decoded = codec.decode_task(record)[1]
            for mod, (m, n) in SHAPES.items():
                if mod not in t.base_delta:
                    continue
                size = t.base_delta[mod].A.element_size()
                assert delta_nbytes(record, mod) <= m * n * size
                went_dense |= dense_is_cheaper(t.base_delta[mod])
                want = merged_factors(t)[mod]
                got = merged_factors(decoded)[mod]
                torch.testing.assert_close(dense(got), dense(want), rtol=1e-5, atol=1e-5)
    assert went_dense  # the rounds above grow the delta past (m + n) r > m n


def test_a_dense_delta_on_the_wire_is_one_m_by_n_tensor_and_the_layer_holds_its_product():
    from fedlora.lora import LoRAModel

    from .conftest import TinyRegressor

    lm = LoRAModel(TinyRegressor(), ["up"])  # (5, 6)
    g = torch.Generator().manual_seed(0)
    big = Factors(A=torch.randn(5, 6, generator=g), B=torch.randn(5, 5, generator=g))  # 55 > 30 numbers
    task = ClientTask(factors={"up": Factors(A=torch.zeros(1, 6), B=torch.zeros(5, 1))}, scale=1.0,
                      base_delta={"up": big})
    arrays = codec.tensors_in(codec.encode_task(task, 1).array_records[codec.ARRAYS])
    assert sorted(arrays) == ["delta.up.W", "lora.up.A", "lora.up.B"] and arrays["delta.up.W"].shape == (5, 6)
    decoded = codec.decode_task(codec.encode_task(task, 1))[1]
    x = torch.randn(3, 6, generator=g)
    outs = []
    for t in (task, decoded):
        lm.load(t)
        outs.append(lm.layers["up"](x))
        assert lm.layers["up"].delta_A.shape[0] == 0 and lm.layers["up"].delta_W.shape == (5, 6)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], lm.layers["up"].base(x) + x @ (big.B @ big.A).T, rtol=1e-5, atol=1e-5)
