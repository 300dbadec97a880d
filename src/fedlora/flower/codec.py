"""ClientTask / ClientUpdate <-> Flower records. The only place Flower's keys live.

All the tensors of a task or update go as ONE safetensors blob (:mod:`.blob`): a single 1-D
uint8 ``Array`` under :data:`BLOB` in the :data:`ARRAYS` record, keyed inside by the flat keys of
:func:`fedlora.types.tensors_of`. Flower moves each Array as its own objects (one HTTP round trip
each), so a message costs a few round trips whatever the adapter's size.

Decoding what a node sends is strict: a missing or ill-typed field, another record layout, an
unknown key or a tensor that is no LoRA factor raises :class:`Malformed` (the server's screening
turns it into a typed rejection of that client, see :func:`fedlora.validate.decode_updates`).
Before any tensor of a reply is built, the Array's metadata, then the blob's header (its length
capped before it is decoded) give each tensor's key, shape, dtype and byte offsets, checked against
what the task expects (:func:`check_reply_arrays`), so a reply costs the server at most what the
task allows. A task decoded on the node gets the same structural checks.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import load
from torch import Tensor

from ..state import dense_as_factors
from ..types import ClientTask, ClientUpdate, Factors, LoRAState, tensors_of
from ..validate import MAX_METRICS, Reject, RejectedReply
from . import blob
from .blob import Malformed  # the protocol's error: codec.Malformed, raised by the blob reader too

TRAIN, QUERY, EVALUATE = "train", "query", "evaluate"
ARRAYS, META, METRICS = "fedlora.arrays", "fedlora.meta", "fedlora.metrics"
CONFIG_PREFIX = "config."
BLOB, STYPE = "safetensors", "safetensors"  # the one Array of ARRAYS, and its serialisation
GROUPS, PARTS = ("lora", "delta", "head"), ("A", "B")
TASK_HEADER_MAX = 16 * 2**20  # bytes of blob header a task may carry (~100,000 tensors)
HEADER_BASE, HEADER_PER_TENSOR = 64, 128  # a reply's header: at most these plus each expected key's length


def _field(meta, key: str, kind: type):
    """``meta[key]``, which must be a ``kind`` (an int is not a bool, nor a bool an int)."""
    if key not in meta:
        raise Malformed(f"missing field {key!r}")
    v = meta[key]
    if kind is int and isinstance(v, bool) or not isinstance(v, kind):
        raise Malformed(f"field {key!r} must be {kind.__name__}, got {type(v).__name__} {v!r}"[:160])
    return v


def pack_tensors(tensors: dict[str, Tensor]) -> ArrayRecord:
    """The :data:`ARRAYS` record carrying ``tensors`` as one blob."""
    return blob_record(blob.pack(tensors))


def blob_record(data: bytes) -> ArrayRecord:
    """The :data:`ARRAYS` record carrying the raw blob ``data`` (as is: a node may send any bytes)."""
    return ArrayRecord({BLOB: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def blob_in(record: ArrayRecord) -> bytes:
    """The blob of an :data:`ARRAYS` record, after the Array's own metadata: the one array, 1-D uint8
    of its data's length. Raises :class:`Malformed` for any other layout."""
    keys = list(record.keys())
    if keys != [BLOB]:
        shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise Malformed(f"{ARRAYS} must hold one array {BLOB!r}, it holds {len(keys)}: {shown}"[:160])
    arr = record[BLOB]
    if (arr.stype, arr.dtype, tuple(arr.shape)) != (STYPE, "uint8", (len(arr.data),)):
        raise Malformed(f"array {BLOB!r} must be a 1-D uint8 {STYPE} blob of its {len(arr.data)} bytes, "
                        f"it is {arr.dtype!r} {tuple(arr.shape)} {arr.stype!r}"[:160])
    return arr.data


def tensors_in(record: ArrayRecord, max_header: int = TASK_HEADER_MAX) -> dict[str, Tensor]:
    """The tensors of an :data:`ARRAYS` record, built only once the blob's structure checks out."""
    data = blob_in(record)
    n, entries = blob.read_header(data, max_header)
    blob.check_layout(entries, len(data) - blob.PREFIX - n)
    return load(data)


def _unpack(tensors: dict[str, Tensor], groups: tuple[str, ...]) -> tuple[dict[str, dict[str, Tensor]],
                                                                          dict[str, dict[str, Tensor]],
                                                                          dict[str, Tensor]]:
    """Split the flat keys of :func:`fedlora.types.tensors_of` back into their groups."""
    lora: dict[str, dict[str, Tensor]] = {}
    delta: dict[str, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    for key, t in tensors.items():
        group, _, rest = key.partition(".")
        if group not in groups or not rest:
            raise Malformed(f"unexpected tensor {key!r}"[:160])
        if group == "head":
            head[rest] = t
            continue
        name, _, part = rest.rpartition(".")
        if not name or part not in (PARTS + ("W",) if group == "delta" else PARTS):  # W: a dense delta
            raise Malformed(f"unexpected tensor {key!r}"[:160])
        (lora if group == "lora" else delta).setdefault(name, {})[part] = t
    return lora, delta, head


def _factors(parts: dict[str, dict[str, Tensor]]) -> LoRAState:
    missing = [f"{n}.{p}" for n, ps in parts.items() for p in PARTS if p not in ps]
    if missing:
        raise Malformed(f"{len(missing)} factors missing, e.g. {missing[0]}"[:160])
    return {n: Factors(A=p["A"], B=p["B"]) for n, p in parts.items()}  # Factors checks (r, in) / (out, r)


def check_reply_arrays(record: ArrayRecord, task: ClientTask) -> None:
    """An update's record from its metadata only (no tensor is built): one blob whose header is at
    most what the task's keys need; each tensor a key the task expects, of its shape and dtype; the
    data exactly those tensors' bytes (:func:`fedlora.flower.blob.check_layout`)."""
    expected = tensors_of(ClientUpdate(factors=task.factors, num_examples=1, head=task.head,
                                       freeze_A=task.freeze_A))
    data = blob_in(record)
    n, entries = blob.read_header(data, HEADER_BASE + sum(len(k) + HEADER_PER_TENSOR for k in expected))
    for key, e in entries.items():
        want = expected.get(key)
        if want is None and task.freeze_A and key.startswith("lora.") and key.endswith(".A"):
            raise Malformed(f"{key[len('lora.'):]} is frozen and must not be sent"[:160])
        if want is None:
            raise Malformed(f"unexpected tensor {key!r}"[:160])
        name = f"head {key[len('head.'):]}" if key.startswith("head.") else key
        if e.shape != tuple(want.shape):
            raise RejectedReply(Reject.WRONG_SHAPE, f"{name} is {e.shape}"[:120] + f", expected {tuple(want.shape)}")
        if blob.DTYPES.get(e.dtype) != want.dtype:
            raise RejectedReply(Reject.WRONG_DTYPE, f"{name} is {blob.dtype_name(e.dtype)}"[:120] +
                                f", expected {want.dtype}")
    blob.check_layout(entries, len(data) - blob.PREFIX - n)


def encode_task(task: ClientTask, rnd: int) -> RecordDict:
    meta = {"round": rnd, "scale": float(task.scale), "freeze_A": bool(task.freeze_A),
            "fingerprint": task.fingerprint, "nonce": task.nonce}
    meta.update({CONFIG_PREFIX + k: v for k, v in task.config.items()})
    return RecordDict({ARRAYS: pack_tensors(tensors_of(task)), META: ConfigRecord(meta)})


def decode_task(content: RecordDict) -> tuple[int, ClientTask]:
    """(round, task); raises :class:`Malformed` for a record that is no fedlora task."""
    if META not in content.config_records or ARRAYS not in content.array_records:
        raise Malformed("no fedlora task in the message")
    meta = content.config_records[META]
    lora, delta, head = _unpack(tensors_in(content.array_records[ARRAYS]), GROUPS)
    config = {k[len(CONFIG_PREFIX):]: v for k, v in meta.items() if k.startswith(CONFIG_PREFIX)}
    dense = {n: dense_as_factors(ps["W"]) for n, ps in delta.items() if set(ps) == {"W"}}
    base_delta = {**_factors({n: ps for n, ps in delta.items() if n not in dense}), **dense}
    task = ClientTask(factors=_factors(lora), scale=float(meta["scale"]), freeze_A=bool(meta["freeze_A"]),
                      base_delta=base_delta, head=head, config=config, fingerprint=str(meta["fingerprint"]),
                      nonce=str(meta.get("nonce", "")))
    return int(meta["round"]), task


def encode_update(update: ClientUpdate) -> RecordDict:
    meta = {"num_examples": int(update.num_examples), "fingerprint": update.fingerprint,
            "freeze_A": bool(update.freeze_A), "nonce": update.nonce}
    return RecordDict({ARRAYS: pack_tensors(tensors_of(update)), META: ConfigRecord(meta),
                       METRICS: MetricRecord({k: float(v) for k, v in update.metrics.items()})})


def decode_update(content: RecordDict, task: ClientTask) -> ClientUpdate:
    """The update answering ``task``; a frozen ``A`` (not sent) is restored from the task.

    Raises :class:`Malformed` (or whatever the record layer raises on broken bytes)."""
    if META not in content.config_records or ARRAYS not in content.array_records:
        raise Malformed("no fedlora update in the reply")
    meta = content.config_records[META]
    num_examples = _field(meta, "num_examples", int)
    fingerprint, nonce = _field(meta, "fingerprint", str), _field(meta, "nonce", str)
    frozen = _field(meta, "freeze_A", bool)
    if frozen != task.freeze_A:
        raise Malformed(f"freeze_A={frozen} answers a task with freeze_A={task.freeze_A}")
    check_reply_arrays(content.array_records[ARRAYS], task)
    lora, _, head = _unpack(load(blob_in(content.array_records[ARRAYS])), ("lora", "head"))
    if frozen:  # A was not sent (check_reply_arrays refused it): restored from the task
        for name, parts in lora.items():
            if name in task.factors:
                parts["A"] = task.factors[name].A
    metrics = {}
    record = content.metric_records[METRICS] if METRICS in content.metric_records else {}
    if len(record) > MAX_METRICS:  # before reading them: a node may send 100,000
        raise RejectedReply(Reject.BAD_METRICS, f"{len(record)} metrics, at most {MAX_METRICS}")
    for k, v in record.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Malformed(f"metric {k!r} must be a number, got {type(v).__name__}"[:160])
        metrics[k] = float(v)
    return ClientUpdate(factors=_factors(lora), num_examples=num_examples, head=head, metrics=metrics,
                        fingerprint=fingerprint, freeze_A=frozen, nonce=nonce)


def encode_profile(cid, budget=None, num_examples: int | None = None) -> RecordDict:
    """What a node says about itself: the partition it holds and, optionally, its budget and (a node
    with its own data) its training examples (passed on as given: the server checks them)."""
    meta = {"cid": cid} if budget is None else {"cid": cid, "budget": budget}
    if num_examples is not None:
        meta["num_examples"] = num_examples
    return RecordDict({META: ConfigRecord(meta)})


def decode_declared_count(content: RecordDict) -> int | None:
    """The training examples a node's profile declares, or None; raises :class:`Malformed`."""
    meta = content.config_records[META] if META in content.config_records else {}
    return _field(meta, "num_examples", int) if "num_examples" in meta else None


def encode_scores(num_examples: int, metrics: dict[str, float]) -> RecordDict:
    """A node's evaluation of the global model on its own held-out rows."""
    return RecordDict({META: ConfigRecord({"num_examples": int(num_examples)}),
                       METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})})


def decode_scores(content: RecordDict) -> tuple[int, dict[str, float]]:
    """(held-out examples, metrics); raises :class:`Malformed` for anything else."""
    if META not in content.config_records or METRICS not in content.metric_records:
        raise Malformed("no fedlora evaluation in the reply")
    metrics = {}
    for k, v in content.metric_records[METRICS].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Malformed(f"metric {k!r} must be a number, got {type(v).__name__}"[:160])
        metrics[k] = float(v)
    return _field(content.config_records[META], "num_examples", int), metrics


def decode_profile(content: RecordDict) -> tuple[int, int | None]:
    """(partition id, budget or None); raises :class:`Malformed` for anything else."""
    if META not in content.config_records:
        raise Malformed("no fedlora profile in the reply")
    meta = content.config_records[META]
    return _field(meta, "cid", int), (_field(meta, "budget", int) if "budget" in meta else None)
