"""Exact packers for ternary matrices and quantizers for the token embedding / output matrix.

Ternary codes ``c ∈ {−1, 0, 1}`` are packed into ggml block types whose block scale ``d`` (fp16) is either 1 (Δ then
goes into the F32 ``<tensor>.scale`` that llama.cpp multiplies in after the matmul) or Δ itself (``fold``: Δ rounded
to fp16, for runtimes without ``.scale`` support). Every packing is exact: dequantizing gives ``d·c``.

| type | block | bits/weight | stored code | ggml value | activations (``vec_dot_type``) |
|---|---|---|---|---|---|
| TQ2_0 | 256 | 2.0625 | c + 1 (2 bits) | (q − 1)·d | Q8_K: int8 per 256, fp32 scale |
| TQ1_0 | 256 | 1.6875 | base-3 digits | (q − 1)·d | Q8_K |
| Q4_0 | 32 | 4.5 | c + 8 ∈ {7, 8, 9}; nibble j pairs with j + 16 | (q − 8)·d | Q8_0: int8 per 32, fp16 scale |
| Q8_0 | 32 | 8.5 | c (int8) | q·d | Q8_0 |
| F16 | – | 16 | c | c | F16 (activations rounded to fp16) |

(Q2_0, 64-value blocks, is in the vendored llama.cpp but not in the ``gguf`` 0.19 Python package, and its x86 kernel
is the scalar generic one, so it is not offered.) llama-quantize's own fallback for rows that TQ cannot hold is
Q4_0 with ``d = max/−8``: lossy for ternary weights (one sign comes back as ±7/8). It is never used here.
"""

from __future__ import annotations

from typing import Literal, get_args

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# The export options, spelled here only: the ExportConfig fields, export_gguf/plan_export and the CLI choices use these.
WeightType = Literal["tq2_0", "tq1_0", "q4_0", "q8_0", "f16"]  # preferred type of the ternary matrices
EmbeddingType = Literal["f16", "f32", "q8_0", "q6_k"]  # token embedding / output matrix
Fallback = Literal["auto", "q4_0", "q8_0"]  # exact type of ternary rows TQ2_0/TQ1_0 cannot hold
DeltaMode = Literal["auto", "tensor", "fold"]  # Δ as an exact .scale tensor or folded into the block scales
WEIGHT_TYPES: tuple[str, ...] = get_args(WeightType)
EMBEDDING_TYPES: tuple[str, ...] = get_args(EmbeddingType)
FALLBACKS: tuple[str, ...] = get_args(Fallback)
DELTA_MODES: tuple[str, ...] = get_args(DeltaMode)

TERNARY_QTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "tq2_0": Q.TQ2_0, "tq1_0": Q.TQ1_0, "q4_0": Q.Q4_0, "q8_0": Q.Q8_0, "f16": Q.F16,
}
EMBEDDING_QTYPES: dict[str, gguf.GGMLQuantizationType] = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q6_k": Q.Q6_K}
# which int8 activation blocks llama.cpp's CPU matmul uses with each weight type (ggml-cpu.c type_traits_cpu)
VEC_DOT: dict[str, str] = {"tq2_0": "q8_K", "tq1_0": "q8_K", "q4_0": "q8_0", "q8_0": "q8_0", "f16": "f16", "f32": "f32"}


def block_size(qtype: gguf.GGMLQuantizationType) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def bits_per_weight(qtype: gguf.GGMLQuantizationType) -> float:
    blk, size = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * size / blk


def _fp16_bytes(d: float | np.ndarray) -> np.ndarray:
    """fp16 bytes of a scale (shape (2,)) or of per-block scales (rows, blocks) → (rows, blocks, 2)."""
    a = np.asarray(d, dtype=np.float16)
    return np.ascontiguousarray(a.reshape(-1) if a.ndim == 0 else a).view(np.uint8).reshape(*a.shape, 2)


def pack_ternary(codes: np.ndarray, qtype: gguf.GGMLQuantizationType, d: float | np.ndarray = 1.0) -> np.ndarray:
    """Codes (rows × n, int8 in {−1, 0, 1}) as ``qtype`` blocks with block scale ``d``: uint8 (rows × bytes), or F16.
    ``d`` is one scale, or one per block (rows × n / block; for F16 one per value)."""
    codes = np.ascontiguousarray(codes, dtype=np.int8)
    rows, n = codes.shape
    if qtype == Q.F16:
        scale = np.asarray(d, dtype=np.float16).astype(np.float32)
        return (codes.astype(np.float32) * scale).astype(np.float16)
    blk, size = gguf.GGML_QUANT_SIZES[qtype]
    if n % blk:
        raise ValueError(f"a row of {n} values does not split into {qtype.name} blocks of {blk}")
    nb = n // blk
    if np.ndim(d) and np.shape(d) != (rows, nb):
        raise ValueError(f"block scales of shape {np.shape(d)} do not fit {rows} rows of {nb} {qtype.name} blocks")
    if qtype in (Q.TQ2_0, Q.TQ1_0):  # the gguf packers are exact for codes (block scale max|c| ∈ {0, 1}); d is last
        out = gguf.quants.quantize(codes.astype(np.float32), qtype).reshape(rows, nb, size)
        out[:, :, -2:] = _fp16_bytes(d)
        return out.reshape(rows, nb * size)
    blocks = codes.reshape(rows, nb, blk)
    out = np.empty((rows, nb, size), dtype=np.uint8)
    out[:, :, :2] = _fp16_bytes(d)  # Q4_0 / Q8_0: d first
    if qtype == Q.Q4_0:
        q = (blocks + 8).astype(np.uint8)
        out[:, :, 2:] = q[:, :, :16] | (q[:, :, 16:] << np.uint8(4))
    elif qtype == Q.Q8_0:
        out[:, :, 2:] = blocks.view(np.uint8)
    else:
        raise ValueError(f"no exact ternary packing for {qtype.name}")
    return out.reshape(rows, nb * size)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """A valid Q6_K encoding of ``x`` (rows × n, n a multiple of 256): absmax scales per 16 values, int8 sub-scales.

    Simpler than ggml's ``make_qx_quants`` search (slightly larger error, same format); used for the token
    embedding / output matrix only, where the user asked for a lossy type.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    if n % 256:
        raise ValueError(f"Q6_K needs rows that are a multiple of 256, got {n}")
    blocks = x.reshape(-1, 256)
    nb = blocks.shape[0]
    sub = blocks.reshape(nb, 16, 16)
    scale = np.abs(sub).max(-1) / 31.0  # per 16 values: q in [−31, 31] ⊂ [−32, 31]
    d = scale.max(-1) / 127.0
    d16 = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16[:, None] > 0, np.round(scale / d16[:, None]), 0).clip(-128, 127).astype(np.int8)
        eff = d16[:, None] * sc.astype(np.float32)
        q = np.where(eff[:, :, None] > 0, np.round(sub / eff[:, :, None]), 0).clip(-32, 31)
    q6 = (q.astype(np.int16) + 32).astype(np.uint8).reshape(nb, 256)
    low, high = q6 & np.uint8(0x0F), q6 >> np.uint8(4)
    low = low.reshape(nb, 2, 2, 64)
    ql = (low[:, :, 0, :] | (low[:, :, 1, :] << np.uint8(4))).reshape(nb, 128)
    high = high.reshape(nb, 2, 4, 32)
    qh = (
        high[:, :, 0] | (high[:, :, 1] << np.uint8(2)) | (high[:, :, 2] << np.uint8(4)) | (high[:, :, 3] << np.uint8(6))
    )
    d_bytes = d16.astype(np.float16).view(np.uint8).reshape(nb, 2)
    out = np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), d_bytes], axis=1)
    return out.reshape(rows, -1)


def quantize_embedding(x: np.ndarray, etype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The embedding / output matrix (rows × n_embd) in ``etype``; raw type None for plain float arrays."""
    if etype == "f32":
        return x.astype(np.float32), None
    if etype == "f16":
        return x.astype(np.float16), None
    if etype == "q8_0":
        return gguf.quants.quantize(x.astype(np.float32), Q.Q8_0), Q.Q8_0
    if etype == "q6_k":
        return quantize_q6_k(x), Q.Q6_K
    raise ValueError(f"unknown embedding type {etype!r}")
