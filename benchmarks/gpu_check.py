"""GPU check: fedlora's client step against PEFT's, whole FSLoRA rounds over bf16 and NF4 bases,
and CPU-CUDA agreement, on a Llama-shaped model built from a config (random weights, no download).

Run it on a CUDA machine as one prepared command: ``python benchmarks/gpu_check.py``. It prints
one ``FIGURE {json}`` line per figure, then the ``SUMMARY`` line:

1. client step, FSLoRA (budget 16 of r = 64, LoRA on all seven projections) vs PEFT's plain
   rank-16 LoRA, same model and batch (8 x 512), bf16 autocast, AdamW: tokens/s, peak memory;
2. a 3-round FSLoRA run of 4 clients (budgets 8/16/32/32 of 64) through ``fedlora.runner``:
   tokens/s, peak GPU memory, the share of round time outside forward/backward;
3. the same over a 4-bit (NF4) base (needs bitsandbytes);
4. one round of a tiny model in fp32 on the CPU and on CUDA: the largest adapter difference.

Without CUDA it says why and exits 0. ``--quick`` runs the same code on tiny shapes on whatever
device there is (a dry run for the test suite; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from common import print_summary, summary_row

from fedlora.client import local_train
from fedlora.config import TrainConfig, load_config
from fedlora.lora import LoRAModel
from fedlora.runner import run
from fedlora.simulate import simulate_round
from fedlora.strategies.fslora import FSLoRA
from fedlora.types import ClientSpec

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256)  # ~1.5B parameters
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = [f"w{i}" for i in range(500)]
LABELS = ["alpha", "beta", "gamma"]
GiB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def word_tokenizer():
    """A whitespace word-level tokenizer over WORDS and the label words (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS, *LABELS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def build_model_dir(root: Path, shape: dict, dtype: torch.dtype, device: torch.device, seq: int) -> Path:
    """A random-weight Llama of ``shape`` saved with the word tokenizer (built on ``device``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / f"llama-{shape['hidden_size']}-{str(dtype).split('.')[-1]}"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2 * seq)).to(dtype)
    model.save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    del model
    return out


def write_data(root: Path, rows: int, seq: int) -> Path:
    """JSONL rows whose text is longer than ``seq`` words: every training row is cut to exactly seq tokens."""
    g = torch.Generator().manual_seed(0)
    path = root / "rows.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            words = torch.randint(len(WORDS), (seq + 8,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(WORDS[w] for w in words), "label": LABELS[i % 3]}) + "\n")
    return path


def step_figure(model_dir: Path, device: torch.device, batch: int, seq: int, steps: int) -> dict:
    """Figure 1: tokens/s and peak memory of fedlora's FSLoRA client step and PEFT's rank-16 step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 3 + len(WORDS), (batch, seq), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    train = TrainConfig(local_steps=steps, batch_size=batch, lr=1e-4, precision="bf16")

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)

    def fedlora_steps(n: int) -> None:
        local_train(ours["lm"], ours["task"], [data] * n, train, 1)

    def peft_steps(n: int) -> None:
        model = theirs["model"]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        gpu = {k: v.to(device) for k, v in data.items()}
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**gpu).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss.item()  # as fedlora's loop does: one host sync per step

    ours = {"lm": LoRAModel(load(), TARGETS)}  # a budget-16 sketch of a rank-64 global pair, as a client gets it
    ours["task"] = FSLoRA(ours["lm"].shapes(), 64, 16.0, seed=0).configure(1, [ClientSpec(0, 16, 1)])[0]
    theirs = {"model": get_peft_model(load(), LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))}
    result = {}
    for name, fn in (("fedlora", fedlora_steps), ("peft", peft_steps)) * 2:  # interleaved, best of two
        fn(2)  # warm-up
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        fn(steps)
        sync(device)
        tps = steps * batch * seq / (time.perf_counter() - t0)
        old = result.get(name, {"tokens_per_s": 0.0})
        if tps > old["tokens_per_s"]:
            result[name] = {"tokens_per_s": tps, "peak_gib": peak_gib(device)}
    result["throughput_ratio"] = result["fedlora"]["tokens_per_s"] / result["peft"]["tokens_per_s"]
    result["memory_ratio"] = result["fedlora"]["peak_gib"] / result["peft"]["peak_gib"]
    return result


@contextmanager
def forward_backward_timer(exp, device: torch.device, spent: dict):
    """Time the model's forward and every backward while ``spent["training"]`` is set
    (synchronised, so GPU work is counted; evaluation's forwards are not training)."""
    forward, backward = exp.lm.model.forward, torch.Tensor.backward

    def timed(fn, key):
        def wrapper(*a, **kw):
            if not spent["training"]:
                return fn(*a, **kw)
            sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(device)
                spent[key] += time.perf_counter() - t0
        return wrapper

    exp.lm.model.forward = timed(forward, "fwd_bwd")
    torch.Tensor.backward = timed(backward, "fwd_bwd")
    try:
        yield
    finally:
        torch.Tensor.backward = backward
        del exp.lm.model.forward


def rounds_figure(model_dir: Path, data: Path, out: Path, device: torch.device, batch: int, seq: int,
                  steps: int, quantization: str = "none") -> dict:
    """Figures 2 and 3: three FSLoRA rounds of four clients through the real runner."""
    from fedlora.experiment import build_experiment

    over = [f'model.name="{model_dir}"', 'model.task="causal-lm"', f"model.targets={json.dumps(TARGETS)}",
            f"model.max_length={seq}", f'model.quantization="{quantization}"',
            'model.dtype="float32"' if quantization != "none" else 'model.dtype="bfloat16"',
            f'data.name="{data}"', 'data.label_column="label"', "data.num_clients=4", 'data.partition="iid"',
            "data.test_size=16", "strategy.global_rank=64", "budgets.per_client=[8, 16, 32, 32]",
            f"train.local_steps={steps}", f"train.batch_size={batch}", 'train.precision="bf16"',
            f'train.device="{device}"', "federation.rounds=3", "federation.eval_every=3",
            f"federation.eval_batch_size={batch}", f'output_dir="{out}"']
    cfg = load_config(None, over)
    exp = build_experiment(cfg)
    spent = {"fwd_bwd": 0.0, "train": 0.0, "training": False}

    def timed_round(e, rnd):
        sync(device)
        t0, spent["training"] = time.perf_counter(), True
        metrics = simulate_round(e, rnd)
        sync(device)
        spent["train"] += time.perf_counter() - t0
        spent["training"] = False
        return metrics

    with forward_backward_timer(exp, device, spent):
        run(cfg, timed_round, overwrite=True, progress=False, exp=exp)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = 3 * 4 * steps * batch * seq
    return {"quantization": quantization, "tokens_per_s": tokens / spent["train"],
            "peak_gib": max((r.get("gpu_peak_gib", float("nan")) for r in rows[1:]), default=float("nan")),
            "outside_fwd_bwd_share": 1 - spent["fwd_bwd"] / spent["train"],
            "train_loss": [r["train_loss"] for r in rows[1:]]}


def agreement_figure(tiny_dir: Path, data: Path, root: Path, devices: list[torch.device]) -> dict:
    """Figure 4: one fp32 round of a tiny model on each device; the largest adapter difference."""
    from safetensors.torch import load_file

    adapters = []
    for d in devices:
        out = root / f"agree-{d.type}"
        over = [f'model.name="{tiny_dir}"', 'model.task="causal-lm"', f"model.targets={json.dumps(TARGETS)}",
                "model.max_length=32", f'data.name="{data}"', 'data.label_column="label"', "data.num_clients=2",
                'data.partition="iid"', "data.test_size=8", "strategy.global_rank=16", "budgets.per_client=[4, 8]",
                "train.local_steps=3", "train.batch_size=4", f'train.device="{d}"', "federation.rounds=1",
                f'output_dir="{out}"']
        run(load_config(None, over), simulate_round, overwrite=True, progress=False)
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    diff = max(float((adapters[0][k] - adapters[-1][k]).abs().max()) for k in adapters[0])
    return {"devices": [str(d) for d in devices], "max_abs_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on any device: a dry run of the code")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        print(f"gpu_check: nothing to measure here ({why}); run it on a CUDA machine. --quick runs a CPU dry run.")
        print_summary([summary_row("gpu_check", "GPU figures", "not measured: no CUDA", "a CUDA machine", None)])
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    shape, batch, seq, steps = (TINY, 2, 32, 2) if args.quick else (SHAPE, 8, 512, 10)
    try:
        import bitsandbytes  # noqa: F401
        quantizations = ["none", "4bit"]
    except ImportError:
        quantizations = ["none"]
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root, rows=4 * steps * batch + 40, seq=seq)
        big = build_model_dir(root, shape, torch.bfloat16, device, seq)
        figures.append({"figure": 1, "what": "client step", **step_figure(big, device, batch, seq, steps)})
        for q in quantizations:
            base = "bf16" if q == "none" else q
            figures.append({"figure": 2 if q == "none" else 3, "what": f"3 FSLoRA rounds, {base} base",
                            **rounds_figure(big, data, root / f"rounds-{q}", device, batch, seq, steps, q)})
        tiny = build_model_dir(root, TINY, torch.float32, torch.device("cpu"), 32)
        devices = [torch.device("cpu"), device]
        figures.append({"figure": 4, "what": "fp32 CPU vs device", **agreement_figure(tiny, data, root, devices)})
    for f in figures:
        print("FIGURE " + json.dumps(f), flush=True)
    where = torch.cuda.get_device_name(device) if cuda else "CPU dry run (numbers meaningless)"
    f1, f2 = figures[0], figures[1]
    real = cuda and not args.quick
    print_summary([
        summary_row("gpu_check", f"client step tokens/s, fedlora / PEFT ({where})",
                    f"{f1['throughput_ratio']:.2f}x", ">= 0.90x", f1["throughput_ratio"] >= 0.9 if real else None),
        summary_row("gpu_check", f"client step peak memory, fedlora / PEFT ({where})",
                    f"{f1['memory_ratio']:.2f}x", "<= 1.10x", f1["memory_ratio"] <= 1.1 if real else None),
        summary_row("gpu_check", f"round time outside forward/backward ({where})", f"{f2['outside_fwd_bwd_share']:.1%}",
                    "<= 5%", f2["outside_fwd_bwd_share"] <= 0.05 if real else None),
        summary_row("gpu_check", "fp32 adapter, CPU vs device: max |difference|", f"{figures[-1]['max_abs_diff']:.2e}",
                    "<= 1e-4", figures[-1]["max_abs_diff"] <= 1e-4 if real else None),
    ])
    return 0 if all(math.isfinite(f.get("tokens_per_s", 0.0)) for f in figures[1:-1]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
