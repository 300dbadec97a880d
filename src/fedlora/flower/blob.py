"""Many tensors as one safetensors byte string, and a strict reader of its header.

Flower moves every Array of a message as its own objects, one round trip each; the codec
therefore sends all the tensors of a task or update as one blob (:func:`pack`). The blob
comes from outside, so its header is read from the bytes alone before
``safetensors.torch.load`` sees them (:func:`read_header`, :func:`check_layout`): the length
prefix against a cap before any JSON is decoded; each entry's dtype, shape and data offsets;
the offsets tiling the data exactly (in order, no gap or overlap, each tensor
``numel x itemsize``); and no byte past the last tensor. Only then may the bytes go to
``safetensors.torch.load`` (which builds tensors and runs no code).

Layout: ``u64 little-endian N``, ``N`` bytes of JSON ``{key: {"dtype", "shape",
"data_offsets": [start, end]}, "__metadata__"?: {str: str}}``, then the data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from safetensors.torch import save
from torch import Tensor

from ..validate import Reject, RejectedReply

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}  # the safetensors dtype codes a blob may hold
PREFIX = 8  # bytes of the header's length


class Malformed(ValueError):
    """A record that is not what the protocol says it is."""


@dataclass(frozen=True)
class Entry:
    """One tensor as the header declares it; ``start``/``end`` are offsets into the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def dtype_name(code: str) -> str:
    """``torch.float32`` for ``F32``; an unknown code as itself, quoted."""
    return str(DTYPES[code]) if code in DTYPES else repr(code)[:24]


def pack(tensors: dict[str, Tensor]) -> bytes:
    """One safetensors blob of ``tensors`` (any device, any layout; bf16/fp16/fp32 kept)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen:  # safetensors refuses two keys on one storage (a tensor sent twice, views)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return save(out)


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):  # json keeps the last, safetensors' parser may not: refuse both
        raise Malformed(f"the blob's header repeats a key: {sorted(k for k in keys if keys.count(k) > 1)[0]!r}"[:160])
    return dict(pairs)


def _entry(key: str, v: object) -> Entry:
    ok = (isinstance(v, dict) and set(v) == {"dtype", "shape", "data_offsets"} and isinstance(v["dtype"], str)
          and isinstance(v["shape"], list) and isinstance(v["data_offsets"], list) and len(v["data_offsets"]) == 2
          and all(type(x) is int and x >= 0 for x in v["shape"] + v["data_offsets"]))
    if not ok:
        raise Malformed(f"tensor {key!r} has no valid dtype, shape and data_offsets in the blob's header"[:160])
    return Entry(v["dtype"], tuple(v["shape"]), *v["data_offsets"])


def read_header(data: bytes, max_header: int) -> tuple[int, dict[str, Entry]]:
    """(header length, its entries), read from ``data``'s first bytes only.

    Raises :class:`Malformed`; ``RejectedReply(TOO_LARGE)`` for a header over ``max_header``
    bytes (checked before a byte of it is decoded)."""
    if len(data) < PREFIX:
        raise Malformed(f"a tensor blob of {len(data)} bytes has no header")
    n = int.from_bytes(data[:PREFIX], "little")
    if n > len(data) - PREFIX:
        raise Malformed(f"the blob's header claims {n} bytes, the blob has {len(data) - PREFIX} after its length")
    if n > max_header:
        raise RejectedReply(Reject.TOO_LARGE, f"the blob's header holds {n} bytes, at most {max_header}")
    if data[PREFIX:PREFIX + 1] != b"{":
        raise Malformed("the blob's header is not a JSON object")
    try:
        raw = json.loads(data[PREFIX:PREFIX + n].decode("utf-8"), object_pairs_hook=_unique)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise Malformed(f"the blob's header is not JSON: {e}"[:160]) from None
    meta = raw.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise Malformed("the blob's __metadata__ is not a map of strings")
    return n, {key: _entry(key, v) for key, v in raw.items()}


def check_layout(entries: dict[str, Entry], payload: int) -> None:
    """The entries' offsets tile the ``payload`` bytes after the header exactly, each tensor
    ``numel x itemsize`` of a known dtype. Raises :class:`Malformed`; a payload longer than its
    tensors: ``RejectedReply(TOO_LARGE)``."""
    end = 0
    for key, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.dtype not in DTYPES:
            raise Malformed(f"tensor {key!r} has an unknown dtype {e.dtype!r}"[:160])
        if e.start != end:
            raise Malformed(f"tensor {key!r} starts at byte {e.start} of the data, expected {end} "
                            f"(a gap or an overlap)"[:160])
        size = math.prod(e.shape) * DTYPES[e.dtype].itemsize
        if e.end - e.start != size:
            raise Malformed(f"tensor {key!r} spans {e.end - e.start} bytes, its shape and dtype make {size}"[:160])
        end = e.end
    if end > payload:
        raise Malformed(f"the tensors end at byte {end} of the data, the blob holds {payload}"[:160])
    if payload > end:
        raise RejectedReply(Reject.TOO_LARGE, f"the tensor blob holds {payload} bytes of data, its tensors {end}")
