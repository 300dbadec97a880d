"""The codec's wire format: all the tensors of a task or update in one safetensors blob, bit for
bit through Flower's own deflate / inflate (fp32, bf16, fp16; a head, a dense delta, a frozen A);
a message is a handful of Flower objects whatever the adapter's size; a task that is no such blob
is refused on the node with a one-line reason."""

import json

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Message  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedlora.flower import codec  # noqa: E402
from fedlora.state import dense  # noqa: E402
from fedlora.types import ClientTask, ClientUpdate, Factors, dense_is_cheaper, tensors_of  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as in a ServerApp process


def adapter(modules: int, rank: int, dtype, g, out: int = 6, inp: int = 5) -> dict[str, Factors]:
    return {f"enc.layer.{i}.q": Factors(torch.randn(rank, inp, generator=g).to(dtype),
                                        torch.randn(out, rank, generator=g).to(dtype)) for i in range(modules)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN and -0.0 included)."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


def over_the_wire(content):
    """``content`` through a Message's deflate / inflate, the objects Flower pushes and pulls."""
    msg = Message(content, dst_node_id=7, message_type=codec.TRAIN)
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    return inflate_object_from_contents(msg.object_id, objects).content


@pytest.mark.parametrize("freeze_A", [False, True], ids=["A-trained", "A-frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tasks_and_updates_round_trip_bit_for_bit(dtype, freeze_A):
    g = torch.Generator().manual_seed(0)
    factors = adapter(3, 2, dtype, g)
    factors["enc.layer.0.q"].B[0, :2] = torch.tensor([float("nan"), -0.0])
    grown = Factors(torch.randn(5, 5, generator=g).to(dtype), torch.randn(6, 5, generator=g).to(dtype))
    small = adapter(1, 1, dtype, g)["enc.layer.0.q"]
    head = {"classifier.weight": torch.randn(2, 6, generator=g).to(dtype), "classifier.bias": torch.randn(2).to(dtype)}
    task = ClientTask(factors=factors, scale=0.5, freeze_A=freeze_A, head=head, config={"sketch_ratio": 0.5},
                      base_delta={"enc.layer.0.q": grown, "enc.layer.1.q": small}, fingerprint="fp", nonce="n1")
    assert dense_is_cheaper(grown) and not dense_is_cheaper(small)

    sent = codec.encode_task(task, 4)
    wire = codec.tensors_in(over_the_wire(sent).array_records[codec.ARRAYS])
    want = tensors_of(task)
    assert wire.keys() == want.keys() and {"delta.enc.layer.0.q.W", "delta.enc.layer.1.q.A"} <= want.keys()
    assert all(same_bits(wire[k], want[k]) for k in want)
    rnd, back = codec.decode_task(over_the_wire(sent))
    assert (rnd, back.scale, back.freeze_A, back.config, back.nonce) == (4, 0.5, freeze_A, task.config, "n1")
    for n, f in factors.items():
        assert same_bits(back.factors[n].A, f.A) and same_bits(back.factors[n].B, f.B)
    assert all(same_bits(back.head[k], v) for k, v in head.items())
    assert same_bits(back.base_delta["enc.layer.1.q"].A, small.A) and same_bits(back.base_delta["enc.layer.1.q"].B,
                                                                                small.B)
    assert same_bits(dense(back.base_delta["enc.layer.0.q"]), want["delta.enc.layer.0.q.W"])  # an identity x W

    trained = {n: Factors(f.A if freeze_A else f.A + 1, f.B * 2) for n, f in factors.items()}
    update = ClientUpdate(factors=trained, num_examples=9, head={k: v - 1 for k, v in head.items()},
                          metrics={"train_loss": 0.25}, fingerprint="fp", freeze_A=freeze_A, nonce="n1")
    got = codec.decode_update(over_the_wire(codec.encode_update(update)), task)
    assert (got.num_examples, got.metrics, got.freeze_A, got.nonce) == (9, {"train_loss": 0.25}, freeze_A, "n1")
    for n, f in trained.items():  # a frozen A is not sent: restored from the task, the same bits
        assert same_bits(got.factors[n].A, f.A) and same_bits(got.factors[n].B, f.B)
    assert all(same_bits(got.head[k], v) for k, v in update.head.items())


def test_a_tensor_under_two_keys_is_packed_as_two_copies():
    shared = torch.randn(2, 5)
    task = ClientTask(factors={"m": Factors(shared, torch.zeros(6, 2))}, scale=1.0,
                      base_delta={"m": Factors(shared, torch.ones(6, 2))})  # safetensors alone refuses shared storage
    wire = codec.tensors_in(codec.encode_task(task, 1).array_records[codec.ARRAYS])
    assert torch.equal(wire["lora.m.A"], shared) and torch.equal(wire["delta.m.A"], shared)


def test_a_message_is_a_handful_of_flower_objects_whatever_the_adapters_size():
    g = torch.Generator().manual_seed(0)

    def objects(modules: int, per_tensor: bool = False) -> int:
        task = ClientTask(factors=adapter(modules, 4, torch.float32, g, 64, 64), scale=1.0)
        content = codec.encode_task(task, 1)
        if per_tensor:  # the layout before: one Array (+ its chunk) per tensor, each its own round trip
            content.array_records[codec.ARRAYS] = ArrayRecord(tensors_of(task))
        return len(get_all_nested_objects(Message(content, dst_node_id=7, message_type=codec.TRAIN)))

    assert objects(1) == objects(30) == 6  # Message, RecordDict, 2 records, the Array, its one chunk
    assert objects(30, per_tensor=True) == 2 * 60 + 4


def forged_task(edit) -> dict:
    """An honest task's content after ``edit(its ARRAYS record)`` returns the record to send instead."""
    task = ClientTask(factors=adapter(2, 2, torch.float32, torch.Generator().manual_seed(0)), scale=1.0)
    content = codec.encode_task(task, 1)
    content.array_records[codec.ARRAYS] = edit(content.array_records[codec.ARRAYS])
    return content


def reheadered(record, change) -> ArrayRecord:
    """The blob with ``change(header)`` as its header (same data)."""
    data = codec.blob_in(record)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(change(json.loads(data[8:8 + n]))).encode()
    return codec.blob_record(len(header).to_bytes(8, "little") + header + data[8 + n:])


def raw(header: bytes) -> ArrayRecord:
    """A blob of ``header`` alone, behind its true length."""
    return codec.blob_record(len(header).to_bytes(8, "little") + header)


def grown_first(h):
    key = sorted(h)[0]
    return h | {key: h[key] | {"shape": [h[key]["shape"][0] + 1, *h[key]["shape"][1:]]}}


BAD_TASKS = {  # the edit of an honest task's record -> the start of the Malformed's message
    "per-tensor arrays": (lambda rec: ArrayRecord(codec.tensors_in(rec)), "fedlora.arrays must hold one array"),
    "two arrays": (lambda rec: ArrayRecord({codec.BLOB: rec[codec.BLOB], "x": Array(torch.zeros(1))}),
                   "fedlora.arrays must hold one array 'safetensors', it holds 2: 'safetensors', 'x'"),
    "a float32 array": (lambda rec: ArrayRecord({codec.BLOB: Array(torch.zeros(4))}),
                        "array 'safetensors' must be a 1-D uint8 safetensors blob"),
    "a truncated blob": (lambda rec: codec.blob_record(codec.blob_in(rec)[:-3]), "the tensors end at byte"),
    "a blob of 5 bytes": (lambda rec: codec.blob_record(b"\x01" * 5), "a tensor blob of 5 bytes has no header"),
    "a header that is no JSON": (lambda rec: raw(b"{no}"), "the blob's header is not JSON"),
    "a shape its offsets do not hold": (lambda rec: reheadered(rec, grown_first), "tensor 'lora.enc.layer.0.q.A' "
                                        "spans 40 bytes, its shape and dtype make 60"),
    "an unknown dtype": (lambda rec: reheadered(rec, lambda h: h | {"lora.enc.layer.0.q.A": h["lora.enc.layer.0.q.A"]
                                                                    | {"dtype": "X9"}}),
                         "tensor 'lora.enc.layer.0.q.A' has an unknown dtype 'X9'"),
    "a key given twice": (lambda rec: raw(b'{"__metadata__": {}, "__metadata__": {}}'),
                          "the blob's header repeats a key: '__metadata__'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_a_task_that_is_no_blob_is_refused_on_the_node(case):
    edit, says = BAD_TASKS[case]
    with pytest.raises(codec.Malformed) as e:
        codec.decode_task(forged_task(edit))
    assert str(e.value).startswith(says) and "\n" not in str(e.value), str(e.value)
