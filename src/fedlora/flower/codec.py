"""ClientTask / ClientUpdate <-> Flower records. The only place Flower's keys live."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from ..types import ClientTask, ClientUpdate, Factors, LoRAState, tensors_of

TRAIN, QUERY = "train", "query"
ARRAYS, META, METRICS = "fedlora.arrays", "fedlora.meta", "fedlora.metrics"
CONFIG_PREFIX = "config."


def _pack(payload: ClientTask | ClientUpdate) -> ArrayRecord:
    return ArrayRecord({k: v.contiguous() for k, v in tensors_of(payload).items()})


def _unpack(record: ArrayRecord) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]],
                                         dict[str, Tensor]]:
    """Split the flat keys of :func:`fedlora.types.tensors_of` back into their groups."""
    lora: dict[str, dict[str, Tensor]] = {}
    delta: dict[str, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    for key, t in record.to_torch_state_dict().items():
        group, _, rest = key.partition(".")
        if group == "head":
            head[rest] = t
        else:
            name, _, part = rest.rpartition(".")
            (lora if group == "lora" else delta).setdefault(name, {})[part] = t
    return lora, delta, head


def _factors(parts: dict[str, dict[str, Tensor]]) -> LoRAState:
    return {n: Factors(A=p["A"], B=p["B"]) for n, p in parts.items()}


def encode_task(task: ClientTask, rnd: int) -> RecordDict:
    meta = {"round": rnd, "scale": float(task.scale), "freeze_A": bool(task.freeze_A),
            "fingerprint": task.fingerprint}
    meta.update({CONFIG_PREFIX + k: v for k, v in task.config.items()})
    return RecordDict({ARRAYS: _pack(task), META: ConfigRecord(meta)})


def decode_task(content: RecordDict) -> tuple[int, ClientTask]:
    meta = content.config_records[META]
    lora, delta, head = _unpack(content.array_records[ARRAYS])
    config = {k[len(CONFIG_PREFIX):]: v for k, v in meta.items() if k.startswith(CONFIG_PREFIX)}
    task = ClientTask(factors=_factors(lora), scale=float(meta["scale"]), freeze_A=bool(meta["freeze_A"]),
                      base_delta=_factors(delta), head=head, config=config, fingerprint=str(meta["fingerprint"]))
    return int(meta["round"]), task


def encode_update(update: ClientUpdate) -> RecordDict:
    meta = {"num_examples": int(update.num_examples), "fingerprint": update.fingerprint,
            "freeze_A": bool(update.freeze_A)}
    return RecordDict({ARRAYS: _pack(update), META: ConfigRecord(meta),
                       METRICS: MetricRecord({k: float(v) for k, v in update.metrics.items()})})


def decode_update(content: RecordDict, task: ClientTask) -> ClientUpdate:
    """The update, with a frozen ``A`` (not sent) restored from the task it answers."""
    meta = content.config_records[META]
    lora, _, head = _unpack(content.array_records[ARRAYS])
    frozen = bool(meta["freeze_A"])
    if frozen:
        for name, parts in lora.items():
            if name in task.factors:
                parts.setdefault("A", task.factors[name].A)
    factors = {n: Factors(A=p["A"], B=p["B"]) for n, p in lora.items() if "A" in p and "B" in p}
    metrics = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}
    return ClientUpdate(factors=factors, num_examples=int(meta["num_examples"]), head=head,
                        metrics=metrics, fingerprint=str(meta["fingerprint"]), freeze_A=frozen)


def encode_profile(cid: int, budget: int, num_examples: int) -> RecordDict:
    return RecordDict({META: ConfigRecord({"cid": cid, "budget": budget, "num_examples": num_examples})})


def decode_profile(content: RecordDict) -> tuple[int, int, int]:
    meta = content.config_records[META]
    return int(meta["cid"]), int(meta["budget"]), int(meta["num_examples"])
