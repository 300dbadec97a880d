"""Evaluation of causal LMs: multiple-choice scoring with a shared prompt cache equals scoring every
full row; FSLoRA rounds on a tiny Llama lower the answer loss (Rouge-L: tests/test_generation.py)."""

import json
from types import SimpleNamespace

import pytest
import torch

from fedlora.cli import main
from fedlora.encoding import IGNORE, ChoiceQuestions, Encoded, encode_choices, encode_pairs
from fedlora.evaluate import answer_logprobs, choice_logprobs, choice_metrics


@pytest.mark.slow
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


def test_choice_metrics_pick_the_best_scored_answer():
    tok_counts = ChoiceQuestions(Encoded(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long),
                                         torch.tensor([0, 1, 1])), [[5], [6, 7]])
    scores = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-0.1, -4.0]])
    m = choice_metrics(scores, tok_counts)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx((1.0 + 0.5 + 4.0) / (1 + 2 + 2))

