"""PyTorch reference of BitLinear's λ = 1 math: act-quant + ternary matmul with the STE as one autograd.Function.

Forward ``y = F.linear(Q(x), Wq, b)`` with ``Q`` the per-token int8 absmax fake quantizer and ``Wq = Δ·codes``
the absmean ternary weight of :mod:`kernels.quant`. Backward through the straight-through estimator:
``grad_x = grad_y @ Wq``, ``grad_W = grad_yᵀ @ Q(x)``, ``grad_b = Σ grad_y``.

Every value is bit-identical to ``F.linear(act_quant(x), weight_quant(W), b)`` of :mod:`bitnet.quant`, forward
and backward (the tests assert it): the same float32 operations in the same order, only with fewer passes over
memory (rounding, clamping and scaling in place) and no STE arithmetic in the autograd graph.
Under autocast the operands are cast to the autocast dtype exactly as autocast would cast them for ``linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels.quant import ACT_EPS, ACT_QMAX, ACT_QMIN, WEIGHT_EPS, act_quant_value, weight_quant_value

__all__ = [
    "act_quant_codes",
    "fast_act_quant_value",
    "fast_weight_quant_value",
    "reference_linear",
    "ternary_linear_torch",
    "TernaryLinearFunction",
]


def _absmax(xf: torch.Tensor) -> torch.Tensor:
    """``xf.abs().amax(-1, keepdim=True)`` without the ``abs`` temporary (max is exact; signed zeros and NaN
    are absorbed by the eps clamp / propagated alike)."""
    return torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg_())


@torch.no_grad()
def act_quant_codes(x: torch.Tensor, eps: float = ACT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes and float32 scales ``s = 127 / max|x|`` (shape ``x.shape[:-1] + (1,)``)."""
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=eps)
    scale = ACT_QMAX / amax
    q = (xf * scale).round_().clamp_(ACT_QMIN, ACT_QMAX)
    return q.to(torch.int8), scale


@torch.no_grad()
def fast_act_quant_value(x: torch.Tensor, eps: float = ACT_EPS) -> torch.Tensor:
    """Bit-identical to :func:`kernels.quant.act_quant_value` with fewer temporaries."""
    xf = x.detach().float()
    amax = _absmax(xf).clamp_(min=eps)
    scale = ACT_QMAX / amax
    # no clamp: |x·s| ≤ 127·(1 + 2⁻²²) rounds into [-127, 127], so bitnet's clamp to [-128, 127] never acts
    return (xf * scale).round_().div_(scale).to(x.dtype)


@torch.no_grad()
def fast_weight_quant_value(w: torch.Tensor, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Bit-identical to :func:`kernels.quant.weight_quant_value` with fewer temporaries."""
    wf = w.detach().float()
    delta = wf.abs().mean()
    return (wf / (delta + eps)).round_().clamp_(-1, 1).mul_(delta).to(w.dtype)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain formula (no gradient through the quantizers' values): ``F.linear(Q(x), Wq, b)``."""
    return F.linear(act_quant_value(x), weight_quant_value(weight), bias)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


class TernaryLinearFunction(torch.autograd.Function):
    """``F.linear(act_quant(x), weight_quant(W), b)`` at λ = 1 with the STE written as a custom backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xq = fast_act_quant_value(x)
        wq = fast_weight_quant_value(weight)
        cast_to = _autocast_dtype(x.device.type)
        xq, wq, b = _cast(xq, cast_to), _cast(wq, cast_to), _cast(bias, cast_to)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xq, wq, b)
        ctx.save_for_backward(xq if ctx.needs_input_grad[1] else None, wq if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xq, wq = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(wq)
        if ctx.needs_input_grad[1]:
            g2 = grad_y.reshape(-1, grad_y.shape[-1])
            grad_w = g2.t().mm(xq.reshape(-1, xq.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def ternary_linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """BitLinear's quantized forward at λ = 1 through :class:`TernaryLinearFunction`."""
    return TernaryLinearFunction.apply(x, weight, bias)
