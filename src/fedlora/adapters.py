"""PEFT adapters in and out of a run: starting the global pair from an existing adapter
(``model.init_adapter``), merging a run's exported adapter into a full model (``fedlora export
--merge``), and the PEFT task type an export records.

The exported adapter itself is written by :func:`fedlora.export.save_peft_adapter`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ConfigError, check
from .export import PEFT_PREFIX
from .lora import LoRAModel
from .methods import METHODS, Method
from .types import Factors, LoRAState

KEY = "model.init_adapter"


def peft_task_type(task: str, model: nn.Module) -> str | None:
    """What ``adapter_config.json`` records, so ``AutoPeftModelFor...`` picks the model class:
    CAUSAL_LM, SEQ_CLS for a classifier with the model's own head, None for fedlora's
    mean-pooling classifier (no transformers class builds it)."""
    from .models import MeanPoolClassifier

    if isinstance(model, MeanPoolClassifier):
        return None
    return "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"


def read_adapter(path: Path, key: str = KEY) -> tuple[dict, dict[str, Tensor]]:
    """``adapter_config.json`` and the tensors of a PEFT LoRA adapter directory."""
    from safetensors.torch import load_file

    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    check(key, config_file.is_file() and weights.is_file(),
          f"{path} is not a PEFT adapter directory (it needs adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {config_file} is not valid JSON ({e})") from None
    check(key, config.get("peft_type") == "LORA", f"{path} is a {config.get('peft_type')} adapter, not LoRA")
    odd = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)] + (["use_dora"] if config.get("use_dora")
                                                                             else [])
    check(key, not odd, f"{path} uses {', '.join(odd)}: only one rank and alpha for every module can be read")
    check(key, config.get("bias", "none") == "none", f"{path} trains biases (bias = {config['bias']!r}); not supported")
    return config, load_file(str(weights))


def adapter_scale(config: dict, where: Path | str = "adapter_config.json") -> float:
    """The forward scale PEFT applies: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``)."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    check(KEY, isinstance(r, int) and not isinstance(r, bool) and r > 0, f"{where}: r = {r!r} must be a positive rank")
    check(KEY, isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha),
          f"{where}: lora_alpha = {alpha!r} must be a finite number")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_pairs(path: Path, lm: LoRAModel) -> tuple[LoRAState, dict[str, Tensor], float]:
    """The adapter's pair for every adapted module of ``lm``, the head tensors it carries, and its scale."""
    config, tensors = read_adapter(path)
    pairs: LoRAState = {}
    for name, shape in lm.shapes().items():
        A, B = (tensors.get(f"{PEFT_PREFIX}{name}.lora_{x}.weight") for x in "AB")
        if A is None or B is None:
            adapted = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
            raise ConfigError(f"{KEY}: {path} has no LoRA pair for {name} (it adapts {adapted[:4]}...); "
                              "set model.targets to the adapter's modules")
        f = Factors(A=A.float(), B=B.float())
        check(KEY, f.shape == shape, f"{path}: {name} is {f.shape} there, {shape} in this model")
        pairs[name] = f
    extra = sorted({k for k in tensors if ".lora_A." in k} - {f"{PEFT_PREFIX}{n}.lora_A.weight" for n in pairs})
    if extra:
        raise ConfigError(f"{KEY}: {path} adapts modules this run does not ({extra[0]}...): set model.targets to match")
    head = {n: tensors[PEFT_PREFIX + n] for n in lm.head_names if PEFT_PREFIX + n in tensors}
    own = lm.head_state()
    for n, t in head.items():  # copy_ would broadcast a (1,) tensor over the whole head without a word
        check(KEY, t.shape == own[n].shape,
              f"{path}: {n} is {tuple(t.shape)} there, {tuple(own[n].shape)} in this model")
    return pairs, head, adapter_scale(config, path / "adapter_config.json")


def start_from_adapter(strategy, method: Method, path: str, lm: LoRAModel) -> None:
    """Make the adapter at ``path`` the strategy's global pair (and ``lm``'s head, when it carries one).

    The function is unchanged: ``B`` is rescaled from PEFT's scale to the strategy's, and an adapter
    of a smaller rank is padded with zero ``B`` columns over the strategy's own fresh ``A`` rows.
    """
    able = [m.name for m in METHODS.values() if m.one_pair]
    check(KEY, method.one_pair, f"{method.name} keeps no single global pair to start from (methods that can: "
          f"{', '.join(able)})")
    pairs, head, scale = adapter_pairs(Path(path).expanduser(), lm)
    rank = next(iter(strategy.factors.values())).rank
    r = max(f.rank for f in pairs.values())
    check(KEY, r <= rank, f"the adapter's rank {r} exceeds the rank of {method.name}'s global pair ({rank})")
    new: LoRAState = {}
    for name, f in strategy.factors.items():
        A, B = f.A.clone(), torch.zeros_like(f.B)
        k = pairs[name].rank
        A[:k] = pairs[name].A.to(A.dtype)
        B[:, :k] = (pairs[name].B * (scale / strategy.scale)).to(B.dtype)
        new[name] = Factors(A=A, B=B)
    strategy.factors = new
    lm.load_head(head)


def merge_run(run_dir: Path, out: Path) -> Path:
    """Write ``run_dir``'s exported adapter merged into its base model (PEFT's ``merge_and_unload``),
    with the base's tokenizer, as a plain transformers checkpoint in ``out``."""
    adapter = run_dir / "adapter"
    check("RUN_DIR", (adapter / "adapter_config.json").is_file(),
          f"{run_dir} holds no exported adapter (adapter/adapter_config.json): is it a finished fedlora run?")
    check("--merge", not out.exists() or (out.is_dir() and not any(out.iterdir())),
          f"{out} exists and is not an empty directory")
    config, _ = read_adapter(adapter, "RUN_DIR")
    task_type = config.get("task_type")
    try:
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("--merge needs PEFT: pip install peft") from None
    if task_type == "CAUSAL_LM":
        model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    elif task_type == "SEQ_CLS":
        labels = json.loads((run_dir / "clients.json").read_text())["labels"]
        model = AutoPeftModelForSequenceClassification.from_pretrained(str(adapter), num_labels=len(labels))
    else:
        raise ConfigError(f"RUN_DIR: {adapter} is for fedlora's mean-pooling classifier, which no transformers "
                          "class builds; load it with peft.PeftModel.from_pretrained on that model")
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(config["base_model_name_or_path"]).save_pretrained(str(out))
    return out
