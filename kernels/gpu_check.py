"""Check the Triton kernels against the PyTorch reference on a real device (CUDA), at training-sized shapes.

    python -m kernels.gpu_check                 # on a GPU machine
    TRITON_INTERPRET=1 python -m kernels.gpu_check --device cpu --small   # the same checks in the interpreter

Prints one line per check with the largest error relative to the reference's scale and exits 1 if any check
fails. Together with ``python benchmarks/training_overhead.py`` this is the device check of the kernels.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.packing import pack_weight
from kernels.quant import act_quant_value, expand_scales, fp16_grid, grouped_codes, mse_scales, ternary_codes
from kernels.reference import act_quant_codes, reference_linear, ternary_linear_torch

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _fwd_bwd(fn: Linear, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor,
             amp: bool) -> list[torch.Tensor]:
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        y = fn(x, w, b)
    y.backward(g.to(y.dtype))
    return [y.detach().float(), x.grad.float(), w.grad.float(), b.grad.float()]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def run(device: torch.device, small: bool) -> bool:
    from kernels import triton_kernels as tk

    torch.manual_seed(0)
    shapes = [(80, 48, 130), (5, 70, 256)] if small else [(4096, 4864, 896), (4096, 896, 4864), (3, 896, 896)]
    ok = True

    def report(name: str, err: float, tol: float) -> None:
        nonlocal ok
        good = err <= tol
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name:<58} max rel err {err:.2e} (tol {tol:.0e})")

    for m, n, k in shapes:
        x = torch.randn(m, k, device=device) * 2
        w = torch.randn(n, k, device=device) * 0.02
        b = torch.randn(n, device=device)
        codes, delta = tk.weight_quant_triton(w)
        ref_codes, ref_delta = ternary_codes(w)
        report(f"weight codes {n}x{k} (fraction differing)", float((codes != ref_codes).float().mean()), 1e-6)
        report(f"weight scale {n}x{k}", _rel(delta[0], ref_delta), 1e-6)
        q, s = tk.act_quant_triton(x)
        ref_q, ref_s = act_quant_codes(x)
        report(f"act codes {m}x{k} (fraction differing)", float((q != ref_q).float().mean()), 0.0)
        report(f"act scales {m}x{k}", _rel(s, ref_s.squeeze(-1)), 0.0)
        g = torch.randn(m, n, device=device)
        for amp, tol in ((False, 1e-4), (True, 2e-2)):
            ref = _fwd_bwd(ternary_linear_torch, x, w, b, g, amp)
            got = _fwd_bwd(tk.ternary_linear_triton, x, w, b, g, amp)
            for name, a, r in zip(("y", "grad_x", "grad_w", "grad_b"), got, ref):
                report(f"train {name} {m}x{n}x{k} {'bf16 autocast' if amp else 'fp32'}", _rel(a, r), tol)
        if (group := next((gs for gs in (256, 64) if k % gs == 0), 0)):
            scales = fp16_grid(mse_scales(w, group))
            wq = (grouped_codes(w, scales, group).float() * expand_scales(scales, group, w.shape)).to(w.dtype)

            def ste_reference(x_: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor | None,
                              wq: torch.Tensor = wq) -> torch.Tensor:
                xq = x_ + (act_quant_value(x_) - x_).detach()
                return F.linear(xq, w_ + (wq - w_).detach(), b_)

            def grouped(x_: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor | None, scales: torch.Tensor = scales,
                        group: int = group) -> torch.Tensor:
                return tk.scaled_ternary_linear_triton(x_, w_, scales, group, b_)

            for amp, tol in ((False, 1e-4), (True, 2e-2)):
                ref = _fwd_bwd(ste_reference, x, w, b, g, amp)
                got = _fwd_bwd(grouped, x, w, b, g, amp)
                for name, a, r in zip(("y", "grad_x", "grad_w", "grad_b"), got, ref):
                    report(f"group {group} {name} {m}x{n}x{k} {'bf16 autocast' if amp else 'fp32'}", _rel(a, r), tol)
        pw = pack_weight(w)
        y_ref = reference_linear(x, w, b)
        for fused in (True, False):
            y = tk.packed_matmul(x, pw.packed, pw.scale.reshape(1).to(device), k, b, fused=fused)
            report(f"packed {m}x{n}x{k} fused={fused}", _rel(y, y_ref), 1e-4)
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes (for the CPU interpreter)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    return 0 if run(device, args.small) else 1


if __name__ == "__main__":
    sys.exit(main())
