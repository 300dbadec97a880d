"""`fedlora plan`: monotone in memory, exact LoRA parameter counts, one-line errors for bad device files."""

import pytest
import torch

from fedlora.cli import main
from fedlora.config import ConfigError, ModelConfig
from fedlora.lora import LoRAModel
from fedlora.plan import Device, largest_rank, lora_params, memory_bytes, profile_model, read_devices
from fedlora.types import ClientTask, Factors

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def profile(tiny_llama_dir):
    return profile_model(ModelConfig(name=str(tiny_llama_dir), task="causal-lm", targets=TARGETS))


@pytest.mark.parametrize("rank", [1, 3, 8, 16])
def test_lora_parameter_count_matches_the_injected_adapters(tiny_llama_dir, profile, rank):
    from transformers import AutoModelForCausalLM

    lm = LoRAModel(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), TARGETS)
    lm.load(ClientTask(factors={n: Factors(torch.zeros(rank, i), torch.zeros(o, rank))
                                for n, (o, i) in lm.shapes().items()}, scale=1.0))
    injected = sum(p.numel() for n, p in lm.model.named_parameters() if "lora_" in n)
    assert lora_params(profile.shapes, rank) == injected
    base = sum(p.numel() for n, p in lm.model.named_parameters() if "lora_" not in n)
    assert profile.base_bytes == base * 4


def test_more_memory_never_means_a_smaller_rank(profile):
    candidates = [1, 2, 4, 8, 16, 32, 64]
    need = [memory_bytes(profile, r, 4, 32) / 2**30 for r in candidates]
    assert need == sorted(need)  # memory grows with the rank
    for mbps in (0.01, 0.1, 1.0, 100.0):
        for mem in [need[0] * f for f in (0.5, 0.99, 1.0, 1.001, 1.5, 3.0, 10.0)]:
            small = largest_rank(profile, Device("a", mem, mbps), candidates, 4, 32)
            big = largest_rank(profile, Device("b", 2 * mem, mbps), candidates, 4, 32)
            assert big >= small


def test_plan_command_prints_a_table_and_writes_budgets(tiny_llama_dir, tmp_path, capsys):
    devices = tmp_path / "d.toml"
    devices.write_text('[[device]]\nname = "slow"\nmemory_gb = 4\nupload_mbps = 0.001\n\n'
                       '[[device]]\nname = "fast"\nmemory_gb = 4\nupload_mbps = 1000\n\n'
                       '[[device]]\nname = "tiny"\nmemory_gb = 0.0001\nupload_mbps = 1000\n')
    out = tmp_path / "budgets.toml"
    assert main(["plan", "--devices", str(devices), "--model", str(tiny_llama_dir), "--global-rank", "32",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fast" in text and "slow" in text
    from fedlora.budgets import read_budgets_file

    budgets = read_budgets_file(out)
    assert budgets[-1] == 32 and budgets[0] < 32 and len(budgets) == 2  # "tiny" cannot train at all


@pytest.mark.parametrize("content, message", [
    ("", "lists no"),
    ('[[device]]\nname = "x"\n', "expected"),
    ('[[device]]\nname = "x"\nmemory_gb = -1\nupload_mbps = 1\n', "must be positive"),
])
def test_bad_device_files_are_one_line_errors(tmp_path, content, message, capsys):
    f = tmp_path / "d.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_devices(f)
    assert main(["plan", "--devices", str(f)]) == 2
    assert "fedlora: error:" in capsys.readouterr().err
