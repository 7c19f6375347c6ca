"""kernels/: PyTorch reference vs bitnet's math, 2-bit packing, packed inference, Triton kernels, dispatch.

The Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` has to be set when the ``@triton.jit``
functions are decorated (when ``kernels.triton_kernels`` is imported) and when they are launched, so this module
sets it around that import and, through an autouse fixture, during each of its tests only. The Triton tests are
skipped only when ``triton`` is not installed (the project's ``test`` extra installs it).
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from bitnet.layers import BitLinear, BitLinearLRC, bit_linears
from bitnet.packed import PackedBitLinear, pack_bitlinears
from bitnet.quant import act_quant, act_quant_value, ternary_codes, weight_quant, weight_quant_value
from kernels import dispatch
from kernels.packed_linear import packed_linear_torch
from kernels.packing import byte_lut, pack_ternary, pack_weight, packed_cols, unpack_ternary
from kernels.reference import (
    act_quant_codes,
    fast_act_quant_value,
    fast_weight_quant_value,
    reference_linear,
    ternary_linear_torch,
)


def _import_triton_kernels() -> ModuleType | None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        try:
            import triton  # noqa: F401
        except ImportError:
            return None
        mod = importlib.import_module("kernels.triton_kernels")
        if not mod.interpreting():  # imported earlier in this process without the interpreter
            mod = importlib.reload(mod)
        dispatch._triton_module.cache_clear()
        return mod
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


tk = _import_triton_kernels()
needs_triton = pytest.mark.skipif(tk is None, reason="triton is not installed (pip install -e '.[test]')")


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton also consults TRITON_INTERPRET when an interpreted kernel is launched."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
Grads = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _run(fn: Linear, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, autocast: bool = False) -> Grads:
    """Output and gradients (x, W, b) of ``fn`` for a fixed upstream gradient."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, w, b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    y.backward(g)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _bitnet_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(act_quant(x), weight_quant(w), b)


# ------------------------------------------------------------------------------------------ reference


def test_fast_quantizers_are_bit_identical() -> None:
    x = torch.randn(6, 5, 300) * 4
    x[0, 0] = 0.0  # all-zero token: the eps clamp
    w = torch.randn(33, 300) * 0.02
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fast_act_quant_value(x.to(dtype)), act_quant_value(x.to(dtype)))
        assert torch.equal(fast_weight_quant_value(w.to(dtype)), weight_quant_value(w.to(dtype)))
    # rows whose extreme is negative or has huge/tiny magnitudes: the fast path skips a clamp that never acts
    for extra in (-torch.rand(200, 77) * 1e4, torch.randn(50, 9) * 1e-7, torch.tensor([[3e38, -3e38, 1.0, 0.5]])):
        assert torch.equal(fast_act_quant_value(extra), act_quant_value(extra))
    codes, scale = act_quant_codes(x)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 128
    assert torch.equal((codes.float() / scale), act_quant_value(x))


@pytest.mark.parametrize(
    "shape,bias,dtype,autocast",
    list(
        itertools.product(
            [(5, 64), (3, 7, 64), (2, 33, 256)], [True, False], [torch.float32, torch.bfloat16], [False, True]
        )
    ),
)
def test_reference_function_equals_bitnet_forward_and_backward(
    shape: tuple[int, ...], bias: bool, dtype: torch.dtype, autocast: bool
) -> None:
    x = (torch.randn(*shape) * 3).to(dtype)
    w = (torch.randn(48, shape[-1]) * 0.02).to(dtype)
    b = torch.randn(48).to(dtype) if bias else None
    expected = _run(_bitnet_linear, x, w, b, autocast)
    got = _run(ternary_linear_torch, x, w, b, autocast)
    for e, g in zip(expected, got):
        assert (e is None and g is None) or (e.dtype == g.dtype and torch.equal(e, g))
    if not autocast:  # and the plain value formula
        assert torch.equal(got[0], reference_linear(x, w, b))


def test_bitlinear_uses_kernel_path_only_at_lambda_one(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = BitLinear(64, 32, sub_norm=True)
    x = torch.randn(4, 64)
    calls: list[int] = []
    real = dispatch.ternary_linear

    def spy(*args: torch.Tensor | None) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr("bitnet.layers.kernel_linear", spy)
    with dispatch.use_kernel_backend("torch"):
        y = layer(x)
    assert calls and torch.equal(y, _bitnet_linear(layer.sub_norm(x), layer.weight, layer.bias))
    calls.clear()
    layer.quant_lambda = 0.5
    layer(x)
    assert not calls


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (4, 4), (2, 3, 9), (16, 256), (5, 0)])
def test_pack_unpack_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], packed_cols(shape[-1]))
    assert torch.equal(unpack_ternary(packed, shape[-1]), codes)
    if shape[-1] % 4:  # padding codes are zeros (0b01), never 0b11
        tail = (packed[..., -1] >> (2 * (shape[-1] % 4))).to(torch.int32)
        full = sum(1 << (2 * i) for i in range(4 - shape[-1] % 4))
        assert torch.equal(tail, torch.full_like(tail, full))
    assert not ((packed.unsqueeze(-1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3 == 3).any()


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([[2, 0]], dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_ternary(torch.zeros(2, 4))
    with pytest.raises(ValueError):
        unpack_ternary(torch.zeros(2, 3, dtype=torch.uint8), 4)


def test_pack_weight_matches_bitnet_codes_and_lut() -> None:
    w = torch.randn(24, 70) * 0.05
    pw = pack_weight(w)
    codes, delta = ternary_codes(w)
    assert torch.equal(pw.codes(), codes) and float(pw.scale) == float(delta)
    assert torch.equal(pw.dequantize(), weight_quant_value(w))
    lut = byte_lut(pw.scale, torch.float32)
    dense = F.embedding(pw.packed.int(), lut).reshape(24, -1)[:, :70]
    assert torch.equal(dense, weight_quant_value(w))


# ------------------------------------------------------------------------------------------ packed inference


@pytest.mark.parametrize("bias,sub_norm,k", [(True, False, 256), (False, True, 130), (True, True, 67)])
def test_packed_bitlinear_equals_bitlinear(bias: bool, sub_norm: bool, k: int) -> None:
    layer = BitLinear(k, 96, bias=bias, sub_norm=sub_norm)
    if sub_norm:
        with torch.no_grad():
            layer.sub_norm.weight.uniform_(0.5, 1.5)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(3, 11, k)
    with torch.no_grad():
        expected = layer(x)
        assert torch.equal(packed(x), expected)  # one chunk: the same F.linear on the same values
        packed.chunk_bytes = 1  # one output row at a time
        torch.testing.assert_close(packed(x), expected, rtol=1e-6, atol=1e-6)
    # only packed codes, the scale, bias and the norm are held; no latent matrix
    floats = [t for t in packed.state_dict().values() if t.numel() >= k * 96 and t.is_floating_point()]
    assert not floats and packed.packed.dtype == torch.uint8


def test_packed_weights_are_8x_smaller_than_fp16() -> None:
    layer = BitLinear(896, 4864, bias=False)
    packed = PackedBitLinear.from_bitlinear(layer)
    fp16_bytes = layer.weight.numel() * 2
    packed_bytes = packed.packed.numel() * packed.packed.element_size()
    assert packed_bytes * 8 == fp16_bytes  # 2 bits vs 16 bits per weight
    assert fp16_bytes / packed.weight_nbytes() > 7.99  # + one float32 scale per matrix
    assert sum(t.numel() * t.element_size() for t in packed.state_dict().values()) == packed.weight_nbytes()


def test_packed_linear_torch_chunking_bounds_memory() -> None:
    w = torch.randn(50, 40) * 0.1
    pw = pack_weight(w)
    x = torch.randn(7, 40)
    full = packed_linear_torch(x, pw, None, chunk_bytes=1 << 30)
    chunked = packed_linear_torch(x, pw, None, chunk_bytes=40 * 4 * 3)  # three rows at a time
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full, reference_linear(x, w), rtol=0, atol=0)


def test_pack_bitlinears_swaps_a_student() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bitnet.convert import BitNetConfig, convert_to_bitnet

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = convert_to_bitnet(AutoModelForCausalLM.from_config(cfg).eval(), BitNetConfig(subln="standard"))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        n = len(bit_linears(model))
        pack_bitlinears(model)
        assert not bit_linears(model)
        assert sum(isinstance(m, PackedBitLinear) for m in model.modules()) == n == 14
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    with pytest.raises(TypeError):
        PackedBitLinear.from_bitlinear(BitLinearLRC(64, 32, rank=2))


# ------------------------------------------------------------------------------------------ dispatch


def test_dispatch_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.kernel_backend() == "auto"
    assert dispatch.resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.kernel_backend() == "torch"
    with dispatch.use_kernel_backend("auto"):
        assert dispatch.kernel_backend() == "auto"
    assert dispatch.kernel_backend() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        dispatch.kernel_backend()
    with pytest.raises(ValueError):
        dispatch.set_kernel_backend("fast")


def test_bitnet_and_kernels_work_without_triton() -> None:
    code = """
import sys
sys.modules["triton"] = None  # as if it were not installed
import torch
from bitnet.layers import BitLinear
from kernels import dispatch
from bitnet.packed import PackedBitLinear
assert dispatch._triton_module() is None
layer = BitLinear(8, 4)
layer(torch.randn(2, 8)).sum().backward()
PackedBitLinear.from_bitlinear(layer)(torch.randn(3, 8))
dispatch.set_kernel_backend("triton")
try:
    layer(torch.randn(2, 8))
except RuntimeError as e:
    assert "triton" in str(e)
else:
    raise SystemExit("forcing triton without triton must fail")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@needs_triton
def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "INTERPRETED", False)
    with dispatch.use_kernel_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.resolve_backend(torch.device("cpu"))


# ------------------------------------------------------------------------------------------ Triton (interpreter)

SHAPES = [(5, 24, 40), (33, 70, 130), (80, 48, 256)]  # (M, N, K): odd sizes exercise every mask


@needs_triton
@pytest.mark.parametrize("n,k", [(24, 40), (70, 130), (3, 1)])
def test_triton_weight_quant_matches_bitnet(n: int, k: int) -> None:
    w = torch.randn(n, k) * 0.05
    codes, delta = tk.weight_quant_triton(w)
    ref_codes, ref_delta = ternary_codes(w)
    torch.testing.assert_close(delta[0], ref_delta, rtol=1e-6, atol=0)
    # codes from the kernel's own Δ are exactly bitnet's rounding (Δ itself may differ in the last bit)
    assert torch.equal(codes, torch.clamp(torch.round(w / (delta[0] + 1e-5)), -1, 1).to(torch.int8))
    assert torch.equal(codes, ref_codes)


@needs_triton
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fused", [True, False])
def test_triton_act_quant_matmul(m: int, n: int, k: int, fused: bool) -> None:
    x = torch.randn(m, k) * 3
    x[1] = 0.0
    w = torch.randn(n, k) * 0.05
    b = torch.randn(n)
    codes, delta = ternary_codes(w)
    y, xq, xs = tk.act_quant_matmul(x, codes, delta.reshape(1), b, save=True, fused=fused)
    ref_q, ref_s = act_quant_codes(x)
    assert torch.equal(xq, ref_q) and torch.equal(xs, ref_s.squeeze(-1))  # exact codes and scales
    torch.testing.assert_close(y, reference_linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_act_quant_kernel_on_strided_input() -> None:
    x = (torch.randn(40, 300) * 5)[:, ::3]  # non-contiguous rows and columns
    q, s = tk.act_quant_triton(x)
    ref_q, ref_s = act_quant_codes(x)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s.squeeze(-1))


@needs_triton
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_triton_training_path_forward_backward(m: int, n: int, k: int) -> None:
    x = torch.randn(m, k) * 2
    w = torch.randn(n, k) * 0.05
    b = torch.randn(n)
    ref = _run(ternary_linear_torch, x, w, b)
    got = _run(tk.ternary_linear_triton, x, w, b)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_training_path_bf16() -> None:
    x = (torch.randn(2, 9, 70) * 2).bfloat16()
    w = (torch.randn(40, 70) * 0.05).bfloat16()
    ref = _run(ternary_linear_torch, x, w, None)
    got = _run(tk.ternary_linear_triton, x, w, None)
    for r, g in zip(ref[:3], got[:3]):
        assert g.dtype == r.dtype == torch.bfloat16
        # bf16 outputs: Triton accumulates in float32 and rounds once, CPU bf16 matmuls round more often;
        # both agree to bf16 precision relative to the tensor's scale
        err = (g.float() - r.float()).abs().max()
        assert err <= 1e-2 * r.float().abs().max(), (err, r.float().abs().max())


@needs_triton
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fused", [True, False])
def test_triton_packed_matmul(m: int, n: int, k: int, fused: bool) -> None:
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.05
    b = torch.randn(n)
    pw = pack_weight(w)
    y = tk.packed_matmul(x, pw.packed, pw.scale.reshape(1), k, b, fused=fused)
    torch.testing.assert_close(y, reference_linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tk.packed_linear_triton(x.reshape(1, m, k), pw, b)[0], y, rtol=0, atol=0)


@needs_triton
def test_bitlinear_and_packed_layer_through_forced_triton() -> None:
    layer = BitLinear(130, 40, sub_norm=True)
    x = torch.randn(2, 5, 130)
    ref = _run(lambda x_, w_, b_: layer.quantized_forward(layer.sub_norm(x_)), x, layer.weight.detach(), None)
    with dispatch.use_kernel_backend("triton"):
        assert dispatch.resolve_backend(x.device) == "triton"
        xt = x.clone().requires_grad_()
        y = layer(xt)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
        packed_y = PackedBitLinear.from_bitlinear(layer)(x)
    torch.testing.assert_close(y.detach(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xt.grad, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_y, ref[0], rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_kernels_compile_for_sm90_without_a_gpu() -> None:
    """ptxas from the triton wheel lowers every kernel at its CUDA launch configuration (catches what the
    interpreter does not check: dot shape/dtype limits, layouts, shared memory)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--arch", "90"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 17, proc.stdout
