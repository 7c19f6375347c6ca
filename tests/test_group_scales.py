"""Per-group weight scales and their rules (absmean, MSE-optimal, learned with LSQ's gradient) against references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bitnet.convert import BitNetConfig, add_lrc, convert_to_bitnet
from bitnet.layers import BitLinear, bit_linears
from bitnet.quant import act_quant_value, group_weight_quant, lsq_weight_quant, rule_scales
from bitnet.student import load_student, save_student
from bitnet.trainer import optimizer_groups
from kernels.quant import SCALE_MIN, expand_scales, fp16_grid, grouped_codes, mse_scales

RULES = [("tensor", "absmean"), ("group", "absmean"), ("tensor", "mse"), ("group", "mse"), ("tensor", "learned"),
         ("group", "learned")]


def _mse_brute(w: np.ndarray) -> float:
    """The best scale of one group by exhaustive search over all 3^n ternary codes (optimal scale per code)."""
    best, best_s = np.inf, 0.0
    for c in itertools.product((-1.0, 0.0, 1.0), repeat=len(w)):
        c = np.array(c)
        k = np.abs(c).sum()
        s = float(c @ w / k) if k else 0.0
        if s <= 0:
            continue
        err = float(((w - s * c) ** 2).sum())
        if err < best - 1e-12:
            best, best_s = err, s
    return best_s


def test_mse_scales_match_exhaustive_search() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 14, generator=g)  # groups of 7 values: 3^7 codes each
    got = mse_scales(w, 7)
    for r in range(6):
        for j in range(2):
            assert got[r, j].item() == pytest.approx(_mse_brute(w[r, 7 * j: 7 * j + 7].double().numpy()), rel=1e-5)


def test_group_absmean_and_codes_per_group() -> None:
    w = torch.tensor([[0.1, -0.2, 0.3, 0.4, 1.0, -2.0, 0.0, 3.0]])
    s = rule_scales(w, 4, "absmean")
    assert torch.equal(s, fp16_grid(torch.tensor([[0.25, 1.5]])))
    codes = grouped_codes(w, s, 4)
    assert codes.tolist() == [[0, -1, 1, 1, 1, -1, 0, 1]]  # round(1.6) = 2 and round(2.0) = 2 are clipped to 1
    with pytest.raises(ValueError, match="do not cover rows of 8"):
        grouped_codes(w, s, 3)
    with pytest.raises(ValueError, match="does not divide a row of 8"):
        rule_scales(w, 3, "mse")


def test_fp16_grid_is_representable_and_floored() -> None:
    s = torch.tensor([1e-9, 0.1234567, 3.3])
    q = fp16_grid(s)
    assert torch.equal(q, q.half().float()) and q[0].item() == SCALE_MIN


def test_recomputed_rules_are_ste() -> None:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(4, 64, generator=g) * 0.05).requires_grad_()
    q = group_weight_quant(w, 32, "mse")
    s = rule_scales(w, 32, "mse")
    assert torch.equal(q.detach(), grouped_codes(w, s, 32).float() * expand_scales(s, 32, w.shape))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_lsq_forward_exact_and_gradient_is_lsq() -> None:
    """Forward: fp16(s)·RoundClip(w/fp16(s)). Backward (LSQ): ∂q/∂w = 1[|w/s| ≤ 1], ∂q/∂s = c − (w/s)·1[|w/s| ≤ 1]."""
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(3, 64, generator=g) * 0.05).requires_grad_()
    s0 = fp16_grid(mse_scales(w, 32))
    scales = s0.clone().requires_grad_()
    q = lsq_weight_quant(w, scales, 32)
    se = expand_scales(s0, 32, w.shape)
    codes = torch.clamp(torch.round(w.detach() / se), -1, 1)
    assert torch.equal(q.detach(), se * codes)
    upstream = torch.randn(w.shape, generator=g)
    (q * upstream).sum().backward()
    r = w.detach() / se
    inside = (r.abs() <= 1).float()
    torch.testing.assert_close(w.grad, upstream * inside)  # rounding: a product of two float32 values, rtol 1e-6
    ds = (upstream * (codes - r * inside)).reshape(3, 2, 32).sum(-1)
    torch.testing.assert_close(scales.grad, ds, rtol=1e-5, atol=1e-6)  # a 32-term float32 sum: |err| ≲ 32·eps·Σ|·|


def _model(hidden: int = 64, ffn: int = 96) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize(("scale", "rule"), RULES)
def test_layer_exports_what_it_computes_and_round_trips(scale: str, rule: str, tmp_path) -> None:
    model = convert_to_bitnet(_model(), BitNetConfig(weight_scale=scale, scale_rule=rule, group_size=64,
                                                     fallback_group_size=32))
    for _, layer in bit_linears(model):
        assert layer.scale_group == (0 if scale == "tensor" else (64 if layer.in_features % 64 == 0 else 32))
        assert (layer.weight_scales is not None) == (rule == "learned")
        tw = layer.ternary_weight()
        assert torch.equal(tw.dequantize(), layer.quantized_weight().detach())
        x = torch.randn(2, 5, layer.in_features)
        ref = torch.nn.functional.linear(act_quant_value(layer.normed_input(x)), tw.dequantize())
        assert torch.equal(layer(x), ref)  # the same float32 operations on the same values
    ids = torch.randint(0, 100, (2, 8))
    save_student(model, tmp_path / "s")
    again = load_student(tmp_path / "s")
    assert torch.equal(again(ids).logits, model(ids).logits)
    lrc = add_lrc(again, 4)
    assert all(m.scale_group == o.scale_group and m.scale_rule == rule for (_, m), (_, o) in
               zip(bit_linears(lrc), bit_linears(model), strict=True))


def test_group_that_divides_no_row_is_refused_before_anything_changes() -> None:
    model = _model()
    with pytest.raises(ValueError, match="divides a row of 64") as info:
        convert_to_bitnet(model, BitNetConfig(weight_scale="group", group_size=256, fallback_group_size=96))
    assert "\n" not in str(info.value)
    assert not bit_linears(model) and getattr(model, "bitnet_config", None) is None


def test_learned_scales_train_without_weight_decay() -> None:
    model = convert_to_bitnet(_model(), BitNetConfig(weight_scale="group", scale_rule="learned", group_size=32))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight_scales")}
    groups = optimizer_groups(model, 0.5)
    decays = {id(p): gr["weight_decay"] for gr in groups for p in gr["params"]}
    layer: BitLinear = bit_linears(model)[0][1]
    assert decays[id(layer.weight_scales)] == 0.0 and decays[id(layer.weight)] == 0.5
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), v) for n, v in before.items())
