"""Distillation objectives against independently written references; Q/K/V capture inside HF attention."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from bitnet.attention import CAPTURE_PREFIX, capture_qkv
from bitnet.convert import convert_to_bitnet, decoder_layers
from bitnet.objectives import (
    QKV,
    attention_relation_loss,
    hidden_state_loss,
    logits_kd_loss,
    topk_kd_loss,
)
from tests.test_layers_convert import ARCHS, TINY, tiny_model

B, T, V = 2, 5, 11


def _pad_mask() -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, -2:] = False
    m[1, 0] = False
    return m


def _garble(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Same tensor with arbitrary values (incl. huge ones) at the masked positions."""
    y = x.detach().clone()
    y[~mask] = torch.randn_like(y[~mask]) * 1e3
    return y


# ---------------------------------------------------------------------------------------------- logits KD


def test_logits_kd_matches_official_batchmean_formula() -> None:
    s, t, mask, tau = torch.randn(B, T, V), torch.randn(B, T, V), _pad_mask(), 2.0
    # the official compute_kd_loss_with_debug, divided by its tau**2 factor
    sv, tv = s.view(-1, V)[mask.view(-1)], t.view(-1, V)[mask.view(-1)]
    official = F.kl_div(F.log_softmax(sv / tau, -1), F.softmax(tv / tau, -1), reduction="batchmean") * tau**2
    torch.testing.assert_close(logits_kd_loss(s, t, tau, mask), official / tau**2)
    # explicit per-token loop
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                p = torch.softmax(t[b, i] / tau, -1)
                q = torch.softmax(s[b, i] / tau, -1)
                total += float((p * (p.log() - q.log())).sum())
                n += 1
    assert logits_kd_loss(s, t, tau, mask).item() == pytest.approx(total / n, rel=1e-5)
    # no mask = every position
    every = F.kl_div(F.log_softmax(s / tau, -1), F.softmax(t / tau, -1), reduction="sum") / (B * T)
    torch.testing.assert_close(logits_kd_loss(s, t, tau), every)


def test_logits_kd_grad_zero_mask_and_dtype() -> None:
    s = torch.randn(B, T, V, requires_grad=True)
    t = torch.randn(B, T, V, requires_grad=True)
    mask = _pad_mask()
    loss = logits_kd_loss(s, t, 5.0, mask)
    loss.backward()
    assert loss.item() > 0 and s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # teacher side never gets a gradient
    assert torch.all(s.grad[~mask] == 0)
    assert logits_kd_loss(s, s.detach().clone(), 5.0).abs().item() < 1e-6
    # masked positions do not matter, even with huge values there
    torch.testing.assert_close(logits_kd_loss(_garble(s, mask), _garble(t, mask), 5.0, mask), loss.detach())
    # half precision in, float32 out
    out = logits_kd_loss(s.detach().bfloat16(), t.detach().bfloat16(), 5.0, mask)
    assert out.dtype == torch.float32
    # a mask that selects nothing gives 0, not NaN
    assert logits_kd_loss(s, t, 1.0, torch.zeros(B, T, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError):
        logits_kd_loss(s, t[..., :-1], 1.0)


# ---------------------------------------------------------------------------------------------- top-k KD


def test_topk_kd_matches_loop_reference() -> None:
    s, t, mask, k, tau = torch.randn(B, T, V), torch.randn(B, T, V), _pad_mask(), 4, 5.0
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            order = sorted(range(V), key=lambda j: -float(t[b, i, j]))[:k]
            zt = torch.tensor([float(t[b, i, j]) / tau for j in order])
            log_p = zt - torch.logsumexp(zt, 0)  # the teacher renormalised over its top k
            zs_all = s[b, i].double() / tau
            log_q = torch.tensor([float(zs_all[j] - torch.logsumexp(zs_all, 0)) for j in order])  # full-vocab student
            total += float((log_p.exp() * (log_p - log_q)).sum())
            n += 1
    assert topk_kd_loss(s, t, k, tau, mask).item() == pytest.approx(total / n, rel=1e-5)


def test_topk_kd_properties() -> None:
    s = torch.randn(B, T, V, requires_grad=True)
    t = torch.randn(B, T, V, requires_grad=True)
    mask = _pad_mask()
    # k >= vocab: the whole vocabulary, i.e. plain logits KD at the same temperature
    torch.testing.assert_close(topk_kd_loss(s, t, k=1000, temperature=3.0), logits_kd_loss(s, t, 3.0))
    loss = topk_kd_loss(s, t, k=3, mask=mask)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert topk_kd_loss(s + 7.0, s.detach(), k=3).item() == pytest.approx(topk_kd_loss(s, s.detach(), k=3).item())
    # the minimum is the teacher's top-k distribution itself (no student mass outside it): push the other logits
    # far down and the loss goes to 0
    top = t.detach().topk(3, dim=-1).indices
    peaked = torch.full_like(t, -1e4).scatter(-1, top, t.detach().gather(-1, top))
    assert topk_kd_loss(peaked, t, k=3).item() < 1e-6
    torch.testing.assert_close(topk_kd_loss(_garble(s, mask), _garble(t, mask), k=3, mask=mask), loss.detach())
    with pytest.raises(ValueError):
        topk_kd_loss(s, t, k=0)


def test_topk_kd_penalises_student_mass_outside_the_teachers_top_k() -> None:
    """KL(p̂_T ‖ q_S) = KL(p̂_T ‖ q̃_S) − log M_S (q̃_S: the student renormalised over the top k, M_S its mass there).

    A student that matches the teacher's top-k ratios exactly but puts part of its mass elsewhere has
    KL(p̂_T ‖ q̃_S) = 0, so its loss is exactly −log M_S: the renormalised-only loss would call it perfect.
    """
    t = torch.randn(B, T, V)
    k, tau = 4, 2.0
    top = t.topk(k, dim=-1).indices
    s = torch.full_like(t, 0.0).scatter(-1, top, t.gather(-1, top) + 3.0)  # same top-k ratios, the rest at 0
    z = s / tau
    mass = z.softmax(-1).gather(-1, top).sum(-1)  # M_S per token
    assert 0.0 < mass.min() and mass.max() < 1.0
    expected = (-mass.log()).mean().item()
    assert topk_kd_loss(s, t, k, tau).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- relations


def _official_relation(s: QKV, t: QKV, split: int) -> torch.Tensor:
    """The official trainer's minilmv2 branch for one layer, written out as it is there."""
    loss = torch.tensor(0.0)
    for s_x, t_x in zip(s, t):
        b, h, n, d = s_x.shape
        total = h * d
        new = total // split
        s_x = s_x.transpose(1, 2).reshape(b, n, total).reshape(b, n, split, new).transpose(1, 2)
        t_x = t_x.transpose(1, 2).reshape(b, n, total).reshape(b, n, split, new).transpose(1, 2)
        s_n, t_n = F.normalize(s_x, p=2, dim=-1), F.normalize(t_x, p=2, dim=-1)
        s_r = torch.matmul(s_n, s_n.transpose(-2, -1)).reshape(-1, n)
        t_r = torch.matmul(t_n, t_n.transpose(-2, -1)).reshape(-1, n)
        s_p = F.softmax(s_r, dim=-1).clamp(min=1e-8)
        t_p = F.softmax(t_r, dim=-1).clamp(min=1e-8)
        loss = loss + F.kl_div(torch.log(s_p), t_p, reduction="batchmean", log_target=False)
    return loss / (1 * split)


def _loop_relation_mean(s: QKV, t: QKV, split: int, lengths: list[tuple[int, int]] | None = None) -> float:
    """Mean over Q/K/V, relation heads and rows, by explicit loops; ``lengths`` = valid [start, end) per sample."""
    s, t = QKV(*(x.detach() for x in s)), QKV(*(x.detach() for x in t))
    per_qkv = []
    for s_x, t_x in zip(s, t):
        b, _, n, _ = s_x.shape
        acc, rows = 0.0, 0
        for bi in range(b):
            lo, hi = lengths[bi] if lengths else (0, n)
            # merged (T, H*d) rows, heads concatenated in order
            ms = torch.cat(list(s_x[bi].unbind(0)), dim=-1)[lo:hi]
            mt = torch.cat(list(t_x[bi].unbind(0)), dim=-1)[lo:hi]
            ws, wt = ms.shape[-1] // split, mt.shape[-1] // split
            for h in range(split):
                xs, xt = ms[:, h * ws : (h + 1) * ws], mt[:, h * wt : (h + 1) * wt]
                xs = xs / xs.norm(dim=-1, keepdim=True)
                xt = xt / xt.norm(dim=-1, keepdim=True)
                for i in range(hi - lo):
                    ls = torch.log_softmax(torch.stack([xs[i] @ xs[j] for j in range(hi - lo)]), 0)
                    lt = torch.log_softmax(torch.stack([xt[i] @ xt[j] for j in range(hi - lo)]), 0)
                    acc += float((lt.exp() * (lt - ls)).sum())
                    rows += 1
        per_qkv.append(acc / rows)
    return sum(per_qkv) / 3


def _rand_qkv(h: int, kv: int, d: int, grad: bool = False) -> QKV:
    return QKV(*(torch.randn(B, n, T, d, requires_grad=grad) for n in (h, kv, kv)))


def test_relation_loss_matches_official_code_and_loops() -> None:
    s, t = _rand_qkv(4, 2, 8), _rand_qkv(4, 2, 8)
    split = 4  # kv width 2*8 = 16 divisible by 4
    torch.testing.assert_close(attention_relation_loss(s, t, split_heads=split), _official_relation(s, t, split))
    mean = attention_relation_loss(s, t, split_heads=split, reduction="mean")
    assert mean.item() == pytest.approx(_loop_relation_mean(s, t, split), rel=1e-5)
    # official = sum over Q/K/V of the batchmean, divided by S  ->  3/S times the plain mean
    torch.testing.assert_close(attention_relation_loss(s, t, split_heads=split), mean * 3 / split)


def test_relation_loss_different_head_layout_same_tokens() -> None:
    # teacher 4 heads x 8, student 2 heads x 16: relations are T x T either way
    s, t = _rand_qkv(2, 1, 16), _rand_qkv(4, 2, 8)
    got = attention_relation_loss(s, t, split_heads=2, reduction="mean")
    assert got.item() == pytest.approx(_loop_relation_mean(s, t, 2), rel=1e-5)


def test_relation_loss_masking_grad_zero_and_errors() -> None:
    s, t = _rand_qkv(4, 2, 8, grad=True), _rand_qkv(4, 2, 8, grad=True)
    mask = _pad_mask()
    loss = attention_relation_loss(s, t, split_heads=4, mask=mask, reduction="mean")
    # = the loss on the sequences with the padded tokens removed
    lengths = [(0, T - 2), (1, T)]
    assert loss.item() == pytest.approx(_loop_relation_mean(s, t, 4, lengths), rel=1e-5)
    # arbitrary values at padded positions change nothing
    gs = QKV(*(_garble(x.transpose(1, 2), mask).transpose(1, 2) for x in s))
    gt = QKV(*(_garble(x.transpose(1, 2), mask).transpose(1, 2) for x in t))
    garbled = attention_relation_loss(gs, gt, split_heads=4, mask=mask, reduction="mean")
    torch.testing.assert_close(garbled, loss.detach())
    # an all-true mask is the official (unmasked) loss
    full = torch.ones(B, T, dtype=torch.bool)
    torch.testing.assert_close(attention_relation_loss(s, t, 4, full), attention_relation_loss(s, t, 4))
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    same = QKV(*(x.detach().clone() for x in s))
    assert attention_relation_loss(s, same, split_heads=4).abs().item() < 1e-6
    with pytest.raises(ValueError, match="not divisible by split_heads"):
        attention_relation_loss(s, t, split_heads=3)  # 4*8 = 32 and 2*8 = 16 are not divisible by 3
    with pytest.raises(ValueError):
        attention_relation_loss(s, QKV(*(x[:, :, :-1] for x in t)), split_heads=4)  # different seq length


# ---------------------------------------------------------------------------------------------- hidden states


def test_hidden_state_loss_mse_and_cosine_references() -> None:
    hs = [torch.randn(B, T, 8) * (i + 1) for i in range(3)]
    ht = [torch.randn(B, T, 8) for _ in range(3)]
    mask = _pad_mask()

    def rms(x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)

    mse_ref = sum(F.mse_loss(rms(a)[mask], rms(b)[mask]) for a, b in zip(hs, ht)) / 3
    torch.testing.assert_close(hidden_state_loss(hs, ht, "mse", mask), mse_ref)
    cos_layers = []
    for a, b in zip(hs, ht):
        vals = [
            1 - float(a[i, j] @ b[i, j] / (a[i, j].norm() * b[i, j].norm()))
            for i in range(B)
            for j in range(T)
            if mask[i, j]
        ]
        cos_layers.append(sum(vals) / len(vals))
    assert hidden_state_loss(hs, ht, "cosine", mask).item() == pytest.approx(sum(cos_layers) / 3, rel=1e-5)
    # unmasked = every token
    torch.testing.assert_close(hidden_state_loss(hs, ht), sum(F.mse_loss(rms(a), rms(b)) for a, b in zip(hs, ht)) / 3)


def test_hidden_state_loss_properties() -> None:
    hs = [torch.randn(B, T, 8, requires_grad=True) for _ in range(2)]
    ht = [torch.randn(B, T, 8, requires_grad=True) for _ in range(2)]
    mask = _pad_mask()
    for kind in ("mse", "cosine"):
        loss = hidden_state_loss(hs, ht, kind, mask)
        garbled = hidden_state_loss([_garble(h, mask) for h in hs], [_garble(h, mask) for h in ht], kind, mask)
        torch.testing.assert_close(garbled, loss.detach())
        assert hidden_state_loss(hs, [h.detach() * 3.0 for h in hs], kind).abs().item() < 1e-5  # scale-free
    hidden_state_loss(hs, ht, "mse", mask).backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in hs)
    assert all(h.grad is None for h in ht)
    with pytest.raises(ValueError, match="layers"):
        hidden_state_loss(hs, ht[:1])
    with pytest.raises(ValueError):
        hidden_state_loss(hs, ht, kind="l1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- Q/K/V capture


def _reference_qk_layer0(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (post-RoPE), k (post-RoPE, kv heads), v of layer 0 recomputed from the layer's own modules."""
    block = decoder_layers(model)[0]
    attn = block.self_attn
    modeling = sys.modules[type(attn).__module__]
    hidden = model.model.embed_tokens(ids)
    x = block.input_layernorm(hidden)
    b, n = ids.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, d)
    k = attn.k_proj(x).view(b, n, -1, d)
    v = attn.v_proj(x).view(b, n, -1, d).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # qwen3: per-head RMSNorm before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(n)[None].expand(b, n))
    q, k = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_capture_teacher_and_student(arch: str) -> None:
    ids = torch.randint(0, TINY["vocab_size"], (B, T))
    pad = torch.ones(B, T, dtype=torch.long)
    pad[1, :2] = 0  # left padding: the mask must reach the wrapped implementation unchanged
    for model in (tiny_model(arch), convert_to_bitnet(tiny_model(arch))):
        impl = model.config._attn_implementation
        with torch.no_grad():
            ref_logits = model(ids, attention_mask=pad).logits
            with capture_qkv(model, [0, -1]) as got:
                assert model.config._attn_implementation == CAPTURE_PREFIX + impl
                logits = model(ids, attention_mask=pad).logits
                assert torch.equal(logits, ref_logits)  # outputs identical with and without capture
                model(ids)
            q, k, v = _reference_qk_layer0(model, ids)
        assert model.config._attn_implementation == impl  # restored
        assert set(got) == {0, -1}
        torch.testing.assert_close(got[0].q, q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[0].k, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[0].v, v, rtol=1e-5, atol=1e-5)
        heads, kv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
        assert got[-1].q.shape[1] == heads and got[-1].k.shape[1] == kv and got[-1].v.shape[1] == kv
        assert not torch.equal(got[-1].q, got[0].q)


def test_capture_eager_restores_on_exception_and_checks_indices() -> None:
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ids = torch.randint(0, TINY["vocab_size"], (B, T))
    pad = torch.ones(B, T, dtype=torch.long)
    pad[0, -1] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=pad).logits
        with capture_qkv(model, [1]) as got:
            assert torch.equal(model(ids, attention_mask=pad).logits, ref)
    assert got[1].k.shape == (B, TINY["num_key_value_heads"], T, 16)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"):
        with capture_qkv(model, [0]):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(IndexError):
        with capture_qkv(model, [2]):
            pass
    assert model.config._attn_implementation == "eager"


def test_relation_loss_through_capture_trains_student_only() -> None:
    teacher = tiny_model("qwen2")
    student = convert_to_bitnet(tiny_model("qwen2"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, TINY["vocab_size"], (B, T))
    with capture_qkv(teacher, [-1]) as t_qkv, capture_qkv(student, [-1]) as s_qkv:
        with torch.no_grad():
            teacher(ids, use_cache=False)
        student(ids, use_cache=False)
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"
    loss = attention_relation_loss(s_qkv[-1], t_qkv[-1], split_heads=4)
    loss.backward()
    attn = decoder_layers(student)[-1].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert decoder_layers(student)[-1].self_attn.o_proj.weight.grad is None  # o_proj is after the relations
