"""Where tensors live and how they compute: the configured device, autocast precision, gradient
accumulation, a cosine learning rate across rounds, quantised and GPT-2-style bases."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from fedlora import client
from fedlora.cli import main
from fedlora.client import local_train, round_lr
from fedlora.config import ConfigError, TrainConfig, load_config
from fedlora.device import grad_scaler, resolve_device, to_device
from fedlora.encoding import train_batches
from fedlora.experiment import build_experiment, evaluate_global, train_client
from fedlora.lora import LoRALinear, LoRAModel
from fedlora.seeding import torch_generator
from fedlora.types import ClientTask, Factors

from .conftest import TinyRegressor, tiny_overrides

ACCELERATORS = [d for d, ok in (("cuda", torch.cuda.is_available()),
                                ("mps", torch.backends.mps.is_available())) if ok]


def rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_device_names_resolve_or_fail_with_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == (ACCELERATORS[0] if ACCELERATORS else "cpu")
    with pytest.raises(ConfigError, match="train.device: must be auto, cpu, cuda, cuda:N or mps"):
        load_config(None, ['train.device="gpu"'])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device=cuda:1: CUDA is not available on this machine"):
            resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_asking_for_cuda_without_it_is_one_line_and_exit_2(tiny_bert_dir, tmp_path):
    args = [sys.executable, "-m", "fedlora.cli", "run", *tiny_overrides(tiny_bert_dir, tmp_path / "r"),
            'train.device="cuda"', "--quiet"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fedlora: error: train.device=cuda: CUDA is not available")


@pytest.mark.parametrize("device", ["cpu", *ACCELERATORS])
def test_every_batch_factor_and_head_tensor_is_on_the_configured_device(tiny_bert_dir, tmp_path, device):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, tmp_path / "r", train__device=f'"{device}"'))
    exp = build_experiment(cfg)
    want = resolve_device(device)
    seen: list[torch.device] = []
    exp.lm.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.extend(t.device for t in kwargs.values() if torch.is_tensor(t)), with_kwargs=True)
    task = exp.server.configure(1, [0])[0]
    update = train_client(exp, 1, 0, task)
    for layer in exp.lm.layers.values():  # what the client trained on
        assert {t.device.type for t in (layer.lora_A, layer.lora_B, layer.delta_A, layer.delta_B)} == {want.type}
    assert {p.device.type for p in exp.lm._head.values()} == {want.type}
    # what crosses the wire comes back on the CPU, whatever the client's device
    assert {t.device.type for f in update.factors.values() for t in (f.A, f.B)} == {"cpu"}
    assert {t.device.type for t in update.head.values()} == {"cpu"}
    n_train = len(seen)
    evaluate_global(exp)
    assert n_train > 0 and len(seen) > n_train and {d.type for d in seen} == {want.type}


def test_loading_a_task_and_a_batch_follows_the_model_off_the_cpu():
    """The meta device stands in for an accelerator: a tensor that ignored the model's device
    would stay on the CPU, and mixing it with meta tensors in the forward pass would fail."""
    model = TinyRegressor().to("meta")
    lm = LoRAModel(model, ["up"], head=["down.weight", "down.bias"])
    task = ClientTask(factors={"up": Factors(torch.randn(3, 6), torch.randn(5, 3))}, scale=0.5,
                      base_delta={"up": Factors(torch.randn(2, 6), torch.randn(5, 2))},
                      head={"down.weight": torch.randn(4, 5), "down.bias": torch.randn(4)})
    lm.load(task)
    layer = lm.layers["up"]
    assert lm.device.type == "meta"
    assert {t.device.type for t in (layer.lora_A, layer.lora_B, layer.delta_A, layer.delta_B)} == {"meta"}
    batch = to_device({"x": torch.randn(8, 6), "labels": torch.randn(8, 4)}, lm.device)
    assert lm.model(**batch).loss.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):  # the detector works: a CPU batch is refused
        lm.model(x=torch.randn(8, 6), labels=batch["labels"])


def test_the_training_loop_moves_each_batch_to_the_models_device_and_backpropagates_there():
    """local_train on a meta-device model: its forward sees only meta tensors and the gradients
    land on meta, up to the loop's first read of a number (``loss.item()``), which a meta tensor
    cannot give. Without the loop's ``to_device`` the forward itself fails on the CPU batch."""
    lm = LoRAModel(TinyRegressor().to("meta"), ["up"], head=["down.weight", "down.bias"])
    seen: list[str] = []
    lm.model.register_forward_pre_hook(lambda m, args, kwargs: seen.extend(t.device.type for t in kwargs.values()),
                                       with_kwargs=True)
    task = ClientTask(factors={"up": Factors(torch.randn(3, 6), torch.randn(5, 3))}, scale=0.5,
                      head={"down.weight": torch.randn(4, 5), "down.bias": torch.randn(4)})
    batches = [{"x": torch.randn(8, 6), "labels": torch.randn(8, 4)}]  # on the CPU, as the data loader makes them
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        local_train(lm, task, batches, TrainConfig(local_steps=1), 8)
    assert seen == ["meta", "meta"]
    assert lm.layers["up"].lora_A.grad.device.type == "meta" and lm.layers["up"].lora_B.grad.device.type == "meta"


AUTOCAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def record_lora_outputs(monkeypatch) -> list[tuple[bool, bool, torch.dtype]]:
    """(training?, autocast on?, output dtype) of every forward of a LoRA-wrapped layer (its output
    has its base layer's dtype, the low-rank path cast to it)."""
    seen = []
    forward = LoRALinear.forward

    def spy(self, x):
        y = forward(self, x)
        seen.append((self.training, torch.is_autocast_enabled(x.device.type), y.dtype))
        return y

    monkeypatch.setattr(LoRALinear, "forward", spy)
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_local_training_computes_the_adapted_layers_in_the_precision_asked_for(monkeypatch, regressor_batches,
                                                                              precision):
    """The adapted layer computes in the autocast dtype (float32 without autocast, so this fails if
    autocast is dropped); the factors the client trains and returns stay float32."""
    seen = record_lora_outputs(monkeypatch)
    lm = LoRAModel(TinyRegressor(), ["up"])
    task = ClientTask(factors={"up": Factors(torch.randn(3, 6), torch.randn(5, 3))}, scale=0.5)
    cfg = TrainConfig(local_steps=3, batch_size=8, lr=0.05, optimizer="sgd", momentum=0.0, precision=precision)
    update = local_train(lm, task, regressor_batches, cfg, 24)
    want = AUTOCAST[precision]
    assert seen == [(True, precision != "fp32", want)] * 3
    f = update.factors["up"]
    assert f.A.dtype == f.B.dtype == lm.layers["up"].lora_A.dtype == torch.float32
    assert not torch.equal(f.B, task.factors["up"].B)  # every precision takes real steps


def test_the_fp16_loss_scaler_steps_normally_and_skips_a_step_whose_gradient_is_inf(monkeypatch, regressor_batches):
    scalers: list[torch.amp.GradScaler] = []

    def kept(device, precision):
        scalers.append(grad_scaler(device, precision))
        return scalers[-1]

    monkeypatch.setattr(client, "grad_scaler", kept)
    lm = LoRAModel(TinyRegressor(), ["up"])
    poison = [False]

    def inf_gradient(module, args, out):  # the backward through this layer overflows (loss stays finite)
        if poison[0]:
            out.register_hook(lambda g: torch.full_like(g, math.inf))

    lm.layers["up"].register_forward_hook(inf_gradient)
    task = ClientTask(factors={"up": Factors(torch.randn(3, 6), torch.randn(5, 3))}, scale=0.5)
    cfg = TrainConfig(local_steps=1, batch_size=8, lr=0.05, optimizer="sgd", momentum=0.0, precision="fp16")
    stepped = local_train(lm, task, regressor_batches[:1], cfg, 8)
    poison[0] = True
    skipped = local_train(lm, task, regressor_batches[:1], cfg, 8)
    init = torch.amp.GradScaler("cpu").get_scale()  # 65536
    assert [s.get_scale() for s in scalers] == [init, init * 0.5]  # backed off after the inf only
    assert not torch.equal(stepped.factors["up"].B, task.factors["up"].B)
    assert torch.equal(skipped.factors["up"].A, task.factors["up"].A)  # the step was skipped: nothing moved
    assert torch.equal(skipped.factors["up"].B, task.factors["up"].B)
    assert math.isfinite(skipped.metrics["train_loss"])
    assert not grad_scaler(torch.device("cpu"), "bf16").is_enabled()  # bf16's range needs no scaler


def test_bf16_autocast_trains_a_tiny_model_on_the_cpu_and_its_loss_falls(tiny_bert_dir, tmp_path, monkeypatch):
    seen = record_lora_outputs(monkeypatch)
    out = tmp_path / "bf16"
    over = tiny_overrides(tiny_bert_dir, out, federation__rounds=3, federation__fraction=1.0, train__lr=0.02,
                          train__local_steps=4, train__precision='"bf16"')
    assert main(["run", *over, "--quiet"]) == 0
    losses = [r["train_loss"] for r in rows(out)[1:]]
    assert losses[-1] < losses[0] - 0.02, losses
    assert abs(losses[0] - 0.975) < 0.02  # close to the fp32 run's 0.975 (tests/test_runner.py pins it)
    # training and evaluation both ran the adapted layers in bf16 (float32 without autocast)
    assert {training for training, _, _ in seen} == {True, False}
    assert {(on, dtype) for _, on, dtype in seen} == {(True, torch.bfloat16)}


def one_sgd_step(lm, task, enc, rows_, batch_size, accum):
    cfg = TrainConfig(local_steps=1, batch_size=batch_size, lr=0.5, optimizer="sgd", momentum=0.0,
                      max_grad_norm=0.0, grad_accum_steps=accum)
    batches = train_batches(enc, rows_, batch_size, accum, torch_generator(0, "accum"))
    return local_train(lm, task, batches, cfg, len(rows_))


@pytest.mark.parametrize("model", ["classifier", "causal LM"])
def test_two_accumulated_micro_batches_equal_one_batch_of_twice_the_size(tiny_bert_dir, tiny_llama_dir, tmp_path,
                                                                         model):
    if model == "classifier":
        over = tiny_overrides(tiny_bert_dir, tmp_path / "r")
    else:  # answers of different lengths: micro-batches hold different numbers of loss tokens
        over = tiny_overrides(tiny_llama_dir, tmp_path / "r", model__task='"causal-lm"',
                              model__targets='["q_proj", "v_proj"]', data__prompt_template='"{text}"')
    exp = build_experiment(load_config(None, over))
    for m in exp.lm.model.modules():  # dropout draws differ between one batch and two halves
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    task = exp.server.configure(1, [0])[0]
    rows_ = exp.data.clients[0][:16]
    big = one_sgd_step(exp.lm, task, exp.data.encoded, rows_, 16, 1)
    small = one_sgd_step(exp.lm, task, exp.data.encoded, rows_, 8, 2)
    moved = 0.0
    for name, f in big.factors.items():
        torch.testing.assert_close(small.factors[name].A, f.A, rtol=0, atol=1e-6)
        torch.testing.assert_close(small.factors[name].B, f.B, rtol=0, atol=1e-6)
        moved += float((f.B - task.factors[name].B).abs().sum())
    assert moved > 0  # the step did something
    assert small.metrics["train_loss"] == pytest.approx(big.metrics["train_loss"], rel=1e-6)


def test_cosine_schedule_decays_from_lr_towards_min_lr_over_the_rounds():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, lr_schedule="cosine")
    lrs = [round_lr(cfg, r, 10) for r in range(1, 11)]
    assert lrs[0] == 1e-3 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 1e-5
    assert round_lr(TrainConfig(lr=1e-3), 7, 10) == 1e-3
    with pytest.raises(ConfigError, match="train.min_lr"):
        load_config(None, ["train.min_lr=1.0"])


def test_a_gpt2_shaped_model_trains_two_rounds_with_lora_on_its_conv1d_c_attn(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "gpt2"
    over = tiny_overrides(tiny_gpt2_dir, out, model__task='"causal-lm"', model__targets='["c_attn"]',
                          data__prompt_template='"{text}"', federation__fraction=1.0)
    assert main(["run", *over, "--quiet"]) == 0
    assert [r["round"] for r in rows(out)] == [0, 1, 2] and rows(out)[-1]["train_loss"] > 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"][0].endswith("c_attn")


def tiny_4bit_run(tiny_llama_dir, tmp_path) -> list[str]:
    """Overrides for one round on a 64-wide Llama (bitsandbytes' CPU kernels want layers at least
    64 wide) with a 4-bit base."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "llama64"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    return tiny_overrides(model_dir, tmp_path / "q", model__task='"causal-lm"', model__targets='["q_proj", "v_proj"]',
                          data__prompt_template='"{text}"', model__quantization='"4bit"', federation__rounds=1)


def test_a_4bit_base_without_bitsandbytes_is_one_line_and_exit_2(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    assert main(["run", *tiny_4bit_run(tiny_llama_dir, tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.quantization=4bit: needs bitsandbytes" in err and err.count("error") == 1


def test_a_4bit_base_trains_and_an_evaluation_on_the_repack_path_keeps_its_gradients(tiny_llama_dir, tmp_path,
                                                                                      capsys, monkeypatch):
    """bitsandbytes 0.50 repacks a 4-bit weight for its inference kernel at the first eval-mode
    forward on a CPU with AVX512-BF16, and that kernel has no backward. The repack path is forced
    here (bitsandbytes is told the CPU has AVX512-BF16), so the fix is exercised on any CPU:
    without fedlora's fix the weight is repacked and the gradients after an evaluation differ."""
    bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit path needs bitsandbytes (the quant extra)")
    from bitsandbytes.functional import has_avx512bf16

    native = has_avx512bf16()
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)  # read by every Linear4bit it builds
    assert bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu  # the forcing took
    print(f"4-bit test: bitsandbytes' CPU repack path forced on (this CPU's own AVX512-BF16: {bool(native)})")
    out = tmp_path / "q"
    assert main(["run", *tiny_4bit_run(tiny_llama_dir, tmp_path), "--quiet"]) == 0, capsys.readouterr().err
    assert rows(out)[-1]["train_loss"] > 0
    cfg = load_config(out / "config.toml", [f'output_dir="{tmp_path / "again"}"'])
    grads = []
    for evaluate_first in (False, True):  # an evaluation must not change what training computes next
        exp = build_experiment(cfg)
        base = exp.lm.layers["model.layers.0.self_attn.q_proj"].base
        assert isinstance(base, bnb.nn.Linear4bit)
        if evaluate_first:
            evaluate_global(exp)
        assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)  # the training layout kept
        task = exp.server.configure(1, [0])[0]
        for f in task.factors.values():
            f.B.normal_(generator=torch.Generator().manual_seed(0))  # so that A (in layer 0) gets gradients too
        exp.lm.load(task)
        exp.lm.model.train()
        exp.lm.model(**exp.data.encoded.batch(exp.data.clients[0][:4])).loss.backward()
        grads.append(exp.lm.layers["model.layers.0.self_attn.q_proj"].lora_A.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_quantisation_without_bitsandbytes_or_on_an_unsupported_device_is_one_line(monkeypatch):
    from fedlora.config import ModelConfig
    from fedlora.models import quantization_config

    cfg = ModelConfig(quantization="4bit")
    with pytest.raises(ConfigError, match="model.quantization=4bit: bitsandbytes does not run on mps"):
        quantization_config(cfg, "bf16", torch.device("mps"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"model.quantization=4bit: needs bitsandbytes \(pip install bitsandbytes\)"):
        quantization_config(cfg, "bf16", torch.device("cpu"))
    assert quantization_config(ModelConfig(), "bf16", torch.device("cpu")) is None
