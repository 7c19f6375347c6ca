"""Inference BitLinear that keeps only 2-bit packed ternary weights (+ scales, bias, SubLN) in memory.

``PackedBitLinear.from_bitlinear(layer)`` computes exactly what ``layer`` computes at λ = 1
(``F.linear(act_quant(sub_norm(x)), s·codes, b)``, ``s`` the per-tensor Δ or the layer's per-group scales, as the
GGUF holds them) from ``out·ceil(in/4)`` bytes of weights instead of the latent float matrix — 8× less than fp16,
16× less than fp32 (plus 4 bytes a group for per-group scales). The matmul is ``kernels.dispatch.packed_linear``
(Triton on CUDA, ``kernels.packed_linear.packed_linear_torch`` elsewhere).

``pack_bitlinears(model)`` swaps every BitLinear of a student for a PackedBitLinear (inference only: no
gradients, no LRC — a BitLinearLRC is refused).
"""

from __future__ import annotations

import torch
from torch import nn

from bitnet.layers import BitLinear, BitLinearLRC, SubLN, bit_linears
from kernels.dispatch import packed_linear
from kernels.packed_linear import DEFAULT_CHUNK_BYTES
from kernels.packing import PackedTernary, pack_codes, pack_weight, packed_cols


class PackedBitLinear(nn.Module):
    """A frozen BitLinear (λ = 1) stored as packed 2-bit codes + Δ; same forward, a fraction of the memory."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sub_norm: bool = False,
        norm_eps: float = 1e-6,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        scale_group: int = 0,
    ) -> None:
        super().__init__()
        if scale_group and in_features % scale_group:
            raise ValueError(f"a scale group of {scale_group} does not divide rows of {in_features} values")
        self.in_features = in_features
        self.out_features = out_features
        self.scale_group = scale_group
        self.chunk_bytes = DEFAULT_CHUNK_BYTES
        zeros = torch.full((out_features, packed_cols(in_features)), 0x55, dtype=torch.uint8, device=device)
        self.register_buffer("packed", zeros)  # 0x55: four zero codes per byte
        scales = (out_features, in_features // scale_group) if scale_group else ()
        self.register_buffer("scale", torch.ones(scales, dtype=torch.float32, device=device))
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.sub_norm: SubLN | None = None
        if sub_norm:
            self.sub_norm = SubLN(in_features, eps=norm_eps).to(device=device, dtype=dtype)
            self.sub_norm.weight.requires_grad_(False)

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> PackedBitLinear:
        if isinstance(layer, BitLinearLRC):
            raise TypeError("PackedBitLinear does not carry an LRC adapter; merge or drop it first")
        if layer.quant_lambda != 1.0:
            raise ValueError(f"only a fully quantized BitLinear (λ = 1) can be packed, got λ = {layer.quant_lambda}")
        w = layer.weight
        new = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            sub_norm=layer.sub_norm is not None,
            norm_eps=layer.sub_norm.eps if layer.sub_norm is not None else 1e-6,
            dtype=w.dtype,
            device=w.device,
            scale_group=layer.scale_group,
        )
        if layer.scale_group == 0 and layer.scale_rule == "absmean":
            pw = pack_weight(w)
        else:  # exactly the codes and scales the layer's forward uses
            t = layer.ternary_weight()
            pw = pack_codes(t.codes, t.scales, t.group)
        new.packed.copy_(pw.packed)
        new.scale.copy_(pw.scale)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        if layer.sub_norm is not None:
            new.sub_norm.load_state_dict(layer.sub_norm.state_dict())
        return new

    def ternary(self) -> PackedTernary:
        return PackedTernary(self.packed, self.scale, self.in_features, self.scale_group)

    def weight_nbytes(self) -> int:
        """Bytes held for the ternary matrix: packed codes + the float32 scale(s)."""
        return self.ternary().nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sub_norm(x) if self.sub_norm is not None else x
        return packed_linear(h, self.ternary(), self.bias, chunk_bytes=self.chunk_bytes)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sub_norm={self.sub_norm is not None}, packed=2-bit"
            + (f", scale_group={self.scale_group}" if self.scale_group else "")
        )


def pack_bitlinears(model: nn.Module) -> nn.Module:
    """Replace every BitLinear of ``model`` by a PackedBitLinear in place (inference); returns ``model``."""
    for name, layer in bit_linears(model):
        if not name:
            raise ValueError("pack_bitlinears replaces children; wrap a bare BitLinear in a module first")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedBitLinear.from_bitlinear(layer))
    return model
