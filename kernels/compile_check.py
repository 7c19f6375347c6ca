"""Compile every Triton kernel for an NVIDIA target ahead of time, without a GPU.

Triton's wheel ships ``ptxas``, so ``triton.compile`` can lower the kernels to cubin on a CPU-only machine: this
catches what the interpreter cannot (dot shape/dtype limits, layouts, shared-memory use) for the launch
configurations the host wrappers use on CUDA. It does not run anything.

    python -m kernels.compile_check [--arch 80 90]

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

_I32 = "i32"


@dataclass(frozen=True)
class Compiled:
    kernel: str
    variant: str
    arch: int
    shared_bytes: int


def _specs() -> list[tuple[str, Any, dict[str, str], dict[str, Any], dict[str, Any]]]:
    import kernels.triton_kernels as tk

    gpu = tk._Tiles(64, 64, 64)
    packed = tk._Tiles(64, 64, 128)
    mm_sig = {
        "a_ptr": "*fp32", "b_ptr": "*i8", "scale_ptr": "*fp32", "delta_ptr": "*fp32", "bias_ptr": "*fp32",
        "c_ptr": "*fp32", "aq_ptr": "*i8", "M": _I32, "N": _I32, "K": _I32, "KP": _I32, "G": _I32, "n_groups": _I32,
        "stride_am": _I32, "stride_ak": _I32, "stride_bn": _I32, "stride_bk": _I32, "stride_cm": _I32,
        "stride_cn": _I32, "act_eps": "fp32", "QUANT_A": "constexpr", "PACKED_B": "constexpr",
        "SAVE_AQ": "constexpr", "HAS_BIAS": "constexpr", "GROUPED": "constexpr", "BM": "constexpr",
        "BN": "constexpr", "BK": "constexpr", "GROUP_M": "constexpr",
    }

    def mm(t: Any, grouped: bool = False, **flags: bool) -> dict[str, Any]:
        return dict(flags, GROUPED=grouped, BM=t.bm, BN=t.bn, BK=t.bk, GROUP_M=8)

    g_sig = {
        "g_ptr": "*bf16", "codes_ptr": "*i8", "delta_ptr": "*fp32", "out_ptr": "*bf16", "M": _I32, "N": _I32,
        "K": _I32, "G": _I32, "n_groups": _I32, "stride_gm": _I32, "stride_gn": _I32, "stride_om": _I32,
        "stride_ok": _I32, "GROUPED": "constexpr", "PREC": "constexpr", "UPCAST": "constexpr", "BM": "constexpr",
        "BN": "constexpr", "BK": "constexpr",
    }
    w_sig = {
        "g_ptr": "*bf16", "aq_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": "*fp32", "M": _I32, "N": _I32,
        "K": _I32, "stride_gm": _I32, "stride_gn": _I32, "stride_on": _I32, "stride_ok": _I32,
        "PREC": "constexpr", "UPCAST": "constexpr", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr",
    }
    bwd = dict(BM=gpu.bm, BN=gpu.bk, BK=gpu.bn)
    aq_sig = {
        "x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "M": _I32, "K": _I32, "stride_xm": _I32,
        "stride_xk": _I32, "act_eps": "fp32", "BM": "constexpr", "BK": "constexpr",
    }
    ws = {"w_ptr": "*fp32", "part_ptr": "*fp32", "numel": _I32, "BLOCK": "constexpr"}
    tz = {
        "w_ptr": "*fp32", "part_ptr": "*fp32", "codes_ptr": "*i8", "delta_ptr": "*fp32", "numel": _I32,
        "numel_f": "fp32", "n_parts": _I32, "eps": "fp32", "BLOCK": "constexpr", "PBLOCK": "constexpr",
    }
    return [
        ("fused fwd fp32→fp32, save", tk._ternary_matmul_kernel, mm_sig,
         mm(gpu, QUANT_A=True, PACKED_B=False, SAVE_AQ=True, HAS_BIAS=True), {}),
        ("fused fwd fp32→bf16 (autocast)", tk._ternary_matmul_kernel, dict(mm_sig, c_ptr="*bf16", bias_ptr="*bf16"),
         mm(gpu, QUANT_A=True, PACKED_B=False, SAVE_AQ=True, HAS_BIAS=True), {}),
        ("int8 A fwd →bf16", tk._ternary_matmul_kernel, dict(mm_sig, a_ptr="*i8", c_ptr="*bf16"),
         mm(gpu, QUANT_A=False, PACKED_B=False, SAVE_AQ=False, HAS_BIAS=False), {}),
        ("packed fused fwd bf16", tk._ternary_matmul_kernel, dict(mm_sig, a_ptr="*bf16", b_ptr="*u8", c_ptr="*bf16"),
         mm(packed, QUANT_A=True, PACKED_B=True, SAVE_AQ=False, HAS_BIAS=False), {}),
        ("packed int8 A fwd bf16", tk._ternary_matmul_kernel, dict(mm_sig, a_ptr="*i8", b_ptr="*u8", c_ptr="*bf16"),
         mm(packed, QUANT_A=False, PACKED_B=True, SAVE_AQ=False, HAS_BIAS=True), {}),
        ("grouped fused fwd fp32, save", tk._ternary_matmul_kernel, mm_sig,
         mm(gpu, grouped=True, QUANT_A=True, PACKED_B=False, SAVE_AQ=True, HAS_BIAS=True), {}),
        ("grouped int8 A fwd →bf16", tk._ternary_matmul_kernel, dict(mm_sig, a_ptr="*i8", c_ptr="*bf16"),
         mm(gpu, grouped=True, QUANT_A=False, PACKED_B=False, SAVE_AQ=False, HAS_BIAS=False), {}),
        ("grouped packed fused fwd bf16", tk._ternary_matmul_kernel,
         dict(mm_sig, a_ptr="*bf16", b_ptr="*u8", c_ptr="*bf16"),
         mm(packed, grouped=True, QUANT_A=True, PACKED_B=True, SAVE_AQ=False, HAS_BIAS=False), {}),
        ("act quant bf16", tk._act_quant_kernel, aq_sig, {"BM": 16, "BK": 256}, {}),
        ("grad_x bf16", tk._grad_input_kernel, g_sig, dict(bwd, GROUPED=False, PREC="ieee", UPCAST=False), {}),
        ("grad_x fp32 tf32", tk._grad_input_kernel, dict(g_sig, g_ptr="*fp32", out_ptr="*fp32"),
         dict(bwd, GROUPED=False, PREC="tf32", UPCAST=False), {}),
        ("grad_x fp32 ieee", tk._grad_input_kernel, dict(g_sig, g_ptr="*fp32", out_ptr="*fp32"),
         dict(bwd, GROUPED=False, PREC="ieee", UPCAST=False), {}),
        ("grouped grad_x bf16", tk._grad_input_kernel, g_sig, dict(bwd, GROUPED=True, PREC="ieee", UPCAST=False),
         {}),
        ("grad_w bf16", tk._grad_weight_kernel, w_sig, dict(bwd, PREC="ieee", UPCAST=False), {}),
        ("grad_w fp32", tk._grad_weight_kernel, dict(w_sig, g_ptr="*fp32"), dict(bwd, PREC="ieee", UPCAST=False), {}),
        ("abs sum", tk._abs_sum_kernel, ws, {"BLOCK": 4096}, {"num_warps": 4}),
        ("ternarize", tk._ternarize_kernel, tz, {"BLOCK": 4096, "PBLOCK": 1024}, {"num_warps": 4}),
    ]


def compile_all(archs: list[int]) -> list[Compiled]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_kernels as tk

    if tk.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    out = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for variant, fn, sig, const, opts in _specs():
            options = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False, **opts}
            k = triton.compile(ASTSource(fn, sig, const), target=target, options=options)
            out.append(Compiled(fn.__name__, variant, arch, int(k.metadata.shared)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 = A100, 90 = H100)")
    args = ap.parse_args(argv)
    for c in compile_all(args.arch):
        print(f"sm_{c.arch}  {c.kernel:<24} {c.variant:<32} shared {c.shared_bytes:>6} B  ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
