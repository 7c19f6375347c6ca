"""Ternary weight and int8 activation quantizers (BitNet b1.58, arXiv 2402.17764), as trained.

The formulas themselves (absmean ternary weights, per-token int8 absmax activations, their constants) live in
:mod:`kernels.quant`, the layer below, and are re-exported here; this module adds what training needs on top.

Every quantizer used in training returns a straight-through estimate: the forward value is exactly the
quantized tensor, the backward pass is the identity (``q.detach() + x - x.detach()``: in the forward
``x - x.detach()`` is exactly zero, so no rounding error from ``x + (q - x)`` creeps in).

The warm-up blend of BitDistill stage 2 is ``x + λ·(q(x) - x).detach()``; at λ = 1 it is the plain STE.

Scale rules (:data:`ScaleRule`) for per-tensor or per-group weight scales (``group = 0`` is the whole tensor):
``absmean`` (BitNet's ``mean|W|``, recomputed every forward), ``mse`` (the MSE-optimal ternary scale of each group,
recomputed every forward) and ``learned`` (a stored scale, trained with LSQ's gradient, arXiv 1902.08153 as ParetoQ
uses it, arXiv 2502.02631: ``∂(s·v)/∂s = v − (w/s)·1[|w/s| ≤ 1]``, and ``w`` gets the identity inside the clip
range). All three quantize the scale to fp16, the GGUF block scale, so that the export is exact.
"""

from __future__ import annotations

from typing import Literal

import torch

from kernels.quant import (
    ACT_EPS,
    ACT_QMAX,
    ACT_QMIN,
    SCALE_MIN,
    WEIGHT_EPS,
    act_quant_value,
    expand_scales,
    fp16_grid,
    group_absmean,
    grouped,
    grouped_codes,
    mse_scales,
    ternary_codes,
    weight_quant_value,
    weight_scale,
)

ScaleRule = Literal["absmean", "mse", "learned"]

__all__ = [
    "ACT_EPS",
    "ACT_QMAX",
    "ACT_QMIN",
    "WEIGHT_EPS",
    "act_quant",
    "SCALE_MIN",
    "ScaleRule",
    "act_quant_value",
    "blend",
    "expand_scales",
    "fp16_grid",
    "group_absmean",
    "group_weight_quant",
    "grouped",
    "grouped_codes",
    "lsq_weight_quant",
    "mse_scales",
    "rule_scales",
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


@torch.no_grad()
def rule_scales(w: torch.Tensor, group: int, rule: ScaleRule) -> torch.Tensor:
    """Per-group scales of ``w`` by a recomputed rule (``absmean`` or ``mse``), on the fp16 grid: (out, groups)."""
    if rule == "absmean":
        return fp16_grid(group_absmean(w, group))
    if rule == "mse":
        return fp16_grid(mse_scales(w, group))
    raise ValueError(f"scale rule {rule!r} is not recomputed from the weight (learned scales are stored)")


def group_weight_quant(w: torch.Tensor, group: int, rule: ScaleRule, lam: float = 1.0) -> torch.Tensor:
    """Ternary fake-quantized weight with recomputed per-group scales, STE (blended by λ)."""
    s = rule_scales(w, group, rule)
    q = (grouped_codes(w, s, group).to(torch.float32) * expand_scales(s, group, w.shape)).to(w.dtype)
    return blend(w, q, lam)


def lsq_weight_quant(w: torch.Tensor, scales: torch.Tensor, group: int, lam: float = 1.0) -> torch.Tensor:
    """Ternary fake-quantized weight with learned per-group ``scales`` (LSQ gradient to both; module docstring).

    The forward value is exactly ``fp16(s)·RoundClip(w / fp16(s), -1, 1)``; at λ < 1 it is blended with ``w``
    (``w + λ·(q − w)``, not detached, so the scales keep learning through the warm-up)."""
    s = expand_scales(ste(scales, fp16_grid(scales)), group, w.shape)
    r = w.float() / s
    with torch.no_grad():
        codes = torch.clamp(torch.round(r), -1, 1)
        inside = (r.abs() <= 1.0).to(r.dtype)
    q = (s * (codes + (r - r.detach()) * inside)).to(w.dtype)
    if lam == 1.0:
        return q
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"quantization lambda must lie in [0, 1], got {lam}")
    return w + lam * (q - w)
