"""Distillation objectives of BitDistill (arXiv 2510.13998), pure PyTorch.

Every function here is pure: tensors in, a scalar loss out, computed in float32 whatever the input dtype,
the teacher side always detached (no gradient ever reaches a teacher tensor). Loss weights (β, γ, τ², …)
are the caller's business (``bitnet.stages``); the functions return the bare divergences.

``mask`` arguments everywhere mean the same thing: a bool (or 0/1) tensor shaped like the token positions,
``(batch, seq)``, True / 1 = the position takes part. ``None`` = every position takes part. Masked positions
never influence the result (not even through NaN/inf values in them): they are dropped by boolean
indexing, or, for the attention relations, weighted out of the mean and given an exactly-zero share of
every softmax row.

What was matched against the official code
-------------------------------------------
microsoft/BitNet ``bitdistill/src/llamafactory/train/sft/trainer.py`` (the LlamaFactory fork shipped with
the paper), functions ``compute_kd_loss_with_debug`` and ``CustomDistillSeq2SeqTrainer.compute_distill_loss``;
launch scripts ``bitdistill/ds-exp-run-sft-bitdistill.sh`` (beta, ``minilmv2_loss_coeff``,
``layers_used_for_distill="[$LAYER]"``, ``distill_to_student_final_layer=False``).

* Logits KD (``compute_kd_loss_with_debug``): positions selected with ``attention_mask`` (padding only, no
  label / prompt masking, no shift), ``F.kl_div(log_softmax(z_S/τ), softmax(z_T/τ), reduction="batchmean")
  * τ²`` — i.e. the sum of per-token KL(p_T ‖ p_S) divided by the number of selected tokens, times τ².
  :func:`logits_kd_loss` is exactly that *without* the τ² factor (the caller multiplies by β·τ²).
* Attention relations (MiniLMv2-style, the ``minilmv2_loss_coeff`` branch of ``compute_distill_loss``): for
  each of the value, key and query states of a layer, shaped ``[B, heads, T, d]`` as the patched model
  returned them: merge heads ``transpose(1, 2).reshape(B, T, heads·d)``, re-split into
  ``split_head_number`` relation heads ``[B, S, T, heads·d/S]`` (``ValueError`` when not divisible),
  ``F.normalize(p=2, dim=-1)``, ``R = X̂ X̂ᵀ`` divided by a ``temperature = 1.0`` (no √d scaling), reshaped to
  ``[B·S·T, T]`` rows, ``softmax`` over the last dim, both probabilities clamped at ``1e-8``, then
  ``F.kl_div(log(R_S), R_T, reduction="batchmean")`` — batchmean divides by the number of rows, B·S·T. The
  three KLs (V, K, Q) and the chosen layers are **summed**, and the sum is divided by
  ``len(layers_used_for_distill) * split_head_number``. So for one layer the official value is
  ``(1/S) · Σ_{Q,K,V} mean_over_rows KL(R_T ‖ R_S)``; note the division by S on top of a mean that already
  averages over the S relation heads, and the *sum* (not the mean) over Q/K/V. γ = 1e5 in the paper only
  means something with this reduction, so :func:`attention_relation_loss` returns it by default
  (``reduction="official"``); ``reduction="mean"`` gives the plain mean over Q/K/V, relation heads and rows
  (official = mean · 3 / S).
* The official relation has **no mask at all**: every query row and every key column of the full T×T
  relation takes part — padding included, and future positions included (no causal mask). ``mask=None``
  reproduces that exactly. With a mask, padded rows leave the mean (the divisor counts valid rows only) and
  padded columns get probability exactly 0 in both R_T and R_S — identical to computing the official loss on
  the sequence with the padded tokens removed.
* The 1e-8 clamp is not reproduced literally: rows of cosine similarities lie in [-1, 1], so every softmax
  entry is ≥ 1/(T·e²) and the clamp can only act for T > 1.3·10⁷; ``log_softmax`` gives the same values with
  better numerics.
* Teacher and student relation heads are computed independently; the official code reshapes the teacher with
  the student's ``num_heads * head_dim`` and so requires equal merged widths. Here only T (and B) must agree
  and each side's merged width must be divisible by ``split_heads`` (MiniLMv2 allows different widths; for
  BitDistill students the widths are equal anyway). K and V arrive with ``num_key_value_heads`` heads
  (before GQA repetition; see :mod:`bitnet.attention`), so their merged width is ``kv_heads · d``.
* ``layers_used_for_distill == [-1]`` means *all layers* in the official trainer (not "the last layer");
  the official scripts pass one explicit layer index. For several layers, average the per-layer values of
  :func:`attention_relation_loss` (the official division by ``len(layers)``).

Not found in the indexed sources (so not verified here): the yaml ``yamls/training_args/
sft_nli_bitnet_allnorm_distill.yaml`` and ``hparams/model_args.py`` (hence the defaults of
``logits_distill_temperature`` and ``split_head_number``; τ = 5, β = 10, γ = 1e5 and S = 32 come from the
paper / DESIGN.md), and the patched modeling file that returns ``all_{query,key,value}_states`` (so where
exactly those are taken — post-RoPE, pre-``repeat_kv`` — is inferred from the trainer's
``[B, num_heads, seq_len, head_dim]`` handling and the paper, not read).

Not in the official code: :func:`topk_kd_loss` (the TCS top-k objective) and :func:`hidden_state_loss`
(the layer-wise stage 1.9 objective) follow the project design (DESIGN.md §2); their definitions are
documented on each function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "QKV",
    "attention_relation_loss",
    "hidden_state_loss",
    "logits_kd_loss",
    "relation_logits",
    "topk_kd_loss",
]

# A masked relation column is filled with this before the softmax: exp(-1e4 - max) underflows to exactly 0
# in float32 (cosine logits lie in [-1, 1]), so the column gets probability 0 and contributes 0·finite = 0.
_MASKED_LOGIT = -1.0e4


class QKV(NamedTuple):
    """Query, key and value states of one attention layer, each ``(batch, heads, seq, head_dim)``.

    As captured by :func:`bitnet.attention.capture_qkv`: q and k after RoPE (and after Qwen3's q/k norms),
    k and v with ``num_key_value_heads`` heads (before GQA repetition).
    """

    q: Tensor
    k: Tensor
    v: Tensor


# ----------------------------------------------------------------------------------------------------------
# helpers


def _token_mask(mask: Tensor | None, shape: torch.Size, what: str) -> Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} does not match token positions {tuple(shape)}")
    return mask.to(dtype=torch.bool)


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student shape {tuple(a.shape)} != teacher shape {tuple(b.shape)}")


def _zero_like_graph(t: Tensor) -> Tensor:
    """A float32 zero that still belongs to ``t``'s graph (for a mask that selects nothing)."""
    return t.float().sum() * 0.0


# ----------------------------------------------------------------------------------------------------------
# logits KD


def logits_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean over selected token positions of KL(softmax(z_T/τ) ‖ softmax(z_S/τ)).

    ``student_logits`` / ``teacher_logits``: ``(..., vocab)``, same shape; ``mask``: shaped like the leading
    dims. Returned **without** the τ² factor: the official loss is ``β · τ² · logits_kd_loss(...)``
    (``compute_kd_loss_with_debug`` multiplies by ``temperature ** 2`` inside; we leave it to the caller so
    that τ and the gradient scale stay separate knobs). Computed in float32; the teacher is detached.
    """
    _check_same_shape(student_logits, teacher_logits, "logits_kd_loss")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = _token_mask(mask, student_logits.shape[:-1], "logits_kd_loss")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab) if m is None else student_logits[m]
    t = teacher_logits.detach().reshape(-1, vocab) if m is None else teacher_logits.detach()[m]
    if s.shape[0] == 0:
        return _zero_like_graph(s)
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = p · (log p − log q), elementwise
    per_token = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return per_token.mean()


# ----------------------------------------------------------------------------------------------------------
# TCS: top-k KD


def topk_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    k: int = 100,
    temperature: float = 5.0,
    mask: Tensor | None = None,
) -> Tensor:
    """KL from the teacher's top-k distribution to the student's, at temperature T (the TCS objective).

    Per token: ``idx`` = the teacher's k largest logits; ``p̂_T = softmax(z_T[idx]/T)`` (the teacher renormalised
    over its k entries, zero elsewhere), ``log q_S = log_softmax(z_S/T)`` over the **whole** vocabulary, gathered at
    ``idx``; loss = ``Σ_idx p̂_T (log p̂_T − log q_S)``; mean over selected tokens.

    This is the full-vocabulary KL(p̂_T ‖ q_S), ≥ 0, and it decomposes as
    ``KL(p̂_T ‖ q̃_S) − log M_S``: ``q̃_S`` the student renormalised over the k entries, ``M_S`` the student's mass
    on them. The second term matters: a loss on ``q̃_S`` alone does not see the student's mass outside the
    teacher's top-k, and with the paper's weight (β·τ² = 250 against a CE of 1) a student far from its teacher
    was measured to move that mass anywhere (SmolLM2-135M: CE 9.0 → 9.9 in 20 steps, top-1 agreement 0).
    ``k`` ≥ vocab uses the whole vocab (then this equals :func:`logits_kd_loss` at the same temperature). No T²
    factor, like :func:`logits_kd_loss`. Float32; teacher detached.
    """
    _check_same_shape(student_logits, teacher_logits, "topk_kd_loss")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = _token_mask(mask, student_logits.shape[:-1], "topk_kd_loss")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab) if m is None else student_logits[m]
    t = teacher_logits.detach().reshape(-1, vocab) if m is None else teacher_logits.detach()[m]
    if s.shape[0] == 0:
        return _zero_like_graph(s)
    k = min(k, vocab)
    t_top, idx = t.float().topk(k, dim=-1)
    log_p_t = F.log_softmax(t_top / temperature, dim=-1)
    log_q_s = F.log_softmax(s.float() / temperature, dim=-1).gather(-1, idx)
    per_token = F.kl_div(log_q_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return per_token.mean()


# ----------------------------------------------------------------------------------------------------------
# attention relations (MiniLMv2 / BitDistill)


def relation_logits(x: Tensor, split_heads: int) -> Tensor:
    """``(B, H, T, d)`` → relation logits ``(B, S, T, T)``: merge heads, re-split into S, L2-normalise, X̂X̂ᵀ.

    Float32. No √d scaling (the official ``temperature = 1.0``).
    """
    if x.dim() != 4:
        raise ValueError(f"expected (batch, heads, seq, head_dim), got shape {tuple(x.shape)}")
    if split_heads < 1:
        raise ValueError(f"split_heads must be >= 1, got {split_heads}")
    b, h, t, d = x.shape
    total = h * d
    if total % split_heads:
        raise ValueError(
            f"merged width heads*head_dim = {h}*{d} = {total} is not divisible by split_heads = {split_heads}"
        )
    xs = x.float().transpose(1, 2).reshape(b, t, split_heads, total // split_heads).transpose(1, 2)
    xs = F.normalize(xs, p=2, dim=-1)
    return xs @ xs.transpose(-2, -1)


def attention_relation_loss(
    student: QKV,
    teacher: QKV,
    split_heads: int = 32,
    mask: Tensor | None = None,
    reduction: Literal["official", "mean"] = "official",
) -> Tensor:
    """BitDistill attention-relation KD for one layer: KL(R_T ‖ R_S) for each of Q, K, V.

    ``R = softmax(X̂ X̂ᵀ)`` over the last dim, X̂ the L2-normalised rows of the states re-split into
    ``split_heads`` relation heads (see the module docstring for the exact official recipe).

    ``reduction="official"`` (default): ``(1/S) · Σ_{Q,K,V} mean_rows KL`` — the official trainer's value for a
    single distilled layer (γ = 1e5 is calibrated to it). ``reduction="mean"``: mean over Q/K/V, relation heads
    and rows. ``mask``: ``(batch, seq)``; None = every row and column, as the official code (no padding or
    causal mask). Float32; teacher detached.
    """
    if reduction not in ("official", "mean"):
        raise ValueError(f"reduction must be 'official' or 'mean', got {reduction!r}")
    total = None
    for name, xs, xt in zip("qkv", student, teacher, strict=True):
        if xs.dim() != 4 or xt.dim() != 4:
            raise ValueError(f"{name}: expected (batch, heads, seq, head_dim) tensors")
        if (xs.shape[0], xs.shape[2]) != (xt.shape[0], xt.shape[2]):
            raise ValueError(
                f"{name}: student (batch, seq) = {(xs.shape[0], xs.shape[2])} "
                f"!= teacher {(xt.shape[0], xt.shape[2])}"
            )
        b, _, t, _ = xs.shape
        m = _token_mask(mask, torch.Size((b, t)), "attention_relation_loss")
        r_s = relation_logits(xs, split_heads)
        r_t = relation_logits(xt.detach(), split_heads)
        if m is not None:
            col = ~m[:, None, None, :]  # (B, 1, 1, T): padded key columns
            r_s = r_s.masked_fill(col, _MASKED_LOGIT)
            r_t = r_t.masked_fill(col, _MASKED_LOGIT)
        log_r_s = F.log_softmax(r_s, dim=-1)
        log_r_t = F.log_softmax(r_t, dim=-1)
        kl_rows = F.kl_div(log_r_s, log_r_t, reduction="none", log_target=True).sum(-1)  # (B, S, T)
        if m is None:
            kl = kl_rows.mean()  # batchmean over B·S·T rows
        else:
            rows = m[:, None, :].expand_as(kl_rows)
            n = rows.sum()
            kl = kl_rows[rows].sum() / n if n > 0 else _zero_like_graph(kl_rows)
        total = kl if total is None else total + kl
    assert total is not None
    return total / split_heads if reduction == "official" else total / 3.0


# ----------------------------------------------------------------------------------------------------------
# hidden states (stage 1.9)


def _rms_normalize(h: Tensor, eps: float) -> Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def hidden_state_loss(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    kind: Literal["mse", "cosine"] = "mse",
    mask: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Layer-wise distance between student and teacher hidden states, averaged over tokens and layers.

    Each pair is ``(..., hidden)`` of equal shape. ``"mse"``: per token, the mean over the hidden dim of
    ``(ĥ_S − ĥ_T)²`` with ``ĥ = h / sqrt(mean(h²) + eps)`` (RMS-normalised along the hidden dim, no learned
    scale), i.e. ``F.mse_loss`` of the normalised states. ``"cosine"``: per token ``1 − cos(h_S, h_T)``.
    Mean over selected tokens, then over layers (every layer weighs the same). Float32; teacher detached.
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"student has {len(student_hidden)} hidden-state layers, teacher has {len(teacher_hidden)}"
        )
    if len(student_hidden) == 0:
        raise ValueError("no hidden states given")
    per_layer = []
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        _check_same_shape(hs, ht, f"hidden_state_loss layer {i}")
        m = _token_mask(mask, hs.shape[:-1], "hidden_state_loss")
        s = hs.reshape(-1, hs.shape[-1]) if m is None else hs[m]
        t = ht.detach().reshape(-1, ht.shape[-1]) if m is None else ht.detach()[m]
        if s.shape[0] == 0:
            per_layer.append(_zero_like_graph(s))
            continue
        s, t = s.float(), t.float()
        if kind == "mse":
            d = (_rms_normalize(s, eps) - _rms_normalize(t, eps)).pow(2).mean(-1)
        else:
            d = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        per_layer.append(d.mean())
    return torch.stack(per_layer).mean()
