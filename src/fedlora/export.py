"""Saving the global adapter in PEFT's format (``PeftModel.from_pretrained`` loads it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_dir
from .types import ClientTask, Factors, LoRAState

PEFT_PREFIX = "base_model.model."


def merged_factors(task: ClientTask) -> LoRAState:
    """One LoRA pair per module with scale 1 that equals the task's whole update:
    ``scale * B @ A`` plus any frozen base delta, stacked along the rank."""
    out: LoRAState = {}
    for name, f in task.factors.items():
        parts_A, parts_B = [f.A], [f.B * task.scale]
        if name in task.base_delta:
            parts_A.append(task.base_delta[name].A)
            parts_B.append(task.base_delta[name].B)
        out[name] = Factors(A=torch.cat(parts_A, 0), B=torch.cat(parts_B, 1))
    return out


def save_peft_adapter(task: ClientTask, out_dir: Path, base_model: str, alpha: float,
                      fan_in_fan_out: bool = False, task_type: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir``.

    The rank is the merged rank; ``B`` is rescaled so PEFT's ``alpha / r`` reproduces
    the global model exactly. Head parameters go under their own names
    (``modules_to_save``), as PEFT writes them. ``fan_in_fan_out``: the adapted layers store
    their weight transposed (GPT-2's Conv1D); the factors themselves are the same. The folder
    is written beside ``out_dir`` and renamed over it: whole or not at all. ``task_type``:
    PEFT's (CAUSAL_LM, SEQ_CLS), so ``AutoPeftModelFor...`` loads the right model class.
    """
    factors = merged_factors(task)
    rank = max([1, *(f.rank for f in factors.values())])  # PEFT needs r >= 1
    peft_scale = alpha / rank
    tensors = {}
    for name, f in factors.items():
        pad = rank - f.rank  # PEFT needs one rank per adapter: zero-pad smaller modules
        A = torch.cat([f.A, f.A.new_zeros(pad, f.A.shape[1])], 0)
        B = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], pad)], 1) / peft_scale
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    for name, t in task.head.items():
        tensors[PEFT_PREFIX + name] = t.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(factors),
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in task.head}) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "init_lora_weights": True,
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir / "adapter_model.safetensors"
