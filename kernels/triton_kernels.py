"""Triton kernels for BitLinear: per-token act-quant + int8 × ternary matmul (training and 2-bit packed inference),
STE backward, and absmean weight quantization.

One matmul kernel: A is float (quantized per token inside the kernel: ``fused``) or int8 codes + row scales from
:func:`act_quant_triton`; B is int8 ternary codes or 2-bit packed bytes. Small inputs use the fused form; large ones
quantize once (see ``FUSED_MAX_ROWS``).

Importing this module needs ``triton`` (an optional dependency); :mod:`kernels.dispatch` imports it lazily.
The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before ``triton`` is
imported), which is how the tests exercise them on a CPU-only machine.

Numerics (matching :mod:`kernels.quant`):

- activations: ``s = (1 / max(max|x|, 1e-5))·127`` per row (how torch evaluates ``127 / amax``), codes
  ``clamp(round_half_even(x·s), -128, 127)`` — the same float32 operations as ``torch.round``/``torch.clamp``,
  so the codes and scales equal the reference exactly; launched with ``enable_fp_fusion=False`` so no FMA
  contraction changes a rounding.
- weights: ``Δ = Σ|W| / numel`` (float32 partial sums, so Δ may differ from ``torch.mean`` in the last bits),
  codes ``clamp(round_half_even(W / (Δ + 1e-5)), -1, 1)``.
- forward: ``int8 × ternary`` products accumulate exactly in int32; the epilogue computes ``acc / s · Δ (+ b)``.
  The reference sums ``(q/s)·(c·Δ)`` in floating point, so outputs agree to float32 rounding, not bitwise.
- backward (STE): ``grad_x = grad_y @ (c·Δ).to(dtype)``, ``grad_W = grad_yᵀ @ (q / s).to(dtype)``: the
  dequantized operands are exactly the reference's values; float32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.packing import PackedTernary, packed_cols
from kernels.quant import ACT_EPS, WEIGHT_EPS, expand_scales, fp16_grid, grouped_codes

__all__ = [
    "interpreting",
    "FUSED_MAX_ROWS",
    "act_quant_triton",
    "weight_quant_triton",
    "act_quant_matmul",
    "packed_matmul",
    "grad_input",
    "grad_weight",
    "TritonTernaryLinearFunction",
    "TritonScaledTernaryLinearFunction",
    "group_tile",
    "scaled_ternary_linear_triton",
    "supports_group",
    "ternary_linear_triton",
    "packed_linear_triton",
]


# Triton decides at decoration time (this import) whether ``@triton.jit`` functions are interpreted.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return INTERPRETED


# ----------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _round_half_even(y):
    """``torch.round`` (round half to even) in float32, exact for |y| < 2^23."""
    r = tl.floor(y)
    d = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _row_scales(a_ptr, rm, M, K, stride_am, stride_ak, act_eps, BK: tl.constexpr):
    """Per-row ``s = (1 / max(max|a|, eps))·127`` over the full K (bitnet evaluates ``127 / amax`` as
    ``reciprocal() * 127``: Python-int / tensor is torch's ``__rtruediv__``)."""
    amax = tl.zeros((rm.shape[0],), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        mask = (rm[:, None] < M) & (kk[None, :] < K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
    amax = tl.maximum(amax, act_eps)
    return tl.math.div_rn(tl.full((rm.shape[0],), 1.0, tl.float32), amax) * 127.0


@triton.jit
def _load_a_codes(a_ptr, aq_ptr, s, rm, kk, M, K, stride_am, stride_ak, m_save,
                  QUANT_A: tl.constexpr, SAVE_AQ: tl.constexpr):
    """An (BM, len(kk)) int8 tile of the activation codes: quantized on load or read as int8."""
    mask = (rm[:, None] < M) & (kk[None, :] < K)
    ptrs = a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak
    if QUANT_A:
        a = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        y = a * s[:, None]
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)  # clamp then round == round then clamp (integer bounds)
        q = _round_half_even(y).to(tl.int8)
        if SAVE_AQ:
            tl.store(aq_ptr + rm[:, None] * K + kk[None, :], q, mask=(rm[:, None] < m_save) & (kk[None, :] < K))
    else:
        q = tl.load(ptrs, mask=mask, other=0)
    return q


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile_dot(acc, a_ptr, aq_ptr, b_ptr, s, rm, rn, k0, M, N, K, KP, stride_am, stride_ak, stride_bn, stride_bk,
              m_save, QUANT_A: tl.constexpr, PACKED_B: tl.constexpr, SAVE_AQ: tl.constexpr, BK: tl.constexpr):
    """``acc`` + the int8 × ternary products of the K tile ``[k0, k0 + BK)`` (exact, int32)."""
    if PACKED_B:
        kj = tl.arange(0, BK // 4)
        pb = k0 // 4 + kj
        p = tl.load(
            b_ptr + rn[None, :] * stride_bn + pb[:, None] * stride_bk,
            mask=(rn[None, :] < N) & (pb[:, None] < KP),
            other=85,  # 0b01010101: four zero codes
        )
        for i in tl.static_range(4):
            a = _load_a_codes(a_ptr, aq_ptr, s, rm, k0 + 4 * kj + i, M, K, stride_am, stride_ak, m_save,
                              QUANT_A, SAVE_AQ)
            c = (((p >> (2 * i)) & 3).to(tl.int8) - 1).to(tl.int8)
            acc = tl.dot(a, c, acc)
    else:
        kk = k0 + tl.arange(0, BK)
        a = _load_a_codes(a_ptr, aq_ptr, s, rm, kk, M, K, stride_am, stride_ak, m_save, QUANT_A, SAVE_AQ)
        b = tl.load(
            b_ptr + rn[None, :] * stride_bn + kk[:, None] * stride_bk,
            mask=(rn[None, :] < N) & (kk[:, None] < K),
            other=0,
        )
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _ternary_matmul_kernel(
    a_ptr, b_ptr, scale_ptr, delta_ptr, bias_ptr, c_ptr, aq_ptr,
    M, N, K, KP, G, n_groups,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    act_eps,
    QUANT_A: tl.constexpr, PACKED_B: tl.constexpr, SAVE_AQ: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = dequant(Q(A) @ codes(B)ᵀ) (+ bias). A: (M, K) float (QUANT_A) or int8 codes with row scales;
    B: (N, K) int8 codes, or (N, KP) packed bytes (PACKED_B, four codes per byte along K). Weight scales: one Δ
    (``delta_ptr``), or with GROUPED one float32 scale per ``G`` consecutive values of a row (``delta_ptr`` is
    (N, n_groups); BK divides G): each group's exact int32 sum is scaled by its row's scale and summed in float32."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_save = M * (pid_n == 0).to(tl.int32)  # only the first column of programs stores codes and scales

    if QUANT_A:
        s = _row_scales(a_ptr, rm, M, K, stride_am, stride_ak, act_eps, BK)
        if SAVE_AQ:
            tl.store(scale_ptr + rm, s, mask=rm < m_save)
    else:
        s = tl.load(scale_ptr + rm, mask=rm < M, other=1.0)

    if GROUPED:
        y = tl.zeros((BM, BN), dtype=tl.float32)
        for g0 in range(0, K, G):
            acc = tl.zeros((BM, BN), dtype=tl.int32)
            for k0 in range(g0, g0 + G, BK):
                acc = _tile_dot(acc, a_ptr, aq_ptr, b_ptr, s, rm, rn, k0, M, N, K, KP, stride_am, stride_ak,
                                stride_bn, stride_bk, m_save, QUANT_A, PACKED_B, SAVE_AQ, BK)
            sg = tl.load(delta_ptr + rn * n_groups + g0 // G, mask=rn < N, other=0.0)
            y += acc.to(tl.float32) * sg[None, :]
        y = tl.math.div_rn(y, s[:, None])
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            acc = _tile_dot(acc, a_ptr, aq_ptr, b_ptr, s, rm, rn, k0, M, N, K, KP, stride_am, stride_ak,
                            stride_bn, stride_bk, m_save, QUANT_A, PACKED_B, SAVE_AQ, BK)
        delta = tl.load(delta_ptr)
        y = tl.math.div_rn(acc.to(tl.float32), s[:, None]) * delta
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, y.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, act_eps, BM: tl.constexpr, BK: tl.constexpr):
    """Per-token int8 codes (M, K contiguous) and float32 scales (M,) of x: one read for the scale, one to quantize."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    s = _row_scales(x_ptr, rm, M, K, stride_xm, stride_xk, act_eps, BK)
    tl.store(s_ptr + rm, s, mask=rm < M)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        _load_a_codes(x_ptr, q_ptr, s, rm, kk, M, K, stride_xm, stride_xk, M, True, True)


@triton.jit
def _abs_sum_kernel(w_ptr, part_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(tl.abs(w), axis=0))


@triton.jit
def _ternarize_kernel(w_ptr, part_ptr, codes_ptr, delta_ptr, numel, numel_f, n_parts, eps,
                      BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    """Finish Δ = Σ partials / numel (every program, same order: deterministic) and write the codes."""
    pid = tl.program_id(0)
    total = tl.zeros((PBLOCK,), dtype=tl.float32)
    for p0 in range(0, n_parts, PBLOCK):
        pp = p0 + tl.arange(0, PBLOCK)
        total += tl.load(part_ptr + pp, mask=pp < n_parts, other=0.0)
    delta = tl.math.div_rn(tl.sum(total, axis=0), numel_f)
    if pid == 0:
        tl.store(delta_ptr, delta)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.math.div_rn(w, delta + eps)
    y = tl.minimum(tl.maximum(y, -2.0), 2.0)
    q = tl.minimum(tl.maximum(_round_half_even(y), -1.0), 1.0)
    tl.store(codes_ptr + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _grad_input_kernel(g_ptr, codes_ptr, delta_ptr, out_ptr, M, N, K, G, n_groups,
                       stride_gm, stride_gn, stride_om, stride_ok,
                       GROUPED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[m, k] = Σ_n g[m, n] · (c[n, k]·Δ).to(g.dtype) — grad_x through the STE. codes contiguous (N, K); with
    GROUPED, Δ is the scale of (n, k)'s group: ``delta_ptr`` (N, n_groups), ``G`` values a group."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    if not GROUPED:
        delta = tl.load(delta_ptr)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        cmask = (rn[:, None] < N) & (rk[None, :] < K)
        c = tl.load(codes_ptr + rn[:, None] * K + rk[None, :], mask=cmask, other=0)
        if GROUPED:
            sg = tl.load(delta_ptr + rn[:, None] * n_groups + rk[None, :] // G, mask=cmask, other=0.0)
            w = (c.to(tl.float32) * sg).to(g.dtype)
        else:
            w = (c.to(tl.float32) * delta).to(g.dtype)
        if UPCAST:  # the interpreter multiplies bf16 as raw uint16: same values, float32 operands
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PREC)
    tl.store(out_ptr + rm[:, None] * stride_om + rk[None, :] * stride_ok, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _grad_weight_kernel(g_ptr, aq_ptr, scale_ptr, out_ptr, M, N, K,
                        stride_gm, stride_gn, stride_on, stride_ok,
                        PREC: tl.constexpr, UPCAST: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[n, k] = Σ_m g[m, n] · (q[m, k] / s[m]).to(g.dtype) — grad_W through the STE. aq contiguous (M, K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM)
        gt = tl.load(g_ptr + rm[None, :] * stride_gm + rn[:, None] * stride_gn,
                     mask=(rm[None, :] < M) & (rn[:, None] < N), other=0.0)
        q = tl.load(aq_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
        s = tl.load(scale_ptr + rm, mask=rm < M, other=1.0)
        x = tl.math.div_rn(q.to(tl.float32), s[:, None]).to(gt.dtype)
        if UPCAST:
            gt = gt.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(gt, x, acc, input_precision=PREC)
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :] * stride_ok, acc.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


# ----------------------------------------------------------------------------------------------- launch configs


@dataclass(frozen=True)
class _Tiles:
    bm: int
    bn: int
    bk: int
    num_warps: int = 4
    num_stages: int = 3


def _fit(dim: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(dim, 1))))


def _tiles(m: int, n: int, k: int, *, packed: bool = False) -> _Tiles:
    if interpreting():  # few, large programs: the interpreter pays per program, not per element
        return _Tiles(_fit(m, 16, 64), _fit(n, 16, 64), _fit(k, 64 if packed else 16, 128 if packed else 64))
    return _Tiles(64, 64, 128 if packed else 64)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not interpreting():
            raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


_NO_FMA: dict[str, Any] = {"enable_fp_fusion": False}


# ----------------------------------------------------------------------------------------------- host wrappers


def weight_quant_triton(w: torch.Tensor, eps: float = WEIGHT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary codes (int8, shape of ``w``) and Δ (float32, shape ``(1,)``) in two launches."""
    _check(w)
    wc = w.detach().contiguous()
    numel = wc.numel()
    block = 4096 if not interpreting() else 1024
    n_parts = triton.cdiv(numel, block)
    parts = torch.empty(n_parts, dtype=torch.float32, device=w.device)
    codes = torch.empty(wc.shape, dtype=torch.int8, device=w.device)
    delta = torch.empty(1, dtype=torch.float32, device=w.device)
    _abs_sum_kernel[(n_parts,)](wc, parts, numel, BLOCK=block)
    _ternarize_kernel[(n_parts,)](
        wc, parts, codes, delta, numel, float(numel), n_parts, eps, BLOCK=block, PBLOCK=1024, **_NO_FMA
    )
    return codes, delta


def group_tile(group: int, bk: int, *, packed: bool) -> int:
    """The K tile of a grouped matmul: the largest power of two ≤ ``bk`` dividing ``group`` (a tile never spans
    two groups); at least 16 (``tl.dot``'s minimum K), 64 packed (four dots of BK / 4 codes)."""
    low = 64 if packed else 16
    while bk > low and group % bk:
        bk //= 2
    if group % bk or bk < low:
        raise ValueError(f"a scale group of {group} cannot be tiled{' packed' if packed else ''} (needs a multiple "
                         f"of {low})")
    return bk


def supports_group(group: int, *, packed: bool = False) -> bool:
    """Whether the Triton kernels take per-group scales of ``group`` values (0: per tensor, always)."""
    return group == 0 or group % (64 if packed else 16) == 0


def _matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    delta: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    in_features: int,
    packed: bool,
    scale: torch.Tensor | None = None,
    save: bool = False,
    group: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    _check(a, b)
    m, k = a.shape
    n = b.shape[0]
    if k != in_features:
        raise ValueError(f"input has {k} features, weight expects {in_features}")
    if group and (k % group or tuple(delta.shape) != (n, k // group)):
        raise ValueError(f"scales of shape {tuple(delta.shape)} do not hold one per {group} values of ({n}, {k})")
    quant_a = scale is None
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    aq = torch.empty((m, k), dtype=torch.int8, device=a.device) if quant_a and save else None
    if quant_a:
        scale = torch.empty(m, dtype=torch.float32, device=a.device)
    t = _tiles(m, n, k, packed=packed)
    bk = group_tile(group, t.bk, packed=packed) if group else t.bk
    grid = (triton.cdiv(m, t.bm) * triton.cdiv(n, t.bn),)
    scales = delta.float().contiguous() if group else delta.reshape(-1)
    _ternary_matmul_kernel[grid](
        a, b, scale, scales, bias if bias is not None else scales, out, aq if aq is not None else a,
        m, n, k, b.shape[1], group or k, k // group if group else 1,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACT_EPS,
        QUANT_A=quant_a, PACKED_B=packed, SAVE_AQ=aq is not None, HAS_BIAS=bias is not None, GROUPED=group > 0,
        BM=t.bm, BN=t.bn, BK=bk, GROUP_M=8, num_warps=t.num_warps, num_stages=t.num_stages, **_NO_FMA,
    )
    return out, aq, (scale if aq is not None else None)


# Rows up to which the single fused kernel (quantize A on load) is used. Every column of programs re-reads and
# re-quantizes its rows of A, which is free for decoding-sized inputs but multiplies A's traffic by N / BN for
# training-sized ones; those quantize once (int8 codes + scales, needed by the backward anyway) and run the
# int8 × ternary matmul on the codes.
FUSED_MAX_ROWS = 64


def act_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (M, K) and float32 scales (M,) of a 2-D ``x``: exactly :func:`act_quant_codes`."""
    _check(x)
    m, k = x.shape
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    bm = _fit(m, 16, 64) if interpreting() else 16
    bk = _fit(k, 16, 1024) if interpreting() else 256
    _act_quant_kernel[(triton.cdiv(m, bm),)](
        x, codes, scales, m, k, x.stride(0), x.stride(1), ACT_EPS, BM=bm, BK=bk, num_warps=4, **_NO_FMA
    )
    return codes, scales


def act_quant_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    delta: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    save: bool = False,
    fused: bool | None = None,
    group: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token int8 quantization of ``x`` (M, K) + matmul with int8 ternary ``codes`` (N, K) scaled by ``delta``:
    Δ of shape (1,), or with ``group`` one scale per ``group`` values of a row, shape (N, K / group).

    ``fused`` (default: ``M <= FUSED_MAX_ROWS``) quantizes inside the matmul kernel; otherwise one act-quant
    kernel writes int8 codes + scales and the matmul reads those. Returns ``(y, x_codes, x_scales)``; the codes
    (int8, M×K) and scales (float32, M) only when ``save`` (the backward needs them for ``grad_W``).
    """
    dtype = out_dtype or x.dtype
    k = codes.shape[1]
    if fused if fused is not None else x.shape[0] <= FUSED_MAX_ROWS:
        return _matmul(x, codes, delta, bias, dtype, in_features=k, packed=False, save=save, group=group)
    xq, xs = act_quant_triton(x)
    y, _, _ = _matmul(xq, codes, delta, bias, dtype, in_features=k, packed=False, scale=xs, group=group)
    return y, (xq if save else None), (xs if save else None)


def packed_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    delta: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    fused: bool | None = None,
    group: int = 0,
) -> torch.Tensor:
    """Per-token int8 quantization of ``x`` + matmul with 2-bit packed ternary weights (inference).

    ``fused``, ``delta`` and ``group`` as in :func:`act_quant_matmul`."""
    if packed.dtype != torch.uint8 or packed.shape[1] != packed_cols(in_features):
        raise ValueError("packed must be uint8 of shape (out_features, ceil(in_features / 4))")
    dtype = out_dtype or x.dtype
    if fused if fused is not None else x.shape[0] <= FUSED_MAX_ROWS:
        y, _, _ = _matmul(x, packed, delta, bias, dtype, in_features=in_features, packed=True, group=group)
        return y
    xq, xs = act_quant_triton(x)
    y, _, _ = _matmul(xq, packed, delta, bias, dtype, in_features=in_features, packed=True, scale=xs, group=group)
    return y


def grad_input(grad_y: torch.Tensor, codes: torch.Tensor, delta: torch.Tensor, group: int = 0) -> torch.Tensor:
    """``grad_y (M, N) @ (codes·Δ) (N, K)`` in ``grad_y``'s dtype; Δ per tensor (1,) or per group (N, K / group)."""
    _check(grad_y, codes)
    m, n = grad_y.shape
    k = codes.shape[1]
    out = torch.empty((m, k), dtype=grad_y.dtype, device=grad_y.device)
    t = _tiles(m, k, n)
    grid = (triton.cdiv(m, t.bm), triton.cdiv(k, t.bn))
    _grad_input_kernel[grid](
        grad_y, codes.contiguous(), delta.float().contiguous() if group else delta.reshape(-1), out, m, n, k,
        group or k, k // group if group else 1,
        grad_y.stride(0), grad_y.stride(1), out.stride(0), out.stride(1),
        GROUPED=group > 0, PREC=_precision(grad_y.dtype), UPCAST=_upcast(grad_y.dtype), BM=t.bm, BN=t.bk, BK=t.bn,
        num_warps=t.num_warps, num_stages=t.num_stages, **_NO_FMA,
    )
    return out


def grad_weight(
    grad_y: torch.Tensor, x_codes: torch.Tensor, x_scales: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``grad_yᵀ (N, M) @ (q / s) (M, K)`` accumulated in float32, returned in ``out_dtype``."""
    _check(grad_y, x_codes)
    m, n = grad_y.shape
    k = x_codes.shape[1]
    out = torch.empty((n, k), dtype=out_dtype, device=grad_y.device)
    t = _tiles(n, k, m)
    grid = (triton.cdiv(n, t.bm), triton.cdiv(k, t.bn))
    _grad_weight_kernel[grid](
        grad_y, x_codes.contiguous(), x_scales.contiguous(), out, m, n, k,
        grad_y.stride(0), grad_y.stride(1), out.stride(0), out.stride(1),
        PREC=_precision(grad_y.dtype), UPCAST=_upcast(grad_y.dtype), BM=t.bk, BN=t.bm, BK=t.bn,
        num_warps=t.num_warps, num_stages=t.num_stages, **_NO_FMA,
    )
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class TritonTernaryLinearFunction(torch.autograd.Function):
    """BitLinear at λ = 1 on Triton kernels; saves int8 codes (not float copies) for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        codes, delta = weight_quant_triton(weight)
        b = bias.detach().to(dtype) if bias is not None else None
        y, xq, xs = act_quant_matmul(x2, codes, delta, b, dtype, save=ctx.needs_input_grad[1])
        ctx.save_for_backward(codes, delta, xq, xs)
        ctx.x_shape = x.shape
        ctx.w_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codes, delta, xq, xs = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if g.stride(-1) != 1:
            g = g.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input(g, codes, delta).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad_weight(g, xq, xs, ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class TritonScaledTernaryLinearFunction(torch.autograd.Function):
    """BitLinear at λ = 1 with given weight scales: per group of ``group`` values of a row (N, K / group), or one
    per tensor (1, 1) by a rule other than absmean. The codes ``RoundClip(W / s, -1, 1)`` are elementwise PyTorch;
    the matmul (scales in the epilogue) and ``grad_x`` (scales on the codes) are the Triton kernels.

    Gradients as :mod:`bitnet.quant` defines them: with ``learned`` scales LSQ's (``grad_W = G·1[|W/s| ≤ 1]``,
    ``grad_s = Σ_group G·(c − (W/s)·1[|W/s| ≤ 1])`` with ``G = grad_yᵀ @ Q(x)``), otherwise the STE
    (``grad_W = G``, no gradient to recomputed scales)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                group: int, learned: bool) -> torch.Tensor:
        dtype = _compute_dtype(x)
        s = fp16_grid(scales.detach())
        codes = grouped_codes(weight, s, group)
        x2 = x.reshape(-1, x.shape[-1])
        b = bias.detach().to(dtype) if bias is not None else None
        save = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        y, xq, xs = act_quant_matmul(x2, codes, s if group else s.reshape(1), b, dtype, save=save, group=group)
        ctx.save_for_backward(weight, codes, s, xq, xs)
        ctx.x_shape, ctx.group, ctx.learned, ctx.has_bias = x.shape, group, learned, bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, codes, s, xq, xs = ctx.saved_tensors
        group = ctx.group
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if g.stride(-1) != 1:
            g = g.contiguous()
        grad_x = grad_w = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input(g, codes, s if group else s.reshape(1), group).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gw = grad_weight(g, xq, xs, torch.float32)
            if ctx.learned:
                r = weight.float() / expand_scales(s, group, weight.shape)
                inside = r.abs() <= 1.0
                grad_w = (gw * inside).to(weight.dtype)
                per_value = gw * (codes.float() - r * inside)
                grad_s = (per_value.reshape(s.shape[0], -1, group or per_value.numel()).sum(-1) if group
                          else per_value.sum().reshape(1, 1))
            else:
                grad_w = gw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_s, grad_b, None, None


def scaled_ternary_linear_triton(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int,
                                 bias: torch.Tensor | None = None, *, learned: bool = False) -> torch.Tensor:
    """BitLinear's quantized forward at λ = 1 with per-group (or stored per-tensor) scales on Triton kernels."""
    return TritonScaledTernaryLinearFunction.apply(x, weight, scales, bias, group, learned)


def ternary_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """BitLinear's quantized forward at λ = 1 on Triton kernels (with STE backward)."""
    return TritonTernaryLinearFunction.apply(x, weight, bias)


def packed_linear_triton(
    x: torch.Tensor, weight: PackedTernary, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Inference: ``F.linear(Q(x), Δ·codes, b)`` straight from the packed bytes."""
    x2 = x.reshape(-1, x.shape[-1])
    scale = weight.scale.to(device=x.device, dtype=torch.float32)
    scale = scale if weight.group else scale.reshape(1)
    y = packed_matmul(x2, weight.packed, scale, weight.in_features, bias, out_dtype or x.dtype, group=weight.group)
    return y.reshape(*x.shape[:-1], y.shape[-1])
