"""The quantizer formulas of BitNet b1.58 (arXiv 2402.17764) as plain tensor functions, without gradient.

Weights: per-tensor absmean scale ``Δ = mean|W|`` and codes ``RoundClip(W / (Δ + ε), -1, 1)``.
Activations: per-token absmax, ``s = 127 / max|x|``, ``xq = RoundClip(x·s, -128, 127) / s``.

This is the lowest layer: the kernels (packing, reference, Triton) compute against these values, and
:mod:`bitnet.quant` re-exports them and adds the straight-through estimator and the λ warm-up used in training.
"""

from __future__ import annotations

import torch

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5
ACT_QMAX = 127
ACT_QMIN = -128

__all__ = [
    "ACT_EPS",
    "ACT_QMAX",
    "ACT_QMIN",
    "WEIGHT_EPS",
    "act_quant_value",
    "ternary_codes",
    "weight_quant_value",
    "weight_scale",
]


@torch.no_grad()
def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor absmean scale Δ = mean|W| (float32 scalar tensor)."""
    return w.detach().float().abs().mean()


@torch.no_grad()
def ternary_codes(w: torch.Tensor, eps: float = WEIGHT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes in {-1, 0, 1} (int8) and the absmean scale Δ such that ``W ≈ Δ·codes``."""
    delta = weight_scale(w)
    codes = torch.clamp(torch.round(w.detach().float() / (delta + eps)), -1, 1).to(torch.int8)
    return codes, delta


def weight_quant_value(w: torch.Tensor, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Dequantized ternary weight ``Δ·codes`` in ``w``'s dtype, without gradient."""
    codes, delta = ternary_codes(w, eps)
    return (codes.float() * delta).to(w.dtype)


@torch.no_grad()
def act_quant_value(x: torch.Tensor, eps: float = ACT_EPS) -> torch.Tensor:
    """Per-token (last dim) int8 absmax fake quantization, without gradient."""
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    scale = ACT_QMAX / amax
    q = torch.clamp(torch.round(xf * scale), ACT_QMIN, ACT_QMAX) / scale
    return q.to(x.dtype)
