"""``fedlora plan``: the largest LoRA rank each device can afford, from the model's real sizes.

For a model (built on the meta device: no weights are loaded) and a list of devices
(memory, upload bandwidth, time per round), a rank ``r`` fits a device when

- memory: frozen base weights (in ``model.dtype``, or 4-bit NF4 / 8-bit for the linear
  layers of a quantised base, the rest in the compute dtype) + LoRA parameters, gradients
  and AdamW's two moments (4 copies of ``r · Σ (in + out)`` over the adapted layers, fp32)
  + an activation estimate for one ``batch × seq`` step (2 bytes a value under bf16/fp16
  autocast, 4 in fp32) fits in ``memory_gb``;
- link: uploading the rank-``r`` factors (fp32) takes at most ``round_seconds``.

The activation estimate counts what backward keeps per decoder layer (inputs of every
linear, attention probabilities, the adapters' rank-``r`` intermediates); it is an
estimate, the parameter counts are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, read_toml
from .errors import ConfigError

FP32 = 4
GiB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}
# bytes per weight of a bitsandbytes-quantised linear: NF4 packs two weights a byte plus one
# fp32 absmax per block of 64 (with double quantisation: 8-bit absmax per 64, fp32 per 256 blocks);
# LLM.int8 stores one byte a weight (its per-row scales are negligible)
QUANT_BYTES = {("4bit", False): 0.5 + 4 / 64, ("4bit", True): 0.5 + 1 / 64 + 4 / (64 * 256), ("8bit", False): 1.0,
               ("8bit", True): 1.0}


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    upload_mbps: float
    round_seconds: float = 60.0  # time the device may spend uploading per round


@dataclass(frozen=True)
class ModelProfile:
    base_bytes: int  # frozen weights as loaded (quantised where the config says so)
    shapes: dict[str, tuple[int, int]]  # adapted layers: (out, in)
    hidden: int
    layers: int
    heads: int
    intermediate: int
    activation_bytes: int = FP32  # per activation value: 2 under bf16/fp16 autocast


def lora_params(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    """Parameters of rank-``rank`` LoRA pairs on the given layers: ``r · (in + out)`` each."""
    return rank * sum(o + i for o, i in shapes.values())


def base_bytes(model: torch.nn.Module, cfg: ModelConfig, precision: str) -> int:
    """Bytes of the frozen weights as ``cfg`` loads them: every parameter in ``model.dtype``, or,
    for a quantised base, the linear layers (bar the output head, which bitsandbytes keeps)
    quantised and the rest in the compute dtype."""
    if cfg.quantization == "none":
        return sum(p.numel() for p in model.parameters()) * BYTES[cfg.dtype]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = {id(m.weight): m.weight.numel() for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m is not head}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in linear)
    return int(sum(linear.values()) * QUANT_BYTES[(cfg.quantization, cfg.double_quant)] + rest * BYTES[precision])


def profile_model(cfg: ModelConfig, precision: str = "fp32") -> ModelProfile:
    """Sizes of the model ``cfg`` names, from its config alone (meta-device build)."""
    from .lora import inject_lora
    from .models import meta_model, resolve_targets

    model = meta_model(cfg)
    config = model.config
    base = base_bytes(model, cfg, precision)
    try:
        shapes = {n: m.shape for n, m in inject_lora(model, resolve_targets(cfg, model)).items()}
    except ValueError as e:
        raise ConfigError(f"model.targets: {e}") from None
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), 0)  # noqa: E731
    hidden = get("hidden_size", "d_model", "n_embd")
    return ModelProfile(base_bytes=base, shapes=shapes, hidden=hidden,
                        layers=get("num_hidden_layers", "n_layer"), heads=get("num_attention_heads", "n_head"),
                        intermediate=get("intermediate_size", "n_inner") or 4 * hidden,
                        activation_bytes=BYTES[precision])


def memory_bytes(p: ModelProfile, rank: int, batch: int, seq: int) -> int:
    """Peak training memory of one local step at ``rank`` (see the module docstring)."""
    lora = lora_params(p.shapes, rank) * FP32 * 4  # weights, gradients, AdamW m and v
    tokens, act = batch * seq, p.activation_bytes
    per_layer = tokens * (6 * p.hidden + 3 * p.intermediate) * act + batch * p.heads * seq * seq * act
    adapters = tokens * rank * len(p.shapes) * act
    return p.base_bytes + lora + p.layers * per_layer + adapters


def upload_seconds(p: ModelProfile, rank: int, mbps: float) -> float:
    return lora_params(p.shapes, rank) * FP32 * 8 / (mbps * 1e6)


def largest_rank(p: ModelProfile, d: Device, candidates: list[int], batch: int, seq: int) -> int:
    """The largest candidate rank that fits the device's memory and link (0: none fits)."""
    fits = [r for r in candidates if memory_bytes(p, r, batch, seq) <= d.memory_gb * GiB
            and upload_seconds(p, r, d.upload_mbps) <= d.round_seconds]
    return max(fits, default=0)


def read_devices(path: Path) -> list[Device]:
    """A TOML file of ``[[device]]`` tables: name, memory_gb, upload_mbps[, round_seconds]."""
    tables = read_toml(path, "--devices: devices").get("device", [])
    try:
        devices = [Device(**t) for t in tables]
    except TypeError as e:
        raise ConfigError(f"--devices: {path}: expected [[device]] tables with name, memory_gb, "
                          f"upload_mbps (and optional round_seconds): {e}") from None
    if not devices:
        raise ConfigError(f"--devices: {path} lists no [[device]]")
    for d in devices:
        if d.memory_gb <= 0 or d.upload_mbps <= 0 or d.round_seconds <= 0:
            raise ConfigError(f"--devices: device {d.name!r}: memory, bandwidth and time must be positive")
    return devices


def plan(p: ModelProfile, devices: list[Device], global_rank: int, batch: int, seq: int) -> list[dict]:
    candidates = sorted({r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r <= global_rank} | {global_rank})
    rows = []
    for d in devices:
        r = largest_rank(p, d, candidates, batch, seq)
        rows.append({"device": d.name, "rank": r, "ratio": r / global_rank,
                     "memory_gb": memory_bytes(p, r, batch, seq) / GiB if r else 0.0,
                     "upload_s": upload_seconds(p, r, d.upload_mbps) if r else 0.0})
    return rows


def write_budgets(rows: list[dict], path: Path) -> None:
    """A budgets file for ``budgets.file``: one rank per device that can train at all."""
    able = [r for r in rows if r["rank"] > 0]
    lines = ["# written by `fedlora plan`: one budget per client, in order (budgets.file = ...)",
             "budgets = [" + ", ".join(str(r["rank"]) for r in able) + "]",
             "devices = [" + ", ".join(f'"{r["device"]}"' for r in able) + "]"]
    path.write_text("\n".join(lines) + "\n")
