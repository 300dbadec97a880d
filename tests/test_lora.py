import pytest
import torch

from fedlora.lora import LoRAModel, matches
from fedlora.types import ClientTask, Factors

from .conftest import TinyRegressor


def test_target_matching_is_by_name_suffix_or_regex():
    assert matches("bert.encoder.layer.0.attention.self.query", ["query"])
    assert not matches("bert.encoder.layer.0.attention.self.query_proj", ["query"])
    assert matches("model.layers.3.self_attn.q_proj", [r"re:.*layers\.[0-3]\.self_attn\.q_proj"])


def test_inject_freezes_base_and_names_candidates_when_nothing_matches():
    lm = LoRAModel(TinyRegressor(), ["up"])
    assert set(lm.layers) == {"up"}
    assert all(not p.requires_grad for n, p in lm.model.named_parameters() if "lora" not in n)
    with pytest.raises(ValueError, match="no linear layer matches.*down"):
        LoRAModel(TinyRegressor(), ["q_proj"])


def test_forward_uses_the_given_scale_not_the_rank_and_ranks_change_in_place():
    torch.manual_seed(0)
    lm = LoRAModel(TinyRegressor(), ["up", "down"])
    x = torch.randn(3, 6)
    base = lm.model.down(torch.tanh(lm.model.up.base(x)))
    for rank, scale in [(2, 0.7), (5, 3.0)]:  # rank changes without rebuilding the model
        f_up = Factors(A=torch.randn(rank, 6), B=torch.randn(5, rank))
        f_down = Factors(A=torch.zeros(rank, 5), B=torch.zeros(4, rank))
        lm.load(ClientTask(factors={"up": f_up, "down": f_down}, scale=scale))
        h = torch.tanh(lm.model.up.base(x) + scale * x @ (f_up.B @ f_up.A).T)
        expected = lm.model.down.base(h)
        torch.testing.assert_close(lm.model(x, torch.zeros(3, 4)).logits, expected)
        assert lm.layers["up"].lora_A.shape == (rank, 6)
    assert not torch.allclose(base, expected)


def test_load_rejects_wrong_modules_and_shapes():
    lm = LoRAModel(TinyRegressor(), ["up", "down"])
    with pytest.raises(ValueError, match="missing"):
        lm.load(ClientTask(factors={"up": Factors(torch.zeros(1, 6), torch.zeros(5, 1))}, scale=1.0))
    with pytest.raises(ValueError, match="do not fit"):
        lm.load(ClientTask(factors={"up": Factors(torch.zeros(1, 5), torch.zeros(6, 1)),
                                    "down": Factors(torch.zeros(1, 5), torch.zeros(4, 1))}, scale=1.0))


def test_frozen_A_and_base_delta():
    lm = LoRAModel(TinyRegressor(), ["up", "down"])
    f = {"up": Factors(torch.randn(2, 6), torch.randn(5, 2)), "down": Factors(torch.randn(2, 5), torch.randn(4, 2))}
    delta = {"up": Factors(torch.randn(3, 6), torch.randn(5, 3))}
    lm.load(ClientTask(factors=f, scale=0.0, freeze_A=True, base_delta=delta))
    assert not lm.layers["up"].lora_A.requires_grad and lm.layers["up"].lora_B.requires_grad
    x = torch.randn(4, 6)
    torch.testing.assert_close(lm.model.up(x), lm.model.up.base(x) + x @ (delta["up"].B @ delta["up"].A).T)


class DequantisingLinear(torch.nn.Module):
    """A stand-in for a quantised layer: its weight is stored as int8 codes and a per-row scale
    (not the dense matrix), and its forward dequantises; it has in/out_features like bitsandbytes'."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        g = torch.Generator().manual_seed(0)
        dense = torch.randn(out_features, in_features, generator=g)
        scale = dense.abs().amax(1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(dense / scale).to(torch.int8))
        self.weight = torch.nn.Parameter((scale * 1.0).squeeze(1), requires_grad=False)  # not (out, in)

    def forward(self, x):
        return x @ (self.codes.float() * self.weight[:, None]).T


@pytest.mark.parametrize("kind", ["quantised stand-in", "Conv1D"])
def test_lora_over_a_quantised_layer_and_a_conv1d_adds_exactly_s_B_A_x(kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(nf=7, nx=5) if kind == "Conv1D" else DequantisingLinear(7, 5)
    model = torch.nn.Sequential()
    model.add_module("proj", base)
    lm = LoRAModel(model, ["proj"])
    assert lm.shapes() == {"proj": (7, 5)}  # (out, in), whatever the stored weight looks like
    f = Factors(A=torch.randn(3, 5), B=torch.randn(7, 3))
    lm.load(ClientTask(factors={"proj": f}, scale=0.37))
    x = torch.randn(4, 5)
    torch.testing.assert_close(lm.model(x), base(x) + 0.37 * x @ (f.B @ f.A).T, rtol=0, atol=1e-6)
    assert lm.layers["proj"].lora_A.dtype == torch.float32  # fp32 LoRA whatever the base stores
