"""Our own GGUF reader: open a file with ``gguf.GGUFReader`` and validate it before anything trusts it.

Checks, in order: the file exists and parses (magic, version, metadata, tensor infos); every tensor's data
lies inside the file (a truncated file fails here); the SHA-256 of the tensor data that our writer stores under
``bitdistill.tensor_data_sha256`` matches (a corrupted byte anywhere in the weights fails here); for the
``bitnet`` architecture every tensor the llama.cpp graph requires is present with the shape the metadata
implies. Any failure is a :class:`GGUFFormatError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from bitnet.export.errors import GGUFFormatError
from bitnet.export.gguf import ARCH, CHECKSUM_KEY, LAYER_MATRICES, LAYER_NORMS, SUB_NORMS, T, tensor_name


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _bitnet_expected_shapes(reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    """ggml shapes (ne0 first) that llama.cpp's bitnet loader will demand."""
    def kv(key: str) -> int:
        value = field_value(reader, f"{ARCH}.{key}")
        if value is None:
            raise GGUFFormatError(f"missing metadata {ARCH}.{key}")
        return int(value)

    n_embd, n_ff, n_layer = kv("embedding_length"), kv("feed_forward_length"), kv("block_count")
    n_head, n_head_kv = kv("attention.head_count"), kv("attention.head_count_kv")
    n_vocab = len(field_value(reader, "tokenizer.ggml.tokens") or [])
    n_gqa = n_embd // n_head * n_head_kv
    shapes: dict[str, tuple[int, ...]] = {
        tensor_name(T.TOKEN_EMBD): (n_embd, n_vocab),
        tensor_name(T.OUTPUT_NORM): (n_embd,),
    }
    mats = {
        T.ATTN_Q: (n_embd, n_embd), T.ATTN_K: (n_embd, n_gqa), T.ATTN_V: (n_embd, n_gqa), T.ATTN_OUT: (n_embd, n_embd),
        T.FFN_GATE: (n_embd, n_ff), T.FFN_UP: (n_embd, n_ff), T.FFN_DOWN: (n_ff, n_embd),
    }
    for i in range(n_layer):
        for kind in LAYER_NORMS.values():
            shapes[tensor_name(kind, i)] = (n_embd,)
        shapes[tensor_name(SUB_NORMS["self_attn.o_proj"], i)] = (n_embd,)
        shapes[tensor_name(SUB_NORMS["mlp.down_proj"], i)] = (n_ff,)
        for kind in LAYER_MATRICES.values():
            shapes[tensor_name(kind, i)] = mats[kind]
    return shapes


def read_gguf_checked(path: str | Path, *, expect_arch: str | None = None) -> gguf.GGUFReader:
    """A validated ``GGUFReader`` for ``path``; :class:`GGUFFormatError` when anything is wrong."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error, UnicodeDecodeError, OSError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise GGUFFormatError(f"{path} is not a valid GGUF file (truncated or corrupted): {reason}") from e
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=reader.data_offset)
    if end > size:
        raise GGUFFormatError(f"{path} is truncated: tensor data ends at byte {end}, the file has {size}")
    arch = field_value(reader, "general.architecture")
    if expect_arch is not None and arch != expect_arch:
        raise GGUFFormatError(f"{path}: architecture {arch!r}, expected {expect_arch!r}")
    stored = field_value(reader, CHECKSUM_KEY)
    if stored is not None:
        h = hashlib.sha256()
        for t in reader.tensors:
            h.update(np.ascontiguousarray(t.data).tobytes())
        if h.hexdigest() != stored:
            raise GGUFFormatError(f"{path} is corrupted: the tensor data does not match its SHA-256 ({stored[:12]}…)")
    if arch == ARCH and field_value(reader, "general.type") != "adapter":
        have = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
        for name, shape in _bitnet_expected_shapes(reader).items():
            if name not in have:
                raise GGUFFormatError(f"{path}: tensor {name} missing")
            if have[name] != shape:
                raise GGUFFormatError(f"{path}: tensor {name} has shape {have[name]}, the metadata implies {shape}")
    return reader
