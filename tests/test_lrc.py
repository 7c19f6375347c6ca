"""LRC closed-form initialisation (bitnet/lrc.py) against brute-force references and on a tiny converted llama."""

from __future__ import annotations

import copy

import pytest
import torch

from bitnet.convert import add_lrc, convert_to_bitnet
from bitnet.layers import BitLinearLRC, bit_linears, set_quant_lambda
from bitnet.lrc import (
    CovarianceAccumulator,
    calibrate_lrc,
    init_lrc_from_stats,
    lrc_closed_form,
    lrc_objective,
    lrc_svd_fallback,
)
from bitnet.quant import act_quant_value, weight_quant_value
from tests.test_layers_convert import tiny_model

IN, OUT, N = 64, 48, 512


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: with 2 intra-op threads on a shared 2-core box, spin-waiting made a tiny-llama forward
    ~50x slower (2.7 s vs 0.05 s for 4 batches); one thread is faster at these sizes in any case."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W, Wq and correlated inputs X = Z·A (covariance spread over ~4 decades of eigenvalues)."""
    g = torch.Generator().manual_seed(1)
    rot = torch.linalg.qr(torch.randn(IN, IN, generator=g))[0]
    a = torch.randn(IN, IN, generator=g) @ torch.diag(torch.logspace(0.5, -1.5, IN)) @ rot
    x = torch.randn(N, IN, generator=g) @ a
    w = torch.randn(OUT, IN, generator=g) / IN**0.5
    return w, weight_quant_value(w), x


def _target(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return x64 @ w.double().t() - act_quant_value(x).double() @ wq.double().t()


def _lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(x.double(), y, driver="gelsd").solution  # (in, out)


def test_closed_form_beats_svd_fallback_and_no_correction(problem) -> None:
    w, wq, x = problem
    none = lrc_objective(w, wq, x, None, None)
    for rank in (4, 8, 16):
        u, v = lrc_closed_form(w, wq, x, rank)
        us, vs = lrc_svd_fallback(w, wq, rank)
        assert u.shape == (OUT, rank) and v.shape == (IN, rank) and u.dtype == w.dtype
        cf, svd = lrc_objective(w, wq, x, u, v), lrc_objective(w, wq, x, us, vs)
        assert svd < none
        assert cf < 0.8 * svd, (rank, none, svd, cf)  # measured: r=8 → none 710, svd 551, closed form 291
    # the SVD fallback is the best rank-r approximation of W − Wq in plain Frobenius norm
    us, vs = lrc_svd_fallback(w, wq, 8)
    s = torch.linalg.svdvals((w - wq).double())
    err = torch.linalg.matrix_norm((w - wq).double() - us.double() @ vs.double().t())
    torch.testing.assert_close(err, s[8:].norm(), rtol=1e-5, atol=1e-6)


def test_closed_form_matches_bruteforce_reduced_rank_regression(problem) -> None:
    w, wq, x = problem
    y = _target(w, wq, x)
    b = _lstsq(x, y)
    rank = 8
    _, _, qh = torch.linalg.svd(x.double() @ b, full_matrices=False)  # SVD of the fitted values
    b_r = b @ qh[:rank].t() @ qh[:rank]
    ref_obj = float(torch.linalg.matrix_norm(y - x.double() @ b_r))

    # exact (ridge 0, float64 in): the same matrix
    u, v = lrc_closed_form(w.double(), wq.double(), x.double(), rank, ridge=0.0)
    torch.testing.assert_close(v @ u.t(), b_r, rtol=1e-7, atol=1e-8)
    # default ridge, float32 in: the same objective and fitted values
    u, v = lrc_closed_form(w, wq, x, rank)
    assert lrc_objective(w, wq, x, u, v) == pytest.approx(ref_obj, rel=1e-4)
    fitted = x.double() @ v.double() @ u.double().t()
    torch.testing.assert_close(fitted, x.double() @ b_r, rtol=0, atol=1e-3 * float((x.double() @ b_r).abs().max()))
    # factors are balanced: column i of U and of V have the same norm
    torch.testing.assert_close(u.double().norm(dim=0), v.double().norm(dim=0), rtol=1e-4, atol=0)


def test_full_rank_equals_least_squares(problem) -> None:
    w, wq, x = problem
    y = _target(w, wq, x)
    b = _lstsq(x, y)
    full = min(IN, OUT)
    u, v = lrc_closed_form(w.double(), wq.double(), x.double(), full, ridge=0.0)
    torch.testing.assert_close(v @ u.t(), b, rtol=1e-7, atol=1e-8)
    u, v = lrc_closed_form(w, wq, x, full)
    opt = float(torch.linalg.matrix_norm(y - x.double() @ b))
    assert lrc_objective(w, wq, x, u, v) == pytest.approx(opt, rel=1e-3)
    # in < out: the rank is capped by the inputs; rank = in is again the least-squares optimum
    w2 = torch.randn(96, IN) / IN**0.5
    wq2 = weight_quant_value(w2)
    u, v = lrc_closed_form(w2.double(), wq2.double(), x.double(), IN, ridge=0.0)
    torch.testing.assert_close(v @ u.t(), _lstsq(x, _target(w2, wq2, x)), rtol=1e-7, atol=1e-8)


def test_accumulator_over_batches_equals_one_shot(problem) -> None:
    w, wq, x = problem
    acc = CovarianceAccumulator(IN, OUT)
    for chunk in x.reshape(4, N // 4, IN):
        acc.update(chunk.reshape(2, -1, IN), w, wq)  # (batch, seq, in) inputs are flattened to tokens
    one = CovarianceAccumulator(IN, OUT)
    one.update(x, w, wq)
    assert acc.n_tokens == one.n_tokens == N
    torch.testing.assert_close(acc.xtx, one.xtx, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(acc.xty, one.xty, rtol=1e-12, atol=1e-9)
    u, v = init_lrc_from_stats(acc, 8)
    u1, v1 = lrc_closed_form(w, wq, x, 8)
    torch.testing.assert_close(v.double() @ u.double().t(), v1.double() @ u1.double().t(), rtol=1e-5, atol=1e-6)
    # the statistics alone give the objective (used by calibrate_lrc's report)
    assert acc.objective() == pytest.approx(lrc_objective(w, wq, x, None, None), rel=1e-9)
    assert acc.objective(u, v) == pytest.approx(lrc_objective(w, wq, x, u, v), rel=1e-6)
    # merging shard accumulators is the same as one pass
    a, b = CovarianceAccumulator(IN, OUT), CovarianceAccumulator(IN, OUT)
    a.update(x[: N // 2], w, wq)
    b.update(x[N // 2 :], w, wq)
    torch.testing.assert_close(a.merge(b).xty, one.xty, rtol=1e-12, atol=1e-9)


def _last_hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def test_calibrate_lrc_on_tiny_llama() -> None:
    student = convert_to_bitnet(tiny_model("llama"))
    add_lrc(student, 8)
    reference = copy.deepcopy(student)  # the same student in full precision, without correction (U = 0)
    set_quant_lambda(reference, 0.0)
    g = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, 97, (4, 32), generator=g) for _ in range(3)]
    held_out = torch.randint(0, 97, (4, 32), generator=g)

    # per-layer inputs and objective before calibration (first block's q_proj and down_proj)
    probes = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in probes}
    handles = [
        student.get_submodule(p).register_forward_pre_hook(
            lambda m, a, p=p: seen[p].append(m.normed_input(a[0]).detach())
        )
        for p in probes
    ]
    for ids in calib:
        _last_hidden(student, ids)
    for h in handles:
        h.remove()

    mse_before = torch.mean((_last_hidden(student, held_out) - _last_hidden(reference, held_out)) ** 2).item()
    report = calibrate_lrc(student, None, calib, rank=8)
    mse_after = torch.mean((_last_hidden(student, held_out) - _last_hidden(reference, held_out)) ** 2).item()

    names = [n for n, _ in bit_linears(student)]
    assert sorted(report) == sorted(names) and len(names) == 14
    assert all(0.0 < gain < 1.0 for gain in report.values()), report
    assert mse_after < 0.8 * mse_before, (mse_before, mse_after)
    for p in probes:
        layer: BitLinearLRC = student.get_submodule(p)
        x = torch.cat(seen[p]).reshape(-1, layer.in_features)
        w, wq = layer.weight, weight_quant_value(layer.weight)
        before = lrc_objective(w, wq, x, None, None)
        after = lrc_objective(w, wq, x, layer.lrc_u, layer.lrc_v)
        assert after < before
        # block 0 sees the same inputs during calibration, so the reported gain is this one
        assert report[p] == pytest.approx(1 - after / before, rel=1e-4)

    # the activation-free SVD fallback improves every layer less (measured gains 0.13-0.31 vs 0.30-0.63)
    rep_svd = calibrate_lrc(convert_to_bitnet(tiny_model("llama")), None, calib, rank=8, method="svd")
    assert all(0.0 < rep_svd[n] < report[n] for n in names), (rep_svd, report)


def test_calibrate_lrc_teacher_weight_and_sequential_passes() -> None:
    """A teacher's same-path nn.Linear supplies W; a budget of one block's statistics means one pass per block."""
    student = convert_to_bitnet(tiny_model("llama"))  # plain BitLinears: calibrate_lrc adds the adapters
    teacher = tiny_model("llama")
    path = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        teacher.get_submodule(path).weight.mul_(1.25)
    g = torch.Generator().manual_seed(4)
    calib = [torch.randint(0, 97, (2, 32), generator=g) for _ in range(2)]
    xs: list[torch.Tensor] = []
    h = student.get_submodule(path).register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    for ids in calib:
        _last_hidden(student, ids)
    h.remove()

    block = sum(CovarianceAccumulator.nbytes(m.in_features, m.out_features) for _, m in bit_linears(student)) // 2
    passes: list[int] = []
    counter = student.model.embed_tokens.register_forward_hook(lambda *_: passes.append(1))
    report = calibrate_lrc(student, teacher, iter(calib), rank=8, max_stats_bytes=block)  # iterator: re-iterated
    counter.remove()
    assert len(passes) == 2 * len(calib)  # two passes (one per decoder block) over every batch
    assert all(isinstance(m, BitLinearLRC) for _, m in bit_linears(student))
    assert student.bitnet_config.lrc_rank == 8
    assert all(gain > 0 for gain in report.values())
    layer: BitLinearLRC = student.get_submodule(path)
    x = torch.cat(xs).reshape(-1, 64)  # first layer of the first block: inputs unchanged by other corrections
    u, v = lrc_closed_form(teacher.get_submodule(path).weight, weight_quant_value(layer.weight), x, 8)
    torch.testing.assert_close(layer.lrc_v @ layer.lrc_u.t(), v @ u.t(), rtol=1e-4, atol=1e-5)


def test_rank_too_large_is_a_clear_error(problem) -> None:
    w, wq, x = problem
    with pytest.raises(ValueError, match=r"\[1, 48\].*got 49"):
        lrc_closed_form(w, wq, x, 49)
    with pytest.raises(ValueError, match="got 49"):
        lrc_svd_fallback(w, wq, 49)
    acc = CovarianceAccumulator(IN, OUT)
    acc.update(x, w, wq)
    with pytest.raises(ValueError, match="got 0"):
        init_lrc_from_stats(acc, 0)
    student = convert_to_bitnet(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"k_proj.*got 40"):  # k_proj is 64 -> 32
        calibrate_lrc(student, None, [torch.zeros(1, 4, dtype=torch.long)], rank=40)


def test_fresh_adapters_do_not_depend_on_the_callers_rng() -> None:
    """The zero-init LRC stage draws V before the trainer seeds torch: the draw must come from the stage's seed, so a
    recomputed stage writes the same bytes (and the caller's RNG stream is left untouched)."""
    base = convert_to_bitnet(tiny_model("llama"))
    torch.manual_seed(1)
    a = add_lrc(copy.deepcopy(base), 4, seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(1)
    torch.rand(100)  # another global RNG state
    b = add_lrc(copy.deepcopy(base), 4, seed=7)
    c = add_lrc(copy.deepcopy(base), 4, seed=8)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a)  # add_lrc consumed nothing from the global stream
    va = {n: m.lrc_v for n, m in bit_linears(a)}
    assert all(torch.equal(va[n], m.lrc_v) for n, m in bit_linears(b))
    assert not all(torch.equal(va[n], m.lrc_v) for n, m in bit_linears(c))
