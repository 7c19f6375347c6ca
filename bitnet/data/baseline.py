"""Baselines computed from the packed data alone (no model): what a trained LM must beat."""

from __future__ import annotations

import math

import numpy as np


def unigram_perplexity(train_tokens: np.ndarray, test_blocks: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one smoothed unigram model fit on ``train_tokens``, scored like :func:`perplexity`.

    ``test_blocks`` is (n_blocks, seq_len); as for the LM, the first token of each block is not predicted.
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.asarray(test_blocks, dtype=np.int64)[:, 1:].reshape(-1)
    return float(math.exp(-logp[targets].mean()))
