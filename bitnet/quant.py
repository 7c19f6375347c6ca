"""Ternary weight and int8 activation quantizers (BitNet b1.58, arXiv 2402.17764), as trained.

The formulas themselves (absmean ternary weights, per-token int8 absmax activations, their constants) live in
:mod:`kernels.quant`, the layer below, and are re-exported here; this module adds what training needs on top.

Every quantizer used in training returns a straight-through estimate: the forward value is exactly the
quantized tensor, the backward pass is the identity (``q.detach() + x - x.detach()``: in the forward
``x - x.detach()`` is exactly zero, so no rounding error from ``x + (q - x)`` creeps in).

The warm-up blend of BitDistill stage 2 is ``x + λ·(q(x) - x).detach()``; at λ = 1 it is the plain STE.
"""

from __future__ import annotations

import torch

from kernels.quant import (
    ACT_EPS,
    ACT_QMAX,
    ACT_QMIN,
    WEIGHT_EPS,
    act_quant_value,
    ternary_codes,
    weight_quant_value,
    weight_scale,
)

__all__ = [
    "ACT_EPS",
    "ACT_QMAX",
    "ACT_QMIN",
    "WEIGHT_EPS",
    "act_quant",
    "act_quant_value",
    "blend",
    "ste",
    "ternary_codes",
    "weight_quant",
    "weight_quant_value",
    "weight_scale",
]


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


def weight_quant(w: torch.Tensor, lam: float = 1.0, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Ternary fake-quantized weight with STE (blended by λ during warm-up)."""
    return blend(w, weight_quant_value(w, eps), lam)


def act_quant(x: torch.Tensor, lam: float = 1.0, eps: float = ACT_EPS) -> torch.Tensor:
    """Per-token int8 fake-quantized activations with STE (blended by λ during warm-up)."""
    return blend(x, act_quant_value(x, eps), lam)
