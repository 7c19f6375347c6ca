"""BitNet layers: ``BitLinear``, ``SubLN`` and ``BitLinearLRC``.

``BitLinear`` is a drop-in ``nn.Linear`` that keeps the full-precision latent weight and computes
``F.linear(act_quant(norm(x)), weight_quant(W), bias)``. ``norm`` is an optional SubLN (RMSNorm) on the
layer's input: BitDistill's SubLN before ``o_proj`` and ``down_proj`` lives here, so the state-dict names of
the original linear (``o_proj.weight``) are unchanged and the norm appears as ``o_proj.sub_norm.weight``.

During the warm-up of continued pre-training, ``quant_lambda`` (λ) blends full precision and quantized
values: ``w + λ·(q(w) - w).detach()`` for weights and activations alike.

The weight scale is per tensor (``scale_group = 0``, BitNet) or per group of ``scale_group`` values of a row, by a
rule (:data:`bitnet.quant.ScaleRule`): ``absmean`` and ``mse`` are recomputed from the latent weight every forward;
``learned`` scales are a parameter, ``weight_scales`` (out, groups), in the state dict next to ``weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitnet.quant import (
    ScaleRule,
    act_quant,
    group_weight_quant,
    lsq_weight_quant,
    rule_scales,
    ternary_codes,
    weight_quant,
)
from kernels.dispatch import scaled_ternary_linear, triton_takes_scales
from kernels.dispatch import ternary_linear as kernel_linear  # PyTorch autograd.Function, Triton on CUDA
from kernels.quant import expand_scales, fp16_grid, grouped_codes, mse_scales


class SubLN(nn.RMSNorm):
    """RMSNorm used as BitNet's sub-layer norm (computed in float32, cast back to the input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(dtype)


@dataclass(frozen=True)
class TernaryWeight:
    """What an exporter needs of a BitLinear: codes in {-1, 0, 1} and their scales, one per tensor (``group = 0``,
    ``scales`` of shape (1, 1)) or one per group of ``group`` consecutive values of a row (out, in // group)."""

    codes: torch.Tensor  # int8, shape (out_features, in_features)
    scales: torch.Tensor  # float32
    group: int = 0

    @property
    def scale(self) -> float:
        """The per-tensor scale Δ (only for ``group = 0``)."""
        if self.group:
            raise ValueError(f"this matrix has one scale per group of {self.group}, not one per tensor")
        return float(self.scales.reshape(()))

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * expand_scales(self.scales.float(), self.group, self.codes.shape)


class BitLinear(nn.Linear):
    """Linear layer with absmean ternary weights and per-token int8 activations (STE in training)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sub_norm: bool = False,
        norm_eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.sub_norm: SubLN | None = SubLN(in_features, eps=norm_eps) if sub_norm else None
        if self.sub_norm is not None and (device is not None or dtype is not None):
            self.sub_norm.to(device=device, dtype=dtype)
        self.quant_lambda: float = 1.0
        self.scale_group: int = 0
        self.scale_rule: ScaleRule = "absmean"
        self.weight_scales: nn.Parameter | None = None

    def configure_scales(self, group: int, rule: ScaleRule, scales: torch.Tensor | None = None) -> None:
        """Per-tensor (``group = 0``) or per-group scales by ``rule``; ``learned`` scales start from ``scales`` or
        else from the MSE-optimal scales of the current weight (so the codes stay what ``mse`` would give)."""
        if group and (group < 0 or self.in_features % group):
            raise ValueError(f"a scale group of {group} does not divide the {self.in_features}-value rows of a "
                             f"{self.out_features}×{self.in_features} matrix")
        self.scale_group, self.scale_rule = int(group), rule
        if rule != "learned":
            self.weight_scales = None
            return
        init = scales if scales is not None else mse_scales(self.weight, group)
        groups = (self.out_features, self.in_features // group) if group else (1, 1)
        if tuple(init.shape) != groups:
            raise ValueError(f"learned scales of shape {tuple(init.shape)} do not fit {groups}")
        self.weight_scales = nn.Parameter(fp16_grid(init.detach()).to(self.weight.device),
                                          requires_grad=self.weight.requires_grad)

    def current_scales(self) -> torch.Tensor:
        """The scales the forward uses now (fp16 grid, float32, no gradient): (out, groups) or (1, 1)."""
        if self.weight_scales is not None:
            return fp16_grid(self.weight_scales.detach())
        if self.scale_group == 0 and self.scale_rule == "absmean":
            return ternary_codes(self.weight)[1].reshape(1, 1)
        return rule_scales(self.weight, self.scale_group, self.scale_rule)

    def quantized_weight(self, lam: float = 1.0) -> torch.Tensor:
        """The fake-quantized weight with its straight-through (and, for learned scales, LSQ) gradient."""
        if self.weight_scales is not None:
            return lsq_weight_quant(self.weight, self.weight_scales, self.scale_group, lam)
        if self.scale_group == 0 and self.scale_rule == "absmean":
            return weight_quant(self.weight, lam)
        return group_weight_quant(self.weight, self.scale_group, self.scale_rule, lam)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, sub_norm: bool = False, norm_eps: float = 1e-6) -> BitLinear:
        """A BitLinear sharing nothing with ``linear`` but holding a copy of its weight and bias."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            sub_norm=sub_norm,
            norm_eps=norm_eps,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.weight.requires_grad_(linear.weight.requires_grad)
        return layer

    def normed_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub_norm(x) if self.sub_norm is not None else x

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ternary path on an already normalized input."""
        lam = self.quant_lambda
        if lam == 1.0 and self.scale_group == 0 and self.scale_rule == "absmean":
            return kernel_linear(x, self.weight, self.bias)  # bit-identical on the PyTorch path (kernels/reference.py)
        if lam == 1.0 and triton_takes_scales(x.device, self.scale_group):  # CUDA (or the interpreter) only
            learned = self.weight_scales is not None
            scales = self.weight_scales if learned else self.current_scales()
            return scaled_ternary_linear(x, self.weight, scales, self.scale_group, self.bias, learned=learned)
        return F.linear(act_quant(x, lam), self.quantized_weight(lam), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_forward(self.normed_input(x))

    @torch.no_grad()
    def ternary_weight(self) -> TernaryWeight:
        """The codes and scales the forward at λ = 1 uses (exactly: ``dequantize()`` is its weight)."""
        if self.scale_group == 0 and self.scale_rule == "absmean":
            codes, delta = ternary_codes(self.weight)
            return TernaryWeight(codes=codes, scales=delta.reshape(1, 1))
        scales = self.current_scales()
        return TernaryWeight(codes=grouped_codes(self.weight, scales, self.scale_group), scales=scales,
                             group=self.scale_group)

    def extra_repr(self) -> str:
        scales = f", scale_group={self.scale_group}, scale_rule={self.scale_rule}" if self.scale_group or \
            self.scale_rule != "absmean" else ""
        return (f"{super().extra_repr()}, sub_norm={self.sub_norm is not None}, quant_lambda={self.quant_lambda}"
                f"{scales}")


class BitLinearLRC(BitLinear):
    """BitLinear plus a full-precision low-rank correction on the unquantized input (LRC, arXiv 2412.07902).

    ``y = Wq·Q(x) + U·(Vᵀ·x)`` where ``x`` is the (sub-normed) input before activation quantization,
    ``U`` is (out_features, rank) and ``V`` is (in_features, rank). ``U`` starts at zero so a fresh
    adapter leaves the layer's output unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        if rank <= 0 or rank > min(in_features, out_features):
            raise ValueError(f"LRC rank must be in [1, {min(in_features, out_features)}], got {rank}")
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.rank = rank
        self.lrc_u = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.lrc_v = nn.Parameter(torch.empty(in_features, rank, **factory))
        nn.init.normal_(self.lrc_v, std=1.0 / math.sqrt(in_features))

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, rank: int) -> BitLinearLRC:
        new = cls(
            layer.in_features,
            layer.out_features,
            rank,
            bias=layer.bias is not None,
            sub_norm=layer.sub_norm is not None,
            norm_eps=layer.sub_norm.eps if layer.sub_norm is not None else 1e-6,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        new.configure_scales(layer.scale_group, layer.scale_rule, layer.weight_scales)
        new.load_state_dict(layer.state_dict(), strict=False)
        new.quant_lambda = layer.quant_lambda
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.normed_input(x)
        return self.quantized_forward(h) + F.linear(F.linear(h, self.lrc_v.t()), self.lrc_u)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def bit_linears(model: nn.Module) -> list[tuple[str, BitLinear]]:
    """All BitLinear modules of ``model`` with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]


def set_quant_lambda(model: nn.Module, lam: float) -> None:
    """Set the warm-up λ of every BitLinear in ``model``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"quantization lambda must lie in [0, 1], got {lam}")
    for _, layer in bit_linears(model):
        layer.quant_lambda = float(lam)
