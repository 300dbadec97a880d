"""Generation scores: Rouge-L is rouge-score's (stemmed F-measure), exact match is normalised; batched
greedy generation with left padding equals generating every prompt alone, token for token."""

import pytest
import torch

from fedlora.generation import generation_metrics, greedy_tokens, normalise, rouge_l
from fedlora.lora import LoRAModel
from fedlora.state import init_factors
from fedlora.types import ClientTask

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

PAIRS = [("the cat sat", "the cat sat"), ("The cats sat on a mat.", "the cat sat"), ("x", "y"), ("", "a b"),
         ("Running dogs run quickly", "a dog runs"), ("Paris, France!", "paris")]


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_l_is_rouge_scores_f_measure(prediction, reference):
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == ref


def test_rouge_l_stems_and_ignores_case_and_punctuation():
    assert rouge_l("The cats sat on a mat.", "the cat sat") == pytest.approx(2 * (3 / 6) * 1 / (3 / 6 + 1))
    assert rouge_l("x", "y") == 0.0


def test_generation_metrics_average_and_normalise():
    m = generation_metrics(["The cat  sat ", "a dog", "no"], ["the cat sat", "a dog", "yes"])
    assert m["exact_match"] == pytest.approx(2 / 3) and m["rouge_l"] == pytest.approx(2 / 3)
    assert m["rouge_l_stderr"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)  # sample std / sqrt(n)
    assert normalise("  Hello   World ") == "hello world"


def test_batched_left_padded_generation_equals_one_by_one(tiny_chat_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    lm = LoRAModel(model, ["q_proj", "v_proj", "down_proj"])
    factors = init_factors(lm.shapes(), 4, torch.Generator().manual_seed(1))
    for f in factors.values():  # a non-zero adapter: generation goes through the LoRA layers
        f.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    lm.load(ClientTask(factors=factors, scale=2.0))
    texts = ["user : hi [SEP] assistant :", "user : a much longer question about the weather today [SEP] assistant :",
             "x", "user : what now? [SEP] assistant :", "one two three four five six seven eight"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batched = greedy_tokens(model, tok, prompts, max_new_tokens=8, batch_size=3)
    alone = [greedy_tokens(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert sum(map(len, batched)) > 10  # it really generated
    # and one-by-one equals a plain greedy loop without a cache
    with torch.no_grad():
        ids = torch.tensor([prompts[1]])
        loop = []
        for _ in range(8):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.sep_token_id:
                break
            loop.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert alone[1] == loop
