"""Limits on what one node can cost the server: a reply's tensors are checked from the Array's
metadata and the blob's header before any is built (an extra 256 MiB tensor, 33 million columns, a
header that claims less than the blob holds, a length prefix past the blob, overlapping or
out-of-range offsets, a 64 MiB header, another record layout), client metrics are screened (NaN,
inf, -1e30, 100,000 keys), and a silent node ends a round after the grace period, then is benched
until it answers again."""

import dataclasses
import json
import logging
import math
import time
import tracemalloc

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, MetricRecord  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedlora.config import default_config_path, load_config  # noqa: E402
from fedlora.errors import ConfigError  # noqa: E402
from fedlora.flower import codec  # noqa: E402
from fedlora.flower.run_config import (  # noqa: E402
    RUN_MIN_BUDGET,
    RUN_ROUND_GRACE,
    RUN_ROUND_QUORUM,
    RUN_SILENT_ROUNDS,
    server_settings,
)
from fedlora.types import ClientTask, ClientUpdate, Factors  # noqa: E402
from fedlora.validate import Reject, check_update, decode_updates  # noqa: E402

from ..conftest import tiny_overrides  # noqa: E402
from ..flower.test_server_app import flower_run  # noqa: E402
from ..test_server import honest, make_server  # noqa: E402

MiB = 2**20
IN, OUT, R = 768, 768, 8  # a BERT-base-sized layer


def honest_header(record) -> tuple[dict, int]:
    """The honest blob's header (as JSON) and its data's length."""
    data = codec.blob_in(record)
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), len(data) - 8 - n


def tiled(entries: dict[str, tuple[str, list[int]]]) -> tuple[dict, int]:
    """A header declaring ``{key: (dtype, shape)}`` with offsets that tile the data exactly, and its length."""
    header, end = {}, 0
    for key, (dtype, shape) in entries.items():
        size = math.prod(shape) * {"F32": 4, "F64": 8}[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + size]}
        end += size
    return header, end


def forge(header: dict, data: int, prefix: int | None = None, pad: int = 0) -> ArrayRecord:
    """A blob as a node can craft it: ``header`` as JSON (plus ``pad`` spaces) behind a length prefix
    (by default its true length), then ``data`` zero bytes; built with one extra copy at most."""
    head = json.dumps(header).encode() + b" " * pad
    buf = bytearray(8 + len(head) + data)
    buf[:8] = (len(head) if prefix is None else prefix).to_bytes(8, "little")
    buf[8:8 + len(head)] = head
    return codec.blob_record(bytes(buf))


def with_tensor(header: dict, key: str, shape: list[int]) -> ArrayRecord:
    """A consistent blob declaring ``key`` as a float32 ``shape`` (added, or in place of the honest one)."""
    entries = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    return forge(*tiled(entries | {key: ("F32", shape)}))


def overlapping(header: dict) -> dict:
    """Layer 0's B declared over the same bytes as its A (both 8 x 768 floats)."""
    a, b = header["lora.layer.0.q.A"], header["lora.layer.0.q.B"]
    return header | {"lora.layer.0.q.B": b | {"data_offsets": a["data_offsets"]}}


def as_float32(record) -> ArrayRecord:
    data = codec.blob_in(record)
    return ArrayRecord({codec.BLOB: Array(dtype="float32", shape=(len(data) // 4,), stype=codec.STYPE, data=data)})


@pytest.fixture()
def task_and_reply():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    g = torch.Generator().manual_seed(0)
    task = ClientTask(factors={f"layer.{i}.q": Factors(torch.randn(r, IN, generator=g), torch.zeros(OUT, r))
                               for i, r in enumerate((R, 1))},  # layer.1: rank 1 (33M columns: 132 MB)
                      scale=1.0, head={"classifier.weight": torch.zeros(2, IN)}, nonce="n1")
    update = ClientUpdate(factors=task.factors, num_examples=5, head=task.head, metrics={"train_loss": 0.7},
                          nonce="n1")
    return task, codec.encode_update(update)


def decode_measured(task, content):
    """(rejections, bytes by which decoding and screening raised the traced peak)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        _, rejected = decode_updates({3: task}, [(3, content)], codec.decode_update)
        return rejected, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


HONEST_DATA = 4 * (R * IN + OUT * R + IN + OUT + 2 * IN)  # float32: layer 0 (rank R), layer 1 (rank 1), the head
HOSTILE = {  # (the honest record, its header, its data's length) -> a hostile record, the reason, the detail's start
    "extra 256 MiB tensor": (lambda rec, h, n: with_tensor(h, "lora.layer.0.q.C", [64 * MiB]),
                             Reject.MALFORMED, "Malformed: unexpected tensor 'lora.layer.0.q.C'"),
    "33 million columns": (lambda rec, h, n: with_tensor(h, "lora.layer.1.q.A", [1, 33_000_000]),
                           Reject.WRONG_SHAPE, "lora.layer.1.q.A is (1, 33000000), expected (1, 768)"),
    "header claims less than the 256 MiB blob": (lambda rec, h, n: forge(h, n + 256 * MiB), Reject.TOO_LARGE,
                                                 f"the tensor blob holds {HONEST_DATA + 256 * MiB} bytes of data, "
                                                 f"its tensors {HONEST_DATA}"),
    "length prefix past the blob": (lambda rec, h, n: forge(h, n, prefix=2**64 - 1), Reject.MALFORMED,
                                    "Malformed: the blob's header claims 18446744073709551615 bytes"),
    "overlapping data_offsets": (lambda rec, h, n: forge(overlapping(h), n), Reject.MALFORMED,
                                 "Malformed: tensor 'lora.layer.0.q."),
    "data_offsets past the data": (lambda rec, h, n: forge(h, n - 1), Reject.MALFORMED,
                                   f"Malformed: the tensors end at byte {HONEST_DATA} of the data, the blob holds"),
    "64 MiB header": (lambda rec, h, n: forge(h, n, pad=64 * MiB), Reject.TOO_LARGE, "the blob's header holds 671"),
    "one array per tensor (the old layout)": (lambda rec, h, n: ArrayRecord(codec.tensors_in(rec)), Reject.MALFORMED,
                                              "Malformed: fedlora.arrays must hold one array 'safetensors', it "),
    "a float32 array": (lambda rec, h, n: as_float32(rec), Reject.MALFORMED,
                        "Malformed: array 'safetensors' must be a 1-D uint8 safetensors blob"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_an_oversized_reply_is_rejected_from_its_metadata_with_under_16_mib_of_growth(task_and_reply, case):
    task, content = task_and_reply
    forged, reason, detail = HOSTILE[case]
    record = content.array_records[codec.ARRAYS]
    content.array_records[codec.ARRAYS] = forged(record, *honest_header(record))
    rejected, growth = decode_measured(task, content)
    assert [(r.reason, r.detail[:len(detail)]) for r in rejected] == [(reason, detail)]
    assert growth < 16 * MiB, f"{growth / MiB:.1f} MiB"


def test_the_honest_reply_decodes_and_its_cost_is_the_measure_of_the_limit(task_and_reply):
    task, content = task_and_reply
    assert honest_header(content.array_records[codec.ARRAYS])[1] == HONEST_DATA
    rejected, growth = decode_measured(task, content)
    assert rejected == [] and growth < 16 * MiB
    tensors = codec.tensors_in(content.array_records[codec.ARRAYS])
    tensors["lora.layer.0.q.A"] = tensors["lora.layer.0.q.A"].double()
    content.array_records[codec.ARRAYS] = codec.pack_tensors(tensors)
    rejected, _ = decode_measured(task, content)
    assert [(r.reason, r.detail) for r in rejected] == [
        (Reject.WRONG_DTYPE, "lora.layer.0.q.A is torch.float64, expected torch.float32")]


def test_100000_metric_keys_are_refused_before_they_are_read(task_and_reply):
    task, content = task_and_reply
    content.metric_records[codec.METRICS] = MetricRecord({f"m{i}": 1.0 for i in range(100_000)})
    rejected, _ = decode_measured(task, content)
    assert [(r.reason, r.detail) for r in rejected] == [(Reject.BAD_METRICS, "100000 metrics, at most 32")]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e30, 2e6])
def test_a_bad_train_loss_rejects_the_update_and_never_becomes_the_rounds_loss(value):
    server = make_server()
    tasks = server.configure(1, [0, 1, 2])
    good = {c: honest(tasks[c], c, server.num_examples[c]) for c in tasks}
    for c, loss in zip(good, (0.5, 0.9, 0.2)):
        good[c].metrics = {"train_loss": loss, "steps": 3.0}
    bad = dataclasses.replace(good[1], metrics={"train_loss": value, "steps": 3.0})
    assert check_update(tasks[1], bad, server.num_examples[1], "base-1").reason is Reject.BAD_METRICS
    metrics = server.aggregate(1, tasks, {0: good[0], 1: bad, 2: good[2]})
    n0, n2 = server.num_examples[0], server.num_examples[2]
    assert metrics["rejected"] == 1
    assert metrics["train_loss"] == pytest.approx((0.5 * n0 + 0.2 * n2) / (n0 + n2), rel=1e-12)


def test_long_metric_names_and_too_many_metrics_are_rejected():
    server = make_server()
    tasks = server.configure(1, [0])
    u = honest(tasks[0], 0, server.num_examples[0])
    for metrics in ({"x" * 65: 1.0}, {f"m{i}": 1.0 for i in range(33)}, {"train_loss": True}):
        u.metrics = metrics
        assert check_update(tasks[0], u, server.num_examples[0], "base-1").reason is Reject.BAD_METRICS
    u.metrics = {f"m{i}": 1.0 for i in range(30)} | {"train_loss": -1e6, "x" * 64: 0.0}  # at the limits
    assert check_update(tasks[0], u, server.num_examples[0], "base-1") is None


def waits_per_round(grid, log: dict) -> None:
    """Record, per round, seconds from the end of the push of the train tasks to the last pull (in
    process, the push trains every node that answers: what follows is waiting for the silent)."""
    push, pull = grid.push_messages, grid.pull_messages

    def timed_push(msgs):
        msgs = list(msgs)
        ids = push(msgs)
        if any(m.metadata.message_type == codec.TRAIN for m in msgs):
            log["rounds"].append([time.monotonic()] * 2)
        return ids

    def timed_pull(ids):
        if log["rounds"]:
            log["rounds"][-1][1] = time.monotonic()
        return pull(ids)

    grid.push_messages, grid.pull_messages = timed_push, timed_pull


def test_a_silent_node_costs_one_grace_period_then_is_benched_until_it_answers(tiny_bert_dir, tmp_path, caplog):
    grace, timing = 1.5, {"rounds": []}

    def faults(grid, rnd, exp):
        if rnd == 1:
            grid.silent.add(1002)  # connected, takes its task, never answers
            waits_per_round(grid, timing)
        if rnd == 3:
            grid.silent.discard(1002)  # wakes up: answers the ping it was sent while benched

    out = tmp_path / "g"
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        flower_run(tiny_overrides(tiny_bert_dir, out, federation__fraction=1.0, federation__rounds=4,
                                  data__num_clients=3), 3, on_round=faults,
                   **{RUN_ROUND_GRACE: grace, RUN_SILENT_ROUNDS: 1})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    assert [r["dropped_clients"] for r in rows] == [[2], [2], [2], []]
    waits = [end - start for start, end in timing["rounds"]]
    assert grace <= waits[0] < grace + 1, waits  # the grace period, not the 30 s round-timeout
    assert all(w < 0.5 for w in waits[1:]), waits  # benched: not waited for; back: answers at once
    log = caplog.text
    assert "round 1: node 1002 (client 2) dropped: no reply within 1.5 s after 2 of 3 answered (round-grace)" in log
    assert "node 1002 benched: no answer 1 times in a row" in log
    assert "round 2: client 2 not sent its task: its node 1002 is benched (silent)" in log
    assert "node 1002 answers again: it is sent work again" in log


@pytest.mark.parametrize("key, value, error", [
    (RUN_ROUND_GRACE, -1.0, "'round-grace': -1.0 is not a number of seconds >= 0"),
    (RUN_ROUND_GRACE, float("inf"), "'round-grace': inf is not a number"),
    (RUN_ROUND_QUORUM, 0, "'round-quorum': 0.0 not in (0, 1]"),
    (RUN_ROUND_QUORUM, 1.5, "'round-quorum': 1.5 not in (0, 1]"),
    (RUN_SILENT_ROUNDS, -1, "'silent-rounds': -1 must be >= 0"),
    (RUN_SILENT_ROUNDS, 2.5, "'silent-rounds': expected int, got 2.5"),
    (RUN_MIN_BUDGET, 0, "'min-budget': 0 not in [1, strategy.global_rank"),
    (RUN_MIN_BUDGET, 10**6, "'min-budget': 1000000 not in [1, strategy.global_rank"),
])
def test_bad_limit_settings_are_one_line_naming_the_key(key, value, error):
    cfg = load_config(default_config_path(), [])
    with pytest.raises(ConfigError) as e:
        server_settings({key: value}, cfg)
    assert str(e.value).startswith(f"run config {error}"), str(e.value)
