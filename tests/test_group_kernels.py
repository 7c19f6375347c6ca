"""The kernels with per-group (and stored per-tensor) weight scales against BitLinear's PyTorch path: the Triton
training kernels in Triton's CPU interpreter (see tests/test_kernels.py for how it is imported), forward and backward,
for every scale rule, through BitLinear with the backend forced to Triton; and the packed inference layer (PyTorch
and Triton) against the layer it packs.

Tolerances come from the float32 error of a sum (no value is tuned to a machine): both paths compute the same
exact products in float32 and differ only in summation order and a few roundings per output. A sum of ``n`` terms
in any order is within ``γ_n·Σ|terms|`` of the exact sum (``γ_n ≈ n·u``, ``u = 2⁻²⁴``), so two orders are within
``2·γ_n·Σ|terms|``; :func:`bound` adds four roundings a term for the scale, division and casts around the sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnet.layers import BitLinear
from bitnet.packed import PackedBitLinear, pack_bitlinears
from bitnet.quant import act_quant, group_weight_quant, lsq_weight_quant, rule_scales
from kernels import dispatch
from kernels.packed_linear import packed_linear_torch
from kernels.packing import pack_codes
from kernels.quant import expand_scales, fp16_grid, grouped_codes, mse_scales
from kernels.reference import act_quant_codes
from tests.test_kernels import needs_triton, tk

U = 2.0**-24


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def bound(abs_terms: torch.Tensor, n: int) -> torch.Tensor:
    """Largest difference of two float32 evaluations of a sum of ``n`` terms whose magnitudes sum to ``abs_terms``
    (module docstring)."""
    return 2 * (n + 4) * U * abs_terms + 1e-30


def within(got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> None:
    err = (got.double() - ref.double()).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3e}, max error {float(err.max()):.3e}"


def problem(m: int, n: int, k: int, group: int, rule: str, seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[1] = 0.0  # an all-zero token
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g)
    scales = (fp16_grid(mse_scales(w, group)) * 1.1 if rule == "learned" else rule_scales(w, group, rule))
    return x, w, b, scales.reshape(n, -1) if group else scales.reshape(1, 1)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, group: int, rule: str
              ) -> torch.Tensor:
    """BitLinear's PyTorch path at λ = 1 (what ``BitLinear.quantized_forward`` computes)."""
    wq = lsq_weight_quant(w, scales, group) if rule == "learned" else group_weight_quant(w, group, rule)
    return F.linear(act_quant(x), wq, b)


def run(fn, x, w, b, scales, learned: bool):  # noqa: ANN001, ANN201 - test helper
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    s = scales.clone().requires_grad_(learned)
    y = fn(x, w, b, s)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad, s.grad, gy


CASES = [(5, 24, 64, 32), (33, 70, 192, 64), (80, 48, 256, 256), (17, 40, 96, 0)]  # (M, N, K, group): 0 = tensor


@needs_triton
@pytest.mark.parametrize("m,n,k,group,rule", [
    (*case, rule) for case in CASES for rule in ("mse", "learned", "absmean")
    if case[-1] or rule != "absmean"  # per-tensor absmean is the fused absmean kernel (tests/test_kernels.py)
])
def test_scaled_triton_linear_matches_bitlinears_pytorch_path(m: int, n: int, k: int, group: int, rule: str) -> None:
    learned = rule == "learned"
    x, w, b, scales = problem(m, n, k, group, rule)
    ref = run(lambda x_, w_, b_, s_: reference(x_, w_, b_, s_, group, rule), x, w, b, scales, learned)
    got = run(lambda x_, w_, b_, s_: tk.scaled_ternary_linear_triton(x_, w_, s_, group, b_, learned=learned),
              x, w, b, scales, learned)
    assert_within_sum_bounds(got, ref, x, w, b, scales, group, learned)


def assert_within_sum_bounds(got, ref, x, w, b, scales, group: int, learned: bool) -> None:  # noqa: ANN001
    """Output and gradients (x, W, b, scales) of two paths agree within the float32 bound of each sum."""
    gy = ref[-1].double()
    m, n, k = x.numel() // x.shape[-1], w.shape[0], w.shape[1]
    s = fp16_grid(scales.detach())
    wq = grouped_codes(w, s, group).double() * expand_scales(s, group, w.shape).double()
    q, xs = act_quant_codes(x.reshape(m, k))
    xq = q.double() / xs.double()
    gy2 = gy.reshape(m, n)
    within(got[0].reshape(m, n), ref[0].reshape(m, n), bound(xq.abs() @ wq.abs().t() + b.abs().double(), k))  # y
    within(got[1].reshape(m, k), ref[1].reshape(m, k), bound(gy2.abs() @ wq.abs(), n))  # grad_x
    g_w = gy2.abs().t() @ xq.abs()
    within(got[2], ref[2], bound(g_w, m))  # grad_W (learned: the same sum, masked)
    within(got[3], ref[3], bound(gy2.abs().sum(0), m))  # grad_b
    if learned:
        r = (w.double() / expand_scales(s, group, w.shape).double()).abs()
        per_value = g_w * (grouped_codes(w, s, group).abs().double() + r)
        size = group or w.numel()
        grouped_sum = per_value.reshape(n, -1, size).sum(-1) if group else per_value.sum().reshape(1, 1)
        # the group sum of G·(c − r·1[|r| ≤ 1]), G itself within bound(g_w, m) of the reference's
        within(got[4], ref[4], bound(grouped_sum, size) + bound(grouped_sum, m))
    else:
        assert got[4] is None and ref[4] is None


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
def test_grouped_matmul_keeps_exact_activation_codes(fused: bool) -> None:
    x, w, b, scales = problem(40, 24, 128, 64, "mse")
    codes = grouped_codes(w, scales, 64)
    y, xq, xs = tk.act_quant_matmul(x, codes, scales, b, save=True, fused=fused, group=64)
    ref_q, ref_s = act_quant_codes(x)
    assert torch.equal(xq, ref_q) and torch.equal(xs, ref_s.squeeze(-1))
    with pytest.raises(ValueError, match="one per 64"):
        tk.act_quant_matmul(x, codes, scales[:, :1], b, group=64)


def test_group_tiles_never_span_two_groups() -> None:
    assert tk.group_tile(256, 64, packed=False) == 64 and tk.group_tile(96, 64, packed=False) == 32
    assert tk.group_tile(192, 128, packed=True) == 64 and tk.group_tile(256, 128, packed=True) == 128
    assert tk.supports_group(32) and not tk.supports_group(32, packed=True) and tk.supports_group(0, packed=True)
    with pytest.raises(ValueError, match="cannot be tiled packed"):
        tk.group_tile(32, 128, packed=True)


@needs_triton
@pytest.mark.parametrize("rule", ["mse", "learned"])
def test_bitlinear_with_group_scales_through_forced_triton(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer takes the Triton kernels when the backend says so, with the same output and gradients (learned
    scales included) as its PyTorch path."""
    layer = BitLinear(128, 40)
    with torch.no_grad():
        layer.bias.normal_()
    layer.configure_scales(64, rule)
    x = torch.randn(2, 5, 128)
    gy = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(3))
    results = []
    calls = []
    monkeypatch.setattr(tk.TritonScaledTernaryLinearFunction, "apply",
                        lambda *a, _apply=tk.TritonScaledTernaryLinearFunction.apply: calls.append(a) or _apply(*a))
    for backend in ("torch", "triton"):
        layer.zero_grad()
        xt = x.clone().requires_grad_()
        with dispatch.use_kernel_backend(backend):
            y = layer(xt)
        y.backward(gy)
        scales_grad = layer.weight_scales.grad.clone() if layer.weight_scales is not None else None
        results.append((y.detach(), xt.grad, layer.weight.grad.clone(), layer.bias.grad.clone(), scales_grad, gy))
    assert len(calls) == 1 and calls[0][4] == 64  # the Triton path ran once (group 64), the PyTorch path once
    scales = layer.weight_scales if rule == "learned" else layer.current_scales()
    assert_within_sum_bounds(results[1], results[0], x, layer.weight.detach(), layer.bias.detach(), scales, 64,
                             rule == "learned")


# ------------------------------------------------------------------------------------------------ packed


def grouped_layer(k: int, n: int, group: int, rule: str, bias: bool = True) -> BitLinear:
    layer = BitLinear(k, n, bias=bias, sub_norm=True)
    with torch.no_grad():
        layer.sub_norm.weight.uniform_(0.5, 1.5)
        if bias:
            layer.bias.normal_()
    layer.configure_scales(group, rule)
    if rule == "learned":
        with torch.no_grad():
            layer.weight_scales.mul_(1.1)  # scales the rule would not give back
    return layer


@pytest.mark.parametrize("group,rule", [(64, "mse"), (32, "learned"), (256, "absmean"), (0, "mse")])
def test_packed_bitlinear_with_group_scales_equals_the_layer(group: int, rule: str) -> None:
    k = 256
    layer = grouped_layer(k, 48, group, rule)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(3, 7, k)
    with dispatch.use_kernel_backend("torch"), torch.no_grad():
        expected = layer(x)
        assert torch.equal(packed(x), expected)  # one chunk: the same F.linear on the same values
        packed.chunk_bytes = 1  # one output row at a time: the same products, other matmul shapes
        torch.testing.assert_close(packed(x), expected, rtol=1e-6, atol=1e-6)
    t = layer.ternary_weight()
    assert torch.equal(packed.ternary().dequantize(), t.dequantize())
    groups = k // group if group else 0
    assert packed.weight_nbytes() == 48 * k // 4 + 4 * (48 * groups if group else 1)
    assert sum(v.numel() * v.element_size() for n, v in packed.state_dict().items()
               if n in ("packed", "scale")) == packed.weight_nbytes()
    reloaded = PackedBitLinear(k, 48, sub_norm=True, scale_group=group)
    reloaded.load_state_dict(packed.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)


def test_pack_bitlinears_keeps_a_grouped_students_logits() -> None:
    from tests.test_calibrate import student_of, teacher

    model = student_of(teacher("qwen3"), rule="learned")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with dispatch.use_kernel_backend("torch"), torch.no_grad():
        expected = model(input_ids=ids).logits
        pack_bitlinears(model)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_packed_ternary_refuses_scales_that_do_not_fit() -> None:
    codes = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="do not fit"):
        pack_codes(codes, torch.ones(4, 3), 32)
    with pytest.raises(ValueError, match="do not fit"):
        pack_codes(codes, torch.ones(4, 2), 48)
    assert pack_codes(codes, torch.ones(4, 2), 32).scale.shape == (4, 2)


@needs_triton
@pytest.mark.parametrize("m,n,k,group", [(5, 24, 128, 64), (80, 40, 512, 256), (9, 16, 192, 64)])
@pytest.mark.parametrize("fused", [True, False])
def test_triton_packed_matmul_with_group_scales(m: int, n: int, k: int, group: int, fused: bool) -> None:
    layer = grouped_layer(k, n, group, "mse", bias=True)
    pw = PackedBitLinear.from_bitlinear(layer).ternary()
    x = torch.randn(m, k)
    y = tk.packed_matmul(x, pw.packed, pw.scale, k, layer.bias.detach(), fused=fused, group=group)
    ref = packed_linear_torch(x, pw, layer.bias.detach())
    q, xs = act_quant_codes(x)
    xq = q.double() / xs.double()
    within(y, ref, bound(xq.abs() @ pw.dequantize().double().abs().t() + layer.bias.detach().abs().double(), k))


@needs_triton
def test_packed_groups_triton_cannot_tile_run_the_pytorch_path() -> None:
    """Groups of 32 cannot be tiled packed (a tile holds 64 codes): forced Triton serves them on the PyTorch path."""
    layer = grouped_layer(96, 24, 32, "mse")
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(4, 96)
    with torch.no_grad():
        with dispatch.use_kernel_backend("torch"):
            expected = packed(x)
        with dispatch.use_kernel_backend("triton"):
            assert torch.equal(packed(x), expected)
