"""Training overhead of BitLinear: forward+backward of one decoder block, BitLinear vs nn.Linear, in one run.

The block has Qwen2.5-0.5B shapes (hidden 896, 14 query / 2 KV heads of 64, SwiGLU intermediate 4864; no rotary,
which costs the same on both sides): RMSNorm → q/k/v/o → RMSNorm → gate/up/down. The BitLinear block is what
``bitdistill convert --subln standard`` makes of it: every projection a BitLinear at λ = 1, SubLN before
``o_proj`` and ``down_proj``.

Rows (each ratio = BitLinear block time / nn.Linear block time, both measured in this run, the steps of all cases
interleaved so that load from other processes hits them alike; best and median of the steps are reported):

- ``eager``: BitLinear on the PyTorch kernel path (``kernels.reference.TernaryLinearFunction``, the CPU default).
- ``eager, STE formula``: BitLinear's plain formula ``F.linear(act_quant(x), weight_quant(W), b)`` with the STE
  in the autograd graph (what BitLinear computed before the kernels existed; same values).
- ``eager, without the two SubLNs``: the PyTorch kernel path on a block without SubLN, to separate the cost
  of BitLinear from that of the extra norms BitDistill adds.
- ``compiled``: both blocks under ``torch.compile`` (PyTorch kernel path).
- ``triton kernels`` (CUDA only): BitLinear on the Triton kernels vs nn.Linear.

On CUDA every case runs under bf16 autocast (fp32 master weights), on CPU in fp32.

It also reports the memory of the block's seven ternary matrices packed 2-bit vs fp16.

    python benchmarks/training_overhead.py [--tokens T] [--batch B] [--iters N] [--threads N] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitnet.layers as bitnet_layers  # noqa: E402
from bitnet.layers import BitLinear  # noqa: E402
from bitnet.packed import PackedBitLinear  # noqa: E402
from kernels import dispatch  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 896, 14, 2, 64, 4864


class Block(nn.Module):
    """A Qwen2-style decoder block (no rotary) built from a linear factory."""

    def __init__(self, make: Callable[[int, int, bool, bool], nn.Module]) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.q_proj = make(HIDDEN, HEADS * HEAD_DIM, True, False)
        self.k_proj = make(HIDDEN, KV_HEADS * HEAD_DIM, True, False)
        self.v_proj = make(HIDDEN, KV_HEADS * HEAD_DIM, True, False)
        self.o_proj = make(HEADS * HEAD_DIM, HIDDEN, False, True)
        self.norm2 = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.gate_proj = make(HIDDEN, INTERMEDIATE, False, False)
        self.up_proj = make(HIDDEN, INTERMEDIATE, False, False)
        self.down_proj = make(INTERMEDIATE, HIDDEN, False, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(h).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(h).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def linear_block() -> Block:
    return Block(lambda i, o, bias, _norm: nn.Linear(i, o, bias=bias))


def bit_block(reference: Block, subln: bool = True) -> Block:
    block = Block(lambda i, o, bias, norm: BitLinear(i, o, bias=bias, sub_norm=norm and subln))
    block.load_state_dict(reference.state_dict(), strict=False)
    return block


@dataclass
class Case:
    name: str
    model: Callable[[torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    context: Callable[[], AbstractContextManager[None]] = nullcontext
    times: list[float] | None = None  # wall seconds per step
    cpu: list[float] | None = None  # process CPU seconds per step (robust to other processes on a shared machine)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(case: Case, x: torch.Tensor) -> tuple[float, float]:
    for p in case.params:
        p.grad = None
    _sync(x.device)
    t0, c0 = time.perf_counter(), time.process_time()
    with case.context():
        y = case.model(x)
        loss = y.float().square().mean()
    loss.backward()
    _sync(x.device)
    return time.perf_counter() - t0, time.process_time() - c0


@contextmanager
def _plain_formula() -> Iterator[None]:
    """BitLinear without the kernels hook: the STE formula of bitnet.quant in the autograd graph."""
    saved = bitnet_layers._kernel_linear
    bitnet_layers._kernel_linear = None
    try:
        yield
    finally:
        bitnet_layers._kernel_linear = saved


_NO_BACKEND = "none"


def _ctx(amp: bool, backend: str | None = _NO_BACKEND) -> Callable[[], AbstractContextManager[None]]:
    """Context factory: bf16 autocast when ``amp``; kernel backend ``torch``/``triton``, or ``None`` for the
    plain STE formula."""

    @contextmanager
    def ctx() -> Iterator[None]:
        with ExitStack() as stack:
            if amp:
                stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            if backend is None:
                stack.enter_context(_plain_formula())
            elif backend != _NO_BACKEND:
                stack.enter_context(dispatch.use_kernel_backend(backend))
            yield

    return ctx


def measure(cases: list[Case], x: torch.Tensor, warmup: int, iters: int) -> None:
    for case in cases:
        for _ in range(warmup):
            step(case, x)
        case.times, case.cpu = [], []
    for _ in range(iters):  # interleaved, so load from other processes hits every case alike
        for case in cases:
            wall, cpu = step(case, x)
            case.times.append(wall)
            case.cpu.append(cpu)


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible), torch {torch.__version__}"


def memory_rows(block: Block) -> list[tuple[str, int, int]]:
    rows = []
    for name, mod in block.named_modules():
        if isinstance(mod, BitLinear):
            packed = PackedBitLinear.from_bitlinear(mod)
            rows.append((name, mod.weight.numel() * 2, packed.weight_nbytes()))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="sequence length (default 512 on CPU, 2048 on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 1 on CPU, 8 on CUDA)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.tokens = args.tokens or (2048 if gpu else 512)
    args.batch = args.batch or (8 if gpu else 1)
    torch.manual_seed(0)

    ref = linear_block().to(device)
    bit = bit_block(ref).to(device)
    x = torch.randn(args.batch, args.tokens, HIDDEN, device=device)

    rows: list[tuple[str, Case, Case]] = []
    amp = device.type == "cuda"  # bf16 autocast on GPU (how the trainer runs there), fp32 on CPU
    bare = bit_block(ref, subln=False).to(device)
    lin = Case("nn.Linear", ref, list(ref.parameters()), _ctx(amp))
    bit_params, bare_params = list(bit.parameters()), list(bare.parameters())
    rows.append(("eager (PyTorch kernel path)", lin, Case("BitLinear", bit, bit_params, _ctx(amp, "torch"))))
    rows.append(("eager, STE formula (before kernels/)", lin, Case("STE", bit, bit_params, _ctx(amp, None))))
    rows.append(("eager, without the two SubLNs", lin, Case("bare", bare, bare_params, _ctx(amp, "torch"))))
    if not args.no_compile:
        lin_c = Case("nn.Linear compiled", torch.compile(ref), list(ref.parameters()), _ctx(amp))
        bit_c = Case("BitLinear compiled", torch.compile(bit), list(bit.parameters()), _ctx(amp, "torch"))
        rows.append(("torch.compile (PyTorch kernel path)", lin_c, bit_c))
    if device.type == "cuda":
        tri = Case("BitLinear triton", bit, list(bit.parameters()), _ctx(amp, "triton"))
        rows.append(("triton kernels", lin, tri))

    cases = list({id(c): c for _, a, b in rows for c in (a, b)}.values())
    t0 = time.perf_counter()
    measure(cases, x, args.warmup, args.iters)
    wall = time.perf_counter() - t0

    precision = "bf16 autocast" if amp else "fp32"
    print(f"# training overhead: decoder block fwd+bwd, batch {args.batch} × {args.tokens} tokens, {precision}")
    print(f"device: {device_line(device)}")
    print(f"{args.iters} interleaved steps per case after {args.warmup} warm-up; whole run {wall:.0f} s")
    print("wall ms as best / median of the steps; ratios = BitLinear / nn.Linear of the wall best, the wall median")
    print("and the median process CPU time (with one thread the CPU time is unaffected by other processes)\n")
    print("| path | nn.Linear wall ms | BitLinear wall ms | ratio wall best | ratio wall median | ratio CPU median |")
    print("|---|---:|---:|---:|---:|---:|")
    med = statistics.median
    for label, a, b in rows:
        ta, tb, ma, mb = min(a.times), min(b.times), med(a.times), med(b.times)
        ca, cb = med(a.cpu), med(b.cpu)
        print(
            f"| {label} | {ta * 1e3:.0f} / {ma * 1e3:.0f} | {tb * 1e3:.0f} / {mb * 1e3:.0f} "
            f"| {tb / ta:.2f}× | {mb / ma:.2f}× | {cb / ca:.2f}× |"
        )
    if device.type == "cpu":
        print("| triton | – | – | no CUDA device in this run | | |")

    mem = memory_rows(bit)
    fp16 = sum(r[1] for r in mem)
    packed = sum(r[2] for r in mem)
    print("\n| ternary matrices of the block | fp16 bytes | packed 2-bit bytes | ratio |")
    print("|---|---:|---:|---:|")
    for name, a, b in mem:
        print(f"| {name} | {a:,} | {b:,} | {a / b:.2f}× |")
    print(f"| all seven | {fp16:,} | {packed:,} | {fp16 / packed:.2f}× |")


if __name__ == "__main__":
    main()
