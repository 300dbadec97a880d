"""ClientTask / ClientUpdate <-> Flower records. The only place Flower's keys live.

Decoding what a node sends is strict: a missing or ill-typed field, an unknown key or a
tensor that is no LoRA factor raises :class:`Malformed` (the server's screening turns it
into a typed rejection of that client, see :func:`fedlora.validate.decode_updates`).
Before any tensor of a reply is built, its keys, shapes, dtypes and byte sizes are read
from the record's metadata and checked against what the task expects
(:func:`check_reply_arrays`), so a reply costs the server at most what the task allows.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from ..state import dense_as_factors
from ..types import ClientTask, ClientUpdate, Factors, LoRAState, tensors_of
from ..validate import MAX_METRICS, Reject, RejectedReply

TRAIN, QUERY, EVALUATE = "train", "query", "evaluate"
ARRAYS, META, METRICS = "fedlora.arrays", "fedlora.meta", "fedlora.metrics"
CONFIG_PREFIX = "config."
GROUPS, PARTS = ("lora", "delta", "head"), ("A", "B")
NPY_HEADER_MAX = 4096  # bytes of .npy header an Array's data may hold besides the raw values


class Malformed(ValueError):
    """A record that is not what the protocol says it is."""


def _field(meta, key: str, kind: type):
    """``meta[key]``, which must be a ``kind`` (an int is not a bool, nor a bool an int)."""
    if key not in meta:
        raise Malformed(f"missing field {key!r}")
    v = meta[key]
    if kind is int and isinstance(v, bool) or not isinstance(v, kind):
        raise Malformed(f"field {key!r} must be {kind.__name__}, got {type(v).__name__} {v!r}"[:160])
    return v


def _pack(payload: ClientTask | ClientUpdate) -> ArrayRecord:
    return ArrayRecord({k: v.contiguous() for k, v in tensors_of(payload).items()})


def _unpack(record: ArrayRecord, groups: tuple[str, ...]) -> tuple[dict[str, dict[str, Tensor]],
                                                                   dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Split the flat keys of :func:`fedlora.types.tensors_of` back into their groups."""
    lora: dict[str, dict[str, Tensor]] = {}
    delta: dict[str, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    for key, t in record.to_torch_state_dict().items():
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
    """Each array of an update's record, from its metadata only (no tensor is built): a key the
    task expects, its shape and dtype, and no more bytes than those allow (the ``.npy`` data
    carries its own header, which could claim another shape than the metadata)."""
    expected = tensors_of(ClientUpdate(factors=task.factors, num_examples=1, head=task.head,
                                       freeze_A=task.freeze_A))
    for key in record.keys():
        want = expected.get(key)
        if want is None and task.freeze_A and key.startswith("lora.") and key.endswith(".A"):
            raise Malformed(f"{key[len('lora.'):]} is frozen and must not be sent"[:160])
        if want is None:
            raise Malformed(f"unexpected tensor {key!r}"[:160])
        arr = record[key]
        name = f"head {key[len('head.'):]}" if key.startswith("head.") else key
        if tuple(arr.shape) != tuple(want.shape):
            raise RejectedReply(Reject.WRONG_SHAPE, f"{name} is {tuple(arr.shape)}"[:120] +
                                f", expected {tuple(want.shape)}")
        if f"torch.{arr.dtype}" != str(want.dtype):
            raise RejectedReply(Reject.WRONG_DTYPE, f"{name} is torch.{arr.dtype}"[:120] + f", expected {want.dtype}")
        allowed = want.numel() * want.element_size() + NPY_HEADER_MAX
        if len(arr.data) > allowed:
            raise RejectedReply(Reject.TOO_LARGE, f"{name} holds {len(arr.data)} bytes, at most {allowed}")


def encode_task(task: ClientTask, rnd: int) -> RecordDict:
    meta = {"round": rnd, "scale": float(task.scale), "freeze_A": bool(task.freeze_A),
            "fingerprint": task.fingerprint, "nonce": task.nonce}
    meta.update({CONFIG_PREFIX + k: v for k, v in task.config.items()})
    return RecordDict({ARRAYS: _pack(task), META: ConfigRecord(meta)})


def decode_task(content: RecordDict) -> tuple[int, ClientTask]:
    meta = content.config_records[META]
    lora, delta, head = _unpack(content.array_records[ARRAYS], GROUPS)
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
    return RecordDict({ARRAYS: _pack(update), META: ConfigRecord(meta),
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
    lora, _, head = _unpack(content.array_records[ARRAYS], ("lora", "head"))
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
