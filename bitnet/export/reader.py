"""Our own GGUF reader: open a file with ``gguf.GGUFReader`` and validate it before anything trusts it.

Checks, in order: the file exists and parses (magic, version, metadata, tensor infos); every tensor's data lies
inside the file (a truncated file fails here); then its integrity (:mod:`bitnet.export.writer`):

- a file the project wrote — it has ``bitdistill.producer`` or ``bitdistill.sha256``, or a key one or two bit flips
  away from either — must carry ``bitdistill.sha256``, and the SHA-256 of the whole file (metadata, tensor infos,
  tensor data) must match it: a changed metadata value, a renamed key, a flipped data bit all fail here;
- a file with neither is a *foreign* GGUF (a user's own model): it is read with a :class:`ForeignGGUFWarning`
  and reported as unchecked (:func:`check_gguf` ``.checked`` is False), never as checked;
- a file of the previous format (``bitdistill.tensor_data_sha256``: tensor data only) is verified as far as that
  goes, with a warning that its metadata is not covered.

Finally, for the ``bitnet`` architecture every tensor the llama.cpp graph requires is present with the shape the
metadata implies; for ``llama``/``qwen2``/``qwen3`` the per-layer matrices are present. Any failure is a
:class:`GGUFFormatError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from bitnet.export.errors import GGUFFormatError
from bitnet.export.names import LAYER_MATRICES, LAYER_NORMS, SUB_NORMS, T, tensor_name
from bitnet.export.writer import (
    CHECKSUM_KEY,
    LEGACY_CHECKSUM_KEY,
    PRODUCER_KEY,
    checksum_value_offset,
    file_digest,
)
from bitnet.families import graph_names

ARCH = "bitnet"
_OUR_KEYS = (CHECKSUM_KEY.encode(), PRODUCER_KEY.encode())


class ForeignGGUFWarning(UserWarning):
    """A GGUF without the project's checksum: read, but not checked."""


@dataclass(frozen=True)
class GGUFCheck:
    reader: gguf.GGUFReader
    checked: bool  # True only when the whole-file SHA-256 of a project file matched
    status: str  # checked | foreign | legacy


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _near(key: bytes, ours: bytes, max_bits: int = 2) -> bool:
    """Equal length and at most ``max_bits`` bits different: a damaged name of one of our keys."""
    if len(key) != len(ours):
        return False
    return sum((a ^ b).bit_count() for a, b in zip(key, ours)) <= max_bits


def _is_ours(reader: gguf.GGUFReader) -> bool:
    for name in reader.fields:
        raw = name.encode("utf-8", "surrogateescape")
        if name.startswith("bitdistill.") or any(_near(raw, k) for k in _OUR_KEYS):
            return True
    return False


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


def _verify(path: Path, reader: gguf.GGUFReader) -> str:
    field = reader.get_field(CHECKSUM_KEY)
    if field is not None:
        stored = field.contents()
        if not isinstance(stored, str) or len(stored) != 64:
            raise GGUFFormatError(f"{path} is corrupted: its {CHECKSUM_KEY} value is malformed")
        if file_digest(path, checksum_value_offset(field.offset)) != stored:
            raise GGUFFormatError(f"{path} is corrupted: its metadata or tensor data does not match its SHA-256 "
                                  f"({stored[:12]}…)")
        return "checked"
    legacy = field_value(reader, LEGACY_CHECKSUM_KEY)
    if legacy is not None:
        h = hashlib.sha256()
        for t in reader.tensors:
            h.update(np.ascontiguousarray(t.data).tobytes())
        if h.hexdigest() != legacy:
            raise GGUFFormatError(f"{path} is corrupted: the tensor data does not match its SHA-256 ({legacy[:12]}…)")
        warnings.warn(f"{path}: written by an older bitdistill; its tensor data is checked, its metadata is not "
                      "(re-export to cover both)", ForeignGGUFWarning, stacklevel=3)
        return "legacy"
    if _is_ours(reader):
        raise GGUFFormatError(f"{path} is corrupted: a bitdistill GGUF without its {CHECKSUM_KEY} key "
                              "(the key or its name was damaged)")
    warnings.warn(f"{path}: a foreign GGUF (no {CHECKSUM_KEY}); read without an integrity check",
                  ForeignGGUFWarning, stacklevel=3)
    return "foreign"


def check_gguf(path: str | Path, *, expect_arch: str | None = None, require_checksum: bool = False) -> GGUFCheck:
    """Open and validate ``path``; :class:`GGUFFormatError` when anything is wrong.

    ``require_checksum``: a foreign GGUF (no project checksum) is an error instead of a warning.
    """
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
    status = _verify(path, reader)
    if require_checksum and status != "checked":
        raise GGUFFormatError(f"{path} carries no bitdistill checksum ({status}); refusing to treat it as checked")
    arch = field_value(reader, "general.architecture")
    if expect_arch is not None and arch != expect_arch:
        raise GGUFFormatError(f"{path}: architecture {arch!r}, expected {expect_arch!r}")
    if status != "foreign" and field_value(reader, "general.type") != "adapter":
        have = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
        if arch == ARCH:
            for name, shape in _bitnet_expected_shapes(reader).items():
                if name not in have:
                    raise GGUFFormatError(f"{path}: tensor {name} missing")
                if have[name] != shape:
                    raise GGUFFormatError(f"{path}: tensor {name} has shape {have[name]}, the metadata implies {shape}")
        elif arch in graph_names():
            n_layer = int(field_value(reader, f"{arch}.block_count") or 0)
            needed = [tensor_name(T.TOKEN_EMBD), tensor_name(T.OUTPUT_NORM)]
            needed += [tensor_name(kind, i) for i in range(n_layer) for kind in LAYER_MATRICES.values()]
            missing = [n for n in needed if n not in have]
            if missing:
                raise GGUFFormatError(f"{path}: tensor {missing[0]} missing")
    return GGUFCheck(reader=reader, checked=status == "checked", status=status)


def read_gguf_checked(path: str | Path, *, expect_arch: str | None = None, require_checksum: bool = False
                      ) -> gguf.GGUFReader:
    """A validated ``GGUFReader`` for ``path`` (see :func:`check_gguf`)."""
    return check_gguf(path, expect_arch=expect_arch, require_checksum=require_checksum).reader
