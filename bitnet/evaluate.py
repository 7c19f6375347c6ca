"""Held-out perplexity of causal LMs and of a unigram baseline on packed token blocks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | None = None) -> float:
    """Token-weighted perplexity: exp of the mean next-token cross-entropy over every predicted token."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"))
        count += target.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity needs at least one batch")
    return math.exp(nll / count)


def unigram_perplexity(train_tokens: np.ndarray, test_blocks: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one smoothed unigram model fit on ``train_tokens``, scored like :func:`perplexity`.

    ``test_blocks`` is (n_blocks, seq_len); as for the LM, the first token of each block is not predicted.
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.asarray(test_blocks, dtype=np.int64)[:, 1:].reshape(-1)
    return float(math.exp(-logp[targets].mean()))


@torch.no_grad()
def compare_to_teacher(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | None = None,
) -> dict[str, float]:
    """Perplexity of ``model`` and its agreement with ``teacher`` on the same held-out blocks, in one pass.

    ``ppl``: as :func:`perplexity`. ``top1_agreement``: fraction of predicted positions where the argmax
    next token of ``model`` equals the teacher's. ``kl``: mean per-token KL(p_teacher ‖ p_model) in nats.
    """
    device = device or next(model.parameters()).device
    states = (model.training, teacher.training)
    model.eval()
    teacher.eval()
    nll = agree = kl = 0.0
    count = 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        t_logits = teacher(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        flat = logits.reshape(-1, logits.size(-1))
        t_flat = t_logits.reshape(-1, t_logits.size(-1))
        nll += float(F.cross_entropy(flat, target.reshape(-1), reduction="sum"))
        agree += float((flat.argmax(-1) == t_flat.argmax(-1)).sum())
        kl += float(
            F.kl_div(F.log_softmax(flat, -1), F.log_softmax(t_flat, -1), reduction="sum", log_target=True)
        )
        count += target.numel()
    model.train(states[0])
    teacher.train(states[1])
    if count == 0:
        raise ValueError("compare_to_teacher needs at least one batch")
    return {"ppl": math.exp(nll / count), "top1_agreement": agree / count, "kl": kl / count}
