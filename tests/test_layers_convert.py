"""BitLinear / SubLN / BitLinearLRC against reference formulas; conversion of every supported architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from bitnet.convert import BitNetConfig, UnsupportedArchitectureError, add_lrc, convert_to_bitnet
from bitnet.layers import BitLinear, BitLinearLRC, SubLN, bit_linears, set_quant_lambda
from bitnet.quant import act_quant, act_quant_value, weight_quant, weight_quant_value

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
ARCHS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16),
}
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()


def ref_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def test_bitlinear_forward_is_exactly_quantized_linear() -> None:
    lin = nn.Linear(64, 32, bias=True)
    layer = BitLinear.from_linear(lin)
    x = torch.randn(3, 7, 64)
    expected = F.linear(act_quant(x), weight_quant(lin.weight), lin.bias)
    assert torch.equal(layer(x), expected)
    # and numerically the hand-quantized computation
    manual = F.linear(act_quant_value(x), weight_quant_value(lin.weight), lin.bias)
    assert torch.equal(layer(x), manual)


def test_bitlinear_gradients_flow_through_ste() -> None:
    layer = BitLinear(64, 16, bias=False)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    wq = weight_quant_value(layer.weight)
    torch.testing.assert_close(x.grad, wq.sum(0).expand_as(x))  # grad_x uses the quantized weight
    torch.testing.assert_close(layer.weight.grad, act_quant_value(x).sum(0).expand_as(layer.weight))


def test_bitlinear_lambda_zero_is_full_precision() -> None:
    lin = nn.Linear(64, 32)
    layer = BitLinear.from_linear(lin)
    layer.quant_lambda = 0.0
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)


def test_subln_is_rmsnorm() -> None:
    norm = SubLN(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x), ref_rmsnorm(x, norm.weight, 1e-6))


def test_bitlinear_with_subnorm_normalizes_input_first() -> None:
    layer = BitLinear(64, 32, bias=False, sub_norm=True, norm_eps=1e-5)
    x = torch.randn(2, 64) * 10
    h = ref_rmsnorm(x, layer.sub_norm.weight, 1e-5)
    torch.testing.assert_close(layer(x), F.linear(act_quant_value(h), weight_quant_value(layer.weight)))


def test_ternary_weight_export() -> None:
    layer = BitLinear(64, 32)
    tw = layer.ternary_weight()
    assert tw.codes.dtype == torch.int8 and tw.codes.shape == (32, 64)
    assert set(tw.codes.unique().tolist()) <= {-1, 0, 1}
    assert tw.scale == pytest.approx(layer.weight.abs().mean().item())
    torch.testing.assert_close(tw.dequantize(), weight_quant_value(layer.weight))


def test_lrc_adds_low_rank_term_on_unquantized_input() -> None:
    base = BitLinear(64, 32, bias=True, sub_norm=True)
    lrc = BitLinearLRC.from_bitlinear(base, rank=4)
    x = torch.randn(3, 64)
    assert torch.equal(lrc(x), base(x))  # U = 0 at init
    with torch.no_grad():
        lrc.lrc_u.normal_()
    h = lrc.sub_norm(x)
    torch.testing.assert_close(lrc(x), base(x) + h @ lrc.lrc_v @ lrc.lrc_u.t())
    with pytest.raises(ValueError, match="rank"):
        BitLinearLRC(64, 32, rank=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("subln", ["standard", "all", "none"])
def test_convert_each_architecture(arch: str, subln: str) -> None:
    model = tiny_model(arch)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    convert_to_bitnet(model, BitNetConfig(subln=subln))
    converted = dict(bit_linears(model))
    names = {n.rsplit(".", 1)[-1] for n in converted}
    assert names == LINEARS
    assert len(converted) == len(LINEARS) * TINY["num_hidden_layers"]
    assert type(model.get_output_embeddings()) is nn.Linear and model.get_output_embeddings() is head
    assert model.get_input_embeddings() is emb
    for name, layer in converted.items():
        leaf = name.rsplit(".", 1)[-1]
        want_norm = subln == "all" or (subln == "standard" and leaf in {"o_proj", "down_proj"})
        assert (layer.sub_norm is not None) == want_norm, name
        assert layer.quant_lambda == 1.0
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "qwen3":
        assert isinstance(model.model.layers[0].self_attn.q_norm, nn.Module)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(layer.weight.grad is not None for layer in converted.values())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_conversion_keeps_teacher_function_at_lambda_zero(arch: str) -> None:
    teacher = tiny_model(arch)
    student = tiny_model(arch)
    convert_to_bitnet(student, BitNetConfig(subln="none", quant_lambda=0.0))
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
        set_quant_lambda(student, 1.0)
        diff = (student(input_ids=ids).logits - teacher(input_ids=ids).logits).abs().max()
    assert diff > 1e-3  # quantization really changes the function


def test_unsupported_architecture_names_supported_ones() -> None:
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama, mistral, qwen2, qwen3"):
        convert_to_bitnet(model)


def test_double_conversion_and_lrc() -> None:
    model = tiny_model("llama")
    convert_to_bitnet(model)
    with pytest.raises(ValueError, match="already"):
        convert_to_bitnet(model)
    add_lrc(model, 8)
    assert all(isinstance(m, BitLinearLRC) for _, m in bit_linears(model))
    assert model.bitnet_config.lrc_rank == 8
