"""The packed ternary matmul's PyTorch path: ``F.linear(act_quant(x), Δ·codes, b)`` from 2-bit packed weights.

It dequantizes a slice of output rows at a time (one ``F.embedding`` gather through a 256-entry byte table) so no
more than ``chunk_bytes`` of dequantized weights exist at once. The module that uses it is
``bitnet.packed.PackedBitLinear``; on CUDA with Triton ``kernels.dispatch.packed_linear`` picks the Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packing import PackedTernary, byte_lut, packed_cols
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
    lut = byte_lut(weight.scale, dtype, x.device)
    n, k = weight.out_features, weight.in_features
    row_bytes = packed_cols(k) * 4 * lut.element_size()
    rows = max(1, min(n, chunk_bytes // row_bytes))
    if rows >= n:
        w = F.embedding(weight.packed.int(), lut).reshape(n, -1)[:, :k]
        return F.linear(xq, w, bias)
    out = torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = F.embedding(weight.packed[r0:r1].int(), lut).reshape(r1 - r0, -1)[:, :k]
        out[..., r0:r1] = F.linear(xq, w, bias[r0:r1] if bias is not None else None)
    return out
