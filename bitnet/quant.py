"""Ternary weight and int8 activation quantizers (BitNet b1.58, arXiv 2402.17764).

Weights: per-tensor absmean scale ``Δ = mean|W|`` and codes ``RoundClip(W / (Δ + ε), -1, 1)``.
Activations: per-token absmax, ``s = 127 / max|x|``, ``xq = RoundClip(x·s, -128, 127) / s``.

Every quantizer used in training returns a straight-through estimate: the forward value is exactly the
quantized tensor, the backward pass is the identity (``q.detach() + x - x.detach()``: in the forward
``x - x.detach()`` is exactly zero, so no rounding error from ``x + (q - x)`` creeps in).

The warm-up blend of BitDistill stage 2 is ``x + λ·(q(x) - x).detach()``; at λ = 1 it is the plain STE.
"""

from __future__ import annotations

import torch

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5
ACT_QMAX = 127
ACT_QMIN = -128


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value ``q`` exactly, gradient of the identity with respect to ``x``."""
    return q.detach() + (x - x.detach())


def blend(x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """Gradual quantization warm-up ``x + λ·(q - x).detach()`` with λ ∈ [0, 1]."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"quantization lambda must lie in [0, 1], got {lam}")
    if lam == 1.0:
        return ste(x, q)
    if lam == 0.0:
        return x
    return x + lam * (q - x).detach()


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


def weight_quant(w: torch.Tensor, lam: float = 1.0, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Ternary fake-quantized weight with STE (blended by λ during warm-up)."""
    return blend(w, weight_quant_value(w, eps), lam)


@torch.no_grad()
def act_quant_value(x: torch.Tensor, eps: float = ACT_EPS) -> torch.Tensor:
    """Per-token (last dim) int8 absmax fake quantization, without gradient."""
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    scale = ACT_QMAX / amax
    q = torch.clamp(torch.round(xf * scale), ACT_QMIN, ACT_QMAX) / scale
    return q.to(x.dtype)


def act_quant(x: torch.Tensor, lam: float = 1.0, eps: float = ACT_EPS) -> torch.Tensor:
    """Per-token int8 fake-quantized activations with STE (blended by λ during warm-up)."""
    return blend(x, act_quant_value(x, eps), lam)
