"""BitNet layers: ``BitLinear``, ``SubLN`` and ``BitLinearLRC``.

``BitLinear`` is a drop-in ``nn.Linear`` that keeps the full-precision latent weight and computes
``F.linear(act_quant(norm(x)), weight_quant(W), bias)``. ``norm`` is an optional SubLN (RMSNorm) on the
layer's input: BitDistill's SubLN before ``o_proj`` and ``down_proj`` lives here, so the state-dict names of
the original linear (``o_proj.weight``) are unchanged and the norm appears as ``o_proj.sub_norm.weight``.

During the warm-up of continued pre-training, ``quant_lambda`` (λ) blends full precision and quantized
values: ``w + λ·(q(w) - w).detach()`` for weights and activations alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitnet.quant import act_quant, ternary_codes, weight_quant
from kernels.dispatch import ternary_linear as kernel_linear  # PyTorch autograd.Function, Triton on CUDA


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
    """What an exporter needs of a BitLinear: codes in {-1, 0, 1} and the per-tensor scale Δ."""

    codes: torch.Tensor  # int8, shape (out_features, in_features)
    scale: float

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale


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
        if lam == 1.0:  # bit-identical on the PyTorch path (kernels/reference.py)
            return kernel_linear(x, self.weight, self.bias)
        return F.linear(act_quant(x, lam), weight_quant(self.weight, lam), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_forward(self.normed_input(x))

    def ternary_weight(self) -> TernaryWeight:
        codes, delta = ternary_codes(self.weight)
        return TernaryWeight(codes=codes, scale=float(delta))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sub_norm={self.sub_norm is not None}, quant_lambda={self.quant_lambda}"


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
