"""The quantizer formulas of BitNet b1.58 (arXiv 2402.17764) as plain tensor functions, without gradient.

Weights: per-tensor absmean scale ``Δ = mean|W|`` and codes ``RoundClip(W / (Δ + ε), -1, 1)``.
Activations: per-token absmax, ``s = 127 / max|x|``, ``xq = RoundClip(x·s, -128, 127) / s``.

Finer weight scales (arXiv 2502.02631, ParetoQ; the export blocks of llama.cpp): one scale per *group* of ``g``
consecutive values of a row, ``W ≈ s_g · RoundClip(W / s_g, -1, 1)``. A group is the whole tensor when ``g = 0``.
Two rules give ``s_g``: absmean (``mean|W_g|``, BitNet's rule per group) and the MSE-optimal ternary scale
(:func:`mse_scales`, exact: the best ternary of a group keeps its ``k`` largest magnitudes for the ``k`` that
maximises ``(Σ_top-k |w|)² / k`` and scales them by their mean). Scales are rounded to fp16 (:func:`fp16_grid`), the
block scale of the GGUF types, so that an export is exact.

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
    "SCALE_MIN",
    "act_quant_value",
    "expand_scales",
    "fp16_grid",
    "group_absmean",
    "grouped",
    "grouped_codes",
    "mse_scales",
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


# smallest normal fp16: a group scale never goes below it (an all-zero group keeps codes 0 and a valid fp16 scale)
SCALE_MIN = 2.0**-14


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """``w`` (out, in) as float32 groups: (out, in // group, group), or (1, 1, out·in) for ``group = 0``."""
    wf = w.detach().float()
    if group == 0:
        return wf.reshape(1, 1, -1)
    out, n = wf.shape
    if group < 0 or n % group:
        raise ValueError(f"a group of {group} does not divide a row of {n} values")
    return wf.reshape(out, n // group, group)


def expand_scales(scales: torch.Tensor, group: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Per-group scales (out, groups) broadcast to the weight's ``shape`` (a scalar view for ``group = 0``)."""
    if group == 0:
        return scales.reshape(())
    if scales.shape[-1] * group != shape[-1]:
        raise ValueError(f"{scales.shape[-1]} scales per row, one per {group} values, do not cover rows of {shape[-1]}")
    return scales.repeat_interleave(group, dim=1).reshape(shape)


def fp16_grid(s: torch.Tensor) -> torch.Tensor:
    """Scales rounded to the nearest fp16 value (the GGUF block scale), at least :data:`SCALE_MIN`, in float32."""
    return s.float().clamp(min=SCALE_MIN).half().float()


@torch.no_grad()
def group_absmean(w: torch.Tensor, group: int) -> torch.Tensor:
    """BitNet's absmean rule per group: (out, groups) float32 (shape (1, 1) for ``group = 0``)."""
    return grouped(w, group).abs().mean(-1)


@torch.no_grad()
def mse_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """The scale of each group's MSE-optimal ternary approximation: (out, groups) float32, exact.

    For a fixed set of kept weights (``|c| = 1``) the best scale is their mean magnitude, and the error is
    ``Σw² − (Σ_kept |w|)² / k``; for a fixed ``k`` the largest magnitudes are best. So the optimum keeps the ``k``
    largest magnitudes for the ``k`` maximising ``(Σ_top-k |w|)² / k`` (ties → the smallest such ``k``)."""
    a = grouped(w, group).abs()
    top = a.sort(dim=-1, descending=True).values.cumsum_(-1)
    k = torch.arange(1, a.shape[-1] + 1, dtype=top.dtype, device=top.device)
    best = (top.square() / k).argmax(dim=-1, keepdim=True)
    return (top.gather(-1, best) / (best + 1).to(top.dtype)).squeeze(-1)


@torch.no_grad()
def grouped_codes(w: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """Ternary codes (int8, ``w``'s shape) ``RoundClip(w / s_g, -1, 1)`` for per-group ``scales``."""
    s = expand_scales(scales.float().clamp(min=SCALE_MIN), group, w.shape)
    return torch.clamp(torch.round(w.detach().float() / s), -1, 1).to(torch.int8)
