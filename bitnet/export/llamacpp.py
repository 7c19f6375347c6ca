"""llama.cpp as the consumer of our GGUF files (through llama-cpp-python): load, logits, perplexity.

The file is validated with :func:`~bitnet.export.reader.read_gguf_checked` before llama.cpp sees it. Logits come
from ``Llama(logits_all=True)``: ``eval`` of a token row fills ``scores[i]`` with the next-token logits after
position ``i``, the same layout as a Hugging Face ``model(input_ids).logits[0]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitnet.export.reader import read_gguf_checked

if TYPE_CHECKING:
    from llama_cpp import Llama


def load_llama(
    path: str | Path,
    *,
    lora: str | Path | None = None,
    n_ctx: int = 512,
    n_threads: int | None = None,
    f32_kv_cache: bool = False,
    logits_all: bool = True,
) -> Llama:
    """A ``llama_cpp.Llama`` over a checked GGUF (optionally with a LoRA/LRC adapter); call ``close()`` when done.

    ``f32_kv_cache`` keeps K/V in F32 instead of llama.cpp's default F16 (for exactness checks).
    """
    import llama_cpp

    read_gguf_checked(path)
    if lora is not None:
        read_gguf_checked(lora)
    kwargs: dict = {}
    if f32_kv_cache:
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    if lora is not None:
        kwargs["lora_path"] = str(lora)
    if n_threads is not None:
        kwargs.update(n_threads=n_threads, n_threads_batch=n_threads)
    return llama_cpp.Llama(model_path=str(path), logits_all=logits_all, n_ctx=n_ctx, verbose=False, **kwargs)


def llama_logits(llm: Llama, rows: Iterable[Sequence[int]]) -> np.ndarray:
    """Next-token logits ``(n_rows, len(row), n_vocab)`` for equally long token rows, each evaluated from scratch."""
    out = []
    for row in rows:
        row = [int(t) for t in row]
        if len(row) > llm.n_ctx():
            raise ValueError(f"a row of {len(row)} tokens does not fit the context of {llm.n_ctx()}")
        llm.reset()
        llm.eval(row)
        out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    return np.stack(out)


def llama_perplexity(llm: Llama, rows: Iterable[Sequence[int]]) -> float:
    """Perplexity of llama.cpp on token rows (every token after the first of each row is predicted)."""
    total, count = 0.0, 0
    for row in rows:
        logits = llama_logits(llm, [row])[0][:-1].astype(np.float64)
        targets = np.asarray(row[1:], dtype=np.int64)
        m = logits.max(-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        total += float((logz - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    if not count:
        raise ValueError("no tokens to score")
    return math.exp(total / count)
