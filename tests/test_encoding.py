"""Prompt -> answer rows: the loss is on the answer tokens only; prompts are cut from the left."""


import pytest

from fedlora.config import ConfigError
from fedlora.encoding import IGNORE, encode_choices, encode_pairs


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
