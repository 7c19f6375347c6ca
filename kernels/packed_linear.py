"""The packed ternary matmul's PyTorch path: ``F.linear(act_quant(x), Δ·codes, b)`` from 2-bit packed weights (Δ
per tensor or per group of a row).

It dequantizes a slice of output rows at a time (one ``F.embedding`` gather through a 256-entry byte table) so no
more than ``chunk_bytes`` of dequantized weights exist at once. The module that uses it is
``bitnet.packed.PackedBitLinear``; on CUDA with Triton ``kernels.dispatch.packed_linear`` picks the Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packing import PackedTernary, byte_lut, packed_cols
from kernels.quant import expand_scales
from kernels.reference import fast_act_quant_value

DEFAULT_CHUNK_BYTES = 8 << 20


def packed_linear_torch(
    x: torch.Tensor,
    weight: PackedTernary,
    bias: torch.Tensor | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """``F.linear(act_quant(x), Δ·codes, b)`` from packed weights, dequantizing ``chunk_bytes`` of rows at a time."""
    xq = fast_act_quant_value(x)
    dtype = x.dtype
    group = weight.group
    # per group: the codes as float32 through the table, then each group's scale (BitLinear's (c·s).to(dtype))
    lut = byte_lut(1.0 if group else weight.scale, torch.float32 if group else dtype, x.device)
    n, k = weight.out_features, weight.in_features
    row_bytes = packed_cols(k) * 4 * lut.element_size()
    rows = max(1, min(n, chunk_bytes // row_bytes))

    def rows_of(r0: int, r1: int) -> torch.Tensor:
        w = F.embedding(weight.packed[r0:r1].int(), lut).reshape(r1 - r0, -1)[:, :k]
        return (w * expand_scales(weight.scale[r0:r1], group, w.shape)).to(dtype) if group else w

    if rows >= n:
        return F.linear(xq, rows_of(0, n), bias)
    out = torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out[..., r0:r1] = F.linear(xq, rows_of(r0, r1), bias[r0:r1] if bias is not None else None)
    return out
