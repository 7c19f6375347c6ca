"""2-bit packing of ternary codes: four codes per byte plus the per-tensor scale Δ, or one scale per group of
``group`` consecutive values of a row.

Layout (row-major over ``(out_features, in_features)``, packed along ``in_features``): code ``c ∈ {-1, 0, 1}``
is stored as ``c + 1 ∈ {0, 1, 2}``; column ``k`` of a row lives in byte ``k // 4`` at bits ``2·(k % 4)``.
A row of ``K`` codes takes ``ceil(K / 4)`` bytes; the padding codes of the last byte are 0 (stored ``0b01``),
so a kernel may read whole bytes without masking the weight. The value ``0b11`` never occurs.

This is *not* llama.cpp's TQ2_0 block layout (the GGUF exporter writes that from the codes); it is the
in-memory layout of :class:`bitnet.packed.PackedBitLinear` and the Triton packed matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.quant import WEIGHT_EPS, expand_scales, ternary_codes

CODES_PER_BYTE = 4
_SHIFTS = (0, 2, 4, 6)


def packed_cols(in_features: int) -> int:
    """Bytes per packed row."""
    return -(-in_features // CODES_PER_BYTE)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes in {-1, 0, 1} of shape ``(..., K)`` into uint8 of shape ``(..., ceil(K / 4))``."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_ternary expects integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) > 1):
        raise ValueError("pack_ternary expects codes in {-1, 0, 1}")
    k = codes.shape[-1]
    pad = packed_cols(k) * CODES_PER_BYTE - k
    u = (codes.to(torch.int16) + 1).to(torch.uint8)
    if pad:
        u = torch.nn.functional.pad(u, (0, pad), value=1)
    u = u.reshape(*codes.shape[:-1], -1, CODES_PER_BYTE)
    packed = u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)
    return packed.contiguous()


def unpack_ternary(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: codes of shape ``(..., in_features)`` in ``dtype``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_ternary expects uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_cols(in_features):
        raise ValueError(f"{packed.shape[-1]} packed bytes per row cannot hold {in_features} codes")
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & 3
    codes = u.reshape(*packed.shape[:-1], -1)[..., :in_features].to(torch.int8) - 1
    return codes.to(dtype)


def byte_lut(scale: torch.Tensor | float, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """``(256, 4)`` table: row ``b`` holds the four dequantized weights ``(code·Δ).to(dtype)`` of byte ``b``.

    ``F.embedding(packed, lut)`` unpacks and dequantizes in one gather; the values equal
    ``(codes.float() * Δ).to(dtype)`` exactly (the bitnet weight value).
    """
    b = torch.arange(256, dtype=torch.int32, device=device)
    codes = torch.stack([((b >> s) & 3) - 1 for s in _SHIFTS], dim=-1)
    delta = torch.as_tensor(scale, dtype=torch.float32, device=device)
    return (codes.float() * delta).to(dtype)


@dataclass(frozen=True)
class PackedTernary:
    """A ternary matrix as packed bytes ``(out_features, ceil(in_features / 4))`` + float32 scales: Δ (0-dim), or
    with ``group`` one per ``group`` values of a row, shape ``(out_features, in_features / group)``."""

    packed: torch.Tensor
    scale: torch.Tensor  # float32: 0-dim, or (out_features, in_features / group)
    in_features: int
    group: int = 0

    def __post_init__(self) -> None:
        want = (self.out_features, self.in_features // self.group) if self.group else ()
        if self.group and self.in_features % self.group or tuple(self.scale.shape) != want:
            how = f"groups of {self.group}" if self.group else "one Δ"
            raise ValueError(f"scales of shape {tuple(self.scale.shape)} do not fit {self.out_features} rows of "
                             f"{self.in_features} values with {how}")

    @property
    def out_features(self) -> int:
        return int(self.packed.shape[0])

    def codes(self) -> torch.Tensor:
        return unpack_ternary(self.packed, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes()
        return (codes.float() * expand_scales(self.scale, self.group, codes.shape)).to(dtype)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale.numel() * self.scale.element_size()


@torch.no_grad()
def pack_weight(weight: torch.Tensor, eps: float = WEIGHT_EPS) -> PackedTernary:
    """Quantize a latent weight exactly as BitLinear does (absmean ternary) and pack it."""
    codes, delta = ternary_codes(weight, eps)
    return PackedTernary(pack_ternary(codes), delta.reshape(()).float(), int(weight.shape[-1]))


def pack_codes(codes: torch.Tensor, scales: torch.Tensor, group: int) -> PackedTernary:
    """Pack given codes (out, in) with their scales: (1, 1) or 0-dim per tensor (``group = 0``), else (out, groups)."""
    scale = scales.float().reshape(()) if group == 0 else scales.float().contiguous()
    return PackedTernary(pack_ternary(codes), scale, int(codes.shape[-1]), group)
