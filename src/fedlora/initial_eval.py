"""The round-0 evaluation, remembered within a process for a model that scores the same.

Before any round, every method of a comparison holds the same model: the same base, the same
freshly initialised head (seeded by the run's seed) and LoRA pairs whose product is zero
(``B = 0``), however each method shapes its factors. Evaluating that model once per seed instead
of once per run saves a third of an evaluation-heavy run (a generative task's greedy answers:
about 80 s of a 4.5-minute SmolLM2 run on 2 cores).

The key is a digest of everything the evaluation reads, taken from the objects themselves rather
than from config fields believed to matter: the base weights (their fingerprint), the head, each
adapted layer's effective weight change ``s B A`` (plus any frozen delta), the data with its
held-out rows, the evaluation settings and the device. Two runs with equal keys evaluate the same
model on the same data: at round 0 (every ``B = 0``) to the bit; factors that differ but multiply to
the same change would agree to float rounding. A run whose model or data differs in one bit misses.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .experiment import Experiment, evaluate_global
from .lora import LoRALinear

_REMEMBERED: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()
KEEP = 32  # a study worker meets every seed's starting model, and the reference lines' (their own data): small entries


def _feed(h: Any, obj: Any) -> None:
    """Add ``obj`` to the hash ``h``: tensors and arrays by dtype, shape and bytes, containers and
    dataclasses field by field, anything else by its repr."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"N{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(type(obj).__name__.encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    else:
        h.update(repr(obj).encode())


def effective_change(layer: LoRALinear) -> torch.Tensor | None:
    """The weight change the layer adds to its base (None: none at all), with -0.0 made +0.0 so that
    a zero ``B`` times any ``A`` hashes the same."""
    with torch.no_grad():
        total = None
        if layer.lora_A.shape[0] > 0 and layer.scale != 0 and bool(layer.lora_B.any()):
            total = layer.scale * (layer.lora_B @ layer.lora_A)
        if layer.delta_A.shape[0] > 0:
            total = (layer.delta_B @ layer.delta_A) + (0 if total is None else total)
        if layer.delta_W.shape[0] > 0:
            total = layer.delta_W + (0 if total is None else total)
        return None if total is None or not bool(total.any()) else total + 0.0


def model_key(exp: Experiment) -> str:
    """The digest of what the global model's evaluation reads (after ``exp.lm.load`` of its task)."""
    lm, cfg = exp.lm, exp.cfg
    h = hashlib.sha256(lm.fingerprint.encode())
    _feed(h, lm.head_state())
    for name in sorted(lm.layers):
        h.update(name.encode())
        _feed(h, effective_change(lm.layers[name]))
    _feed(h, exp.data)
    _feed(h, [cfg.model, cfg.eval, cfg.federation.eval_batch_size, cfg.train.precision, str(lm.device)])
    return h.hexdigest()


def evaluate_initial(exp: Experiment, samples: list[dict]) -> dict:
    """:func:`evaluate_global` of the model before round 1, from this process's memory when a model that
    scores the same was evaluated already. A carrier that asks remote nodes to evaluate is never
    remembered (their answers are theirs)."""
    if exp.client_evaluator is not None:
        return evaluate_global(exp, samples)
    exp.lm.load(exp.server.global_task())
    key = model_key(exp)
    if key not in _REMEMBERED:
        fresh: list[dict] = []
        _REMEMBERED[key] = (evaluate_global(exp, fresh), fresh)
        while len(_REMEMBERED) > KEEP:
            _REMEMBERED.popitem(last=False)
    _REMEMBERED.move_to_end(key)
    metrics, remembered = copy.deepcopy(_REMEMBERED[key])
    samples.extend(remembered)
    return metrics
