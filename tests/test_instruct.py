"""Instruction and chat fine-tuning on a tiny Llama with a chat template: the labels are exactly the
answers' tokens (every assistant turn), prompts are cut from the left, and federated rounds lower the
held-out answer loss for an alpaca parquet file and a multi-turn messages JSONL."""

import json
import logging

import pytest

from fedlora.cli import main
from fedlora.config import DataConfig
from fedlora.data import load_dataset
from fedlora.encoding import IGNORE, conversation_tokens, encode_conversations, generation_prompt

datasets = pytest.importorskip("datasets")
pytest.importorskip("rouge_score")

TWO_TURNS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is red?"},
             {"role": "assistant", "content": "A colour, like blood."}, {"role": "user", "content": "And blue?"},
             {"role": "assistant", "content": "The sky's colour."}]
ANIMALS = ["cat", "dog", "owl", "fox", "bee", "eel"]


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_llama_dir)


def write_data(tmp_path) -> dict:
    """An alpaca parquet file and a messages JSONL of the same small, learnable task."""
    rows = [{"instruction": f"which animal is number {i % 6}?", "input": "one word" if i % 2 else "",
             "output": f"the {ANIMALS[i % 6]}"} for i in range(96)]
    alpaca = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(alpaca))
    chats = tmp_path / "chat.jsonl"
    with chats.open("w") as f:
        for i in range(96):
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "you know animals"},
                {"role": "user", "content": f"number {i % 6}?"}, {"role": "assistant", "content": ANIMALS[i % 6]},
                {"role": "user", "content": "and after it?"}, {"role": "assistant", "content": ANIMALS[(i + 1) % 6]},
            ]}) + "\n")
    return {"instruction": alpaca, "messages": chats}


def test_labels_are_exactly_every_assistant_turn(tmp_path, chat_tok):
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps({"messages": TWO_TURNS}) + "\n")
    (conv,) = load_dataset(DataConfig(name=str(path), format="messages", partition="iid")).conversations
    enc, cut = encode_conversations(chat_tok, [conv], max_length=128)
    ids, labels = enc.input_ids[0].tolist(), enc.labels[0].tolist()
    sep = chat_tok.sep_token_id
    answers = [chat_tok(t, add_special_tokens=False)["input_ids"] + [sep] for t in (TWO_TURNS[2]["content"],
                                                                                    TWO_TURNS[4]["content"])]
    labelled = [i for i, t in enumerate(labels) if t != IGNORE]
    first = ids.index(chat_tok.convert_tokens_to_ids("blood")) - len(answers[0]) + 3  # "a colour , like blood . [SEP]"
    expected = list(range(first, first + len(answers[0]))) + list(range(len(ids) - len(answers[1]), len(ids)))
    assert labelled == expected
    assert [labels[i] for i in labelled] == answers[0] + answers[1] == [ids[i] for i in labelled]
    assert cut == 0 and chat_tok.decode(ids[:first]).startswith("system : answer briefly. [SEP] user")


def test_long_conversations_lose_their_start_and_long_answers_their_end(chat_tok, caplog):
    long_prompt = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "short answer"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 40}]
    enc, cut = encode_conversations(chat_tok, [long_prompt, long_answer, TWO_TURNS], max_length=16)
    answer = chat_tok("short answer", add_special_tokens=False)["input_ids"] + [chat_tok.sep_token_id]
    assert enc.input_ids[0, -len(answer):].tolist() == answer and int(enc.attention_mask[0].sum()) == 16
    assert (enc.labels[0] != IGNORE).sum() == len(answer)
    assert cut == 1 and enc.labels[1, 0] == IGNORE and (enc.labels[1, 1:16] != IGNORE).all()  # one prompt token left
    ids, ref = generation_prompt(chat_tok, TWO_TURNS, max_length=6)
    assert ref == "The sky's colour." and chat_tok.decode(ids) == "and blue? [SEP] assistant :"


def test_token_counting_finds_the_same_answers_as_offsets(chat_tok):
    class NoOffsets:  # a tokenizer without offset mappings (a "slow" one)
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __call__(self, text, **kw):
            if kw.pop("return_offsets_mapping", False):
                raise NotImplementedError
            return self.tok(text, **kw)

    assert conversation_tokens(NoOffsets(chat_tok), TWO_TURNS) == conversation_tokens(chat_tok, TWO_TURNS)


def run_args(model_dir, data, fmt, out, **extra) -> list[str]:
    over = {"model.name": f'"{model_dir}"', "model.targets": '["q_proj", "v_proj", "up_proj", "down_proj"]',
            "model.max_length": 48, "data.name": f'"{data}"', "data.format": f'"{fmt}"', "data.num_clients": 3,
            "data.partition": '"iid"', "data.test_size": 12, "strategy.global_rank": 8, "budgets.ranks": "[2, 4, 8]",
            "train.local_steps": 6, "train.batch_size": 8, "train.lr": 3e-2, "federation.rounds": 3,
            "federation.eval_every": 1,
            "eval.generate_examples": 6, "eval.max_new_tokens": 4, "eval.batch_size": 4, "output_dir": f'"{out}"'}
    over.update(extra)
    return ["run", *(f"{k}={v}" for k, v in over.items()), "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["instruction", "messages"])
def test_federated_rounds_lower_the_answer_loss(tiny_chat_llama_dir, tmp_path, fmt, capsys):
    data = write_data(tmp_path)[fmt]
    out = tmp_path / "run"
    assert main(run_args(tiny_chat_llama_dir, data, fmt, out)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval_loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5 and losses == sorted(losses, reverse=True), losses
    for r in (rows[0], rows[-1]):
        assert {"eval_loss", "eval_perplexity", "eval_rouge_l", "eval_exact_match"} <= set(r)
        assert "eval_accuracy" not in r and 0 <= r["eval_rouge_l"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_metric_name"] == "rouge_l" and summary["final_loss"] == losses[-1]
    assert summary["test_examples"] == 12 and summary["generated_examples"] == 6
    assert "Rouge-L" in capsys.readouterr().out
    triples = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [t["round"] for t in triples] == [0] * 6 + [3] * 6
    assert {"prompt", "reference", "generation"} <= set(triples[0])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


def test_over_long_answers_are_reported_once(tiny_chat_llama_dir, tmp_path, caplog):
    from fedlora.config import load_config
    from fedlora.experiment import build_experiment

    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say it {i}", "completion": "yes " * (30 if i % 4 else 3)}) + "\n"
                            for i in range(40)))
    cfg = load_config(None, run_args(tiny_chat_llama_dir, data, "prompt-completion", tmp_path / "r",
                                     **{"model.max_length": 20, "data.test_size": 4})[1:-1])
    with caplog.at_level(logging.WARNING, logger="fedlora.experiment"):
        exp = build_experiment(cfg)
    warnings = [r.getMessage() for r in caplog.records if "do not fit in model.max_length" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("30 of 40 answers do not fit in model.max_length = 20 ")
    assert exp.data.encoded.input_ids.shape[1] == 20


def test_targets_that_match_nothing_are_one_line(tiny_chat_llama_dir, tmp_path, capsys):
    data = write_data(tmp_path)["messages"]
    args = run_args(tiny_chat_llama_dir, data, "messages", tmp_path / "run", **{"model.targets": '["query"]'})
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fedlora: error: model.targets: no linear layer matches targets ['query']; linear layers "
                          "here end in ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj'")


@pytest.mark.slow
def test_compare_tabulates_and_plots_rouge_l_for_generative_runs(tiny_chat_llama_dir, tmp_path):
    data = write_data(tmp_path)["instruction"]
    args = run_args(tiny_chat_llama_dir, data, "instruction", tmp_path / "unused", **{"federation.rounds": 1})
    out = tmp_path / "cmp"
    assert main(["compare", *args[1:-1], "--methods", "fslora,hetlora", "--out", str(out), "--quiet"]) == 0
    report = (out / "results.md").read_text()
    assert "| method | lr | final Rouge-L |" in report and "Rouge-L on the global held-out set" in report
    assert (out / "rouge_l_vs_round.png").is_file() and "final_rouge_l_mean" in (out / "results.csv").read_text()
