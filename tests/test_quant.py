"""Quantizer formulas against a hand-written reference (numpy, element by element)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitnet.quant import act_quant, act_quant_value, blend, ternary_codes, weight_quant, weight_quant_value


def ref_weight_quant(w: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, float]:
    delta = float(np.mean(np.abs(w)))
    codes = np.empty_like(w)
    for idx, v in np.ndenumerate(w):
        r = np.round(v / (delta + eps))  # numpy rounds half to even, as torch.round does
        codes[idx] = min(1.0, max(-1.0, r))
    return codes, delta


def ref_act_quant(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    out = np.empty_like(x)
    for row in np.ndindex(x.shape[:-1]):
        vec = x[row]
        amax = max(float(np.max(np.abs(vec))), eps)
        s = 127.0 / amax
        out[row] = np.clip(np.round(vec * s), -128, 127) / s
    return out


@pytest.mark.parametrize("shape", [(8, 16), (33, 70), (1, 256)])
def test_weight_quant_matches_reference(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    codes, delta = ternary_codes(w)
    ref_codes, ref_delta = ref_weight_quant(w.double().numpy())
    assert codes.dtype == torch.int8
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert delta.item() == pytest.approx(ref_delta, rel=1e-6)
    np.testing.assert_array_equal(codes.numpy(), ref_codes.astype(np.int8))
    np.testing.assert_allclose(weight_quant_value(w).numpy(), ref_codes * ref_delta, rtol=1e-6, atol=1e-8)


def test_weight_quant_all_zero_is_zero() -> None:
    codes, delta = ternary_codes(torch.zeros(4, 4))
    assert delta.item() == 0 and codes.abs().sum() == 0


@pytest.mark.parametrize("shape", [(4, 32), (2, 3, 64)])
def test_act_quant_matches_reference(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3
    q = act_quant_value(x)
    ref = ref_act_quant(x.double().numpy())
    np.testing.assert_allclose(q.numpy(), ref, rtol=1e-5, atol=1e-6)
    # at most 256 levels per token and the max magnitude is preserved
    for row in q.reshape(-1, shape[-1]):
        assert row.unique().numel() <= 256
    torch.testing.assert_close(q.abs().amax(-1), x.abs().amax(-1))


def test_ste_forward_exact_backward_identity() -> None:
    x = torch.randn(5, 64, requires_grad=True)
    y = act_quant(x)
    assert torch.equal(y, act_quant_value(x))  # exactly the quantized value, no x + (q - x) rounding
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    w = torch.randn(16, 64, requires_grad=True)
    wq = weight_quant(w)
    assert torch.equal(wq, weight_quant_value(w))
    (wq * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_blend_is_warmup_formula(lam: float) -> None:
    w = torch.randn(16, 32, requires_grad=True)
    q = weight_quant_value(w)
    out = weight_quant(w, lam)
    torch.testing.assert_close(out, w.detach() + lam * (q - w.detach()), rtol=0, atol=1e-6)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # the blend never blocks the gradient


def test_blend_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="lambda"):
        blend(torch.zeros(1), torch.zeros(1), 1.5)


def test_one_home_for_the_formulas() -> None:
    """bitnet.quant adds the STE and the warm-up; the formulas are kernels.quant's, which the kernels compute with."""
    import bitnet.quant as bq
    import kernels.quant as kq

    for name in kq.__all__:
        assert getattr(bq, name) is getattr(kq, name), name
    w = torch.randn(16, 32, requires_grad=True)
    q = bq.weight_quant(w)
    assert torch.equal(q, kq.weight_quant_value(w))  # the forward value is the kernels' formula exactly
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # the STE: identity gradient
