"""An opt-in on-disk cache of tokenised data: a node that restarts (or runs the next job on the
same file) reads its token ids instead of tokenising again.

Off until :func:`enable` names a folder (``fedlora node`` does). An entry is keyed by the
encoder, everything it is given (the rows' texts and labels, ``max_length``) and the
tokenizer's full definition (vocabulary, merges, normaliser, special tokens, padding side,
chat template), so a changed data file, column mapping, subsample, format or tokenizer is a
different key, never a stale hit. Entries are safetensors files (tensors only, nothing to
unpickle), written atomically; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .atomic import write_atomic
from .encoding import Encoded

_folder: Path | None = None


def enable(folder: str | Path | None) -> None:
    """Cache encodings in ``folder`` (created as 0700); None turns the cache off."""
    global _folder
    _folder = None if folder is None else Path(folder).expanduser()
    if _folder is not None:
        _folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything about ``tokenizer`` that changes the ids it produces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # its definition, less the per-call truncation and padding it remembers
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, getattr(tokenizer, "padding_side", ""),
             getattr(tokenizer, "truncation_side", ""), getattr(tokenizer, "chat_template", None) or "",
             repr(sorted(tokenizer.special_tokens_map.items()))]
    return hashlib.sha256("\0".join([body, *map(str, extra)]).encode()).hexdigest()


def _feed(h, arg) -> None:
    if isinstance(arg, np.ndarray):
        h.update(f"ndarray {arg.dtype} {arg.shape}".encode())
        h.update(np.ascontiguousarray(arg).tobytes())
    elif isinstance(arg, (str, int, float)):
        h.update(f"{type(arg).__name__} {arg!r}".encode())
    elif isinstance(arg, Sequence):
        h.update(f"seq {len(arg)}".encode())
        for a in arg:
            _feed(h, a)
    else:
        raise TypeError(f"token_cache: cannot key an argument of type {type(arg).__name__}")
    h.update(b"\0")


def cache_key(encoder: Callable, tokenizer, *args) -> str:
    h = hashlib.sha256(f"{encoder.__module__}.{encoder.__qualname__}\0{tokenizer_fingerprint(tokenizer)}\0".encode())
    for a in args:
        _feed(h, a)
    return h.hexdigest()


def cached_encode(encoder: Callable[..., Encoded], tokenizer, *args) -> Encoded:
    """``encoder(tokenizer, *args)``, read from the cache when it holds the same encoding."""
    if _folder is None:
        return encoder(tokenizer, *args)
    path = _folder / f"{encoder.__name__}-{cache_key(encoder, tokenizer, *args)[:40]}.safetensors"
    if path.exists():
        try:
            t = load_file(str(path))
            return Encoded(t["input_ids"], t["attention_mask"], t["labels"])
        except (OSError, SafetensorError, KeyError):
            pass  # damaged: encode again and replace it
    enc = encoder(tokenizer, *args)
    write_atomic(path, save({"input_ids": enc.input_ids.contiguous(), "attention_mask": enc.attention_mask.contiguous(),
                             "labels": enc.labels.contiguous()}))
    return enc
