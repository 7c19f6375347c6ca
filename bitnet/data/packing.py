"""Tokenise documents into one EOS-separated stream stored as ``tokens.npy`` + ``meta.json``."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bitnet.data.errors import DataError
from bitnet.data.sources import Document
from bitnet.data.tokenizer import tokenizer_digest
from bitnet.io import atomic_dir, sha256_file, sha256_json, write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = "bitnet-packed-v1"
META_FILE = "meta.json"
TOKENS_FILE = "tokens.npy"
_META_INTS = ("seq_len", "n_tokens", "n_docs", "n_blocks", "vocab_size", "eos_token_id")
_META_STRS = ("dtype", "tokenizer_digest", "key", "digest")


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """Smallest unsigned dtype holding ids ``0 .. vocab_size - 1``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class PackedDataset:
    """Read-only, memory-mapped view of a packed token stream as ``n_blocks`` blocks of ``seq_len`` tokens."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        tokens_path = self.path / TOKENS_FILE
        if not tokens_path.is_file():
            raise DataError(f"packed dataset is missing {TOKENS_FILE}: {self.path}")
        try:
            tokens = np.load(tokens_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"corrupt {tokens_path}: {e}") from e
        m = self.meta
        if tokens.ndim != 1 or str(tokens.dtype) != m["dtype"] or tokens.shape[0] != m["n_tokens"]:
            raise DataError(
                f"{tokens_path} does not match {META_FILE}: shape {tokens.shape} dtype {tokens.dtype}, "
                f"expected ({m['n_tokens']},) {m['dtype']}"
            )
        if m["seq_len"] < 1 or m["n_blocks"] != m["n_tokens"] // m["seq_len"] or m["n_blocks"] < 1:
            raise DataError(f"inconsistent {self.path / META_FILE}: seq_len/n_tokens/n_blocks disagree")
        self.tokens: np.ndarray = tokens
        self._blocks = tokens[: m["n_blocks"] * m["seq_len"]].reshape(m["n_blocks"], m["seq_len"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def num_blocks(self) -> int:
        return int(self.meta["n_blocks"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def eos_token_id(self) -> int:
        return int(self.meta["eos_token_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def digest(self) -> str:
        """Content digest: sha256 over the token file's hash and ``seq_len``."""
        return str(self.meta["digest"])

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        n = self.num_blocks
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks")
        return torch.from_numpy(self._blocks[i].astype(np.int64))

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Blocks ``indices`` stacked as a ``LongTensor[len(indices), seq_len]``."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self._blocks[idx].astype(np.int64))

    def verify(self) -> None:
        """Re-hash ``tokens.npy`` and compare with the digest recorded at build time."""
        if sha256_file(self.path / TOKENS_FILE) != self.meta.get("tokens_sha256"):
            raise DataError(f"{self.path / TOKENS_FILE} does not match the sha256 in {META_FILE}")

    def __reduce__(self) -> tuple[type[PackedDataset], tuple[str]]:
        return (PackedDataset, (str(self.path),))

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.path)!r}, blocks={self.num_blocks}, seq_len={self.seq_len})"


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DataError(f"not a packed dataset (no {META_FILE}): {path}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"corrupt {meta_path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"corrupt {meta_path}: not a {FORMAT} meta file")
    bad = [k for k in _META_INTS if not isinstance(meta.get(k), int) or isinstance(meta.get(k), bool)]
    bad += [k for k in _META_STRS if not isinstance(meta.get(k), str)]
    if bad:
        raise DataError(f"corrupt {meta_path}: missing or invalid {', '.join(bad)}")
    return meta


def _as_documents(docs: Iterable[Document] | Iterable[str]) -> Iterator[Document]:
    for i, d in enumerate(docs):
        if isinstance(d, Document):
            yield d
        elif isinstance(d, str):
            yield Document(str(i), d)
        else:
            raise DataError(f"expected Document or str, got {type(d).__name__}")


def _docs_digest(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        for s in (d.id, d.text):
            b = s.encode("utf-8", errors="surrogatepass")
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def _open_cached(out_dir: Path, key: str) -> PackedDataset | None:
    try:
        ds = PackedDataset(out_dir)
    except DataError:
        return None
    return ds if ds.meta.get("key") == key else None


def tokenize_stream(
    docs: Iterable[Document], tokenizer: PreTrainedTokenizerBase, eos_token_id: int, dtype: np.dtype[Any],
    batch_docs: int = 256,
) -> tuple[np.ndarray, int]:
    """Tokenise documents in batches (no special tokens), append EOS to each; return ``(stream, n_docs)``."""
    limit = np.iinfo(dtype).max
    parts: list[np.ndarray] = []
    n_docs = 0
    it = iter(docs)
    while chunk := list(itertools.islice(it, batch_docs)):
        enc = tokenizer(
            [d.text for d in chunk],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        flat = np.fromiter(itertools.chain.from_iterable((*ids, eos_token_id) for ids in enc), dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() > limit):
            raise DataError(f"token id out of range for {dtype}: [{flat.min()}, {flat.max()}]")
        parts.append(flat.astype(dtype))
        n_docs += len(chunk)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return stream, n_docs


def build_packed_dataset(
    docs: Iterable[Document] | Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    seq_len: int,
    key_extra: dict[str, Any] | None = None,
) -> PackedDataset:
    """Pack ``docs`` into ``out_dir`` (atomically), or reuse it if its cache key matches.

    The key hashes the tokenizer digest, EOS id, ``seq_len`` and either ``key_extra`` (then a cache hit
    never iterates ``docs``; e.g. pass ``{"source": source_digest(src)}``) or the ids and texts of the docs.
    """
    out_dir = Path(out_dir)
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos_token; cannot separate documents")
    vocab_size = len(tokenizer)
    tok_digest = tokenizer_digest(tokenizer)
    base = {"format": FORMAT, "tokenizer": tok_digest, "eos": eos, "seq_len": seq_len}
    stream_docs: Iterable[Document]
    if key_extra is not None:
        key = sha256_json({**base, "extra": key_extra})
        stream_docs = _as_documents(docs)
    else:
        stream_docs = list(_as_documents(docs))
        key = sha256_json({**base, "docs": _docs_digest(stream_docs)})
    if (cached := _open_cached(out_dir, key)) is not None:
        return cached

    dtype = token_dtype(vocab_size)
    tokens, n_docs = tokenize_stream(stream_docs, tokenizer, eos, dtype)
    if n_docs == 0:
        raise DataError(f"no documents to pack into {out_dir}")
    n_blocks = tokens.size // seq_len
    if n_blocks == 0:
        raise DataError(f"0 blocks: {tokens.size} tokens from {n_docs} documents is less than seq_len={seq_len}")
    with atomic_dir(out_dir, marker=META_FILE) as tmp:
        np.save(tmp / TOKENS_FILE, tokens, allow_pickle=False)
        tokens_sha = sha256_file(tmp / TOKENS_FILE)
        meta = {
            "format": FORMAT,
            "seq_len": seq_len,
            "n_tokens": int(tokens.size),
            "n_docs": n_docs,
            "n_blocks": n_blocks,
            "dtype": str(dtype),
            "vocab_size": vocab_size,
            "eos_token_id": int(eos),
            "tokenizer_digest": tok_digest,
            "key": key,
            "key_extra": key_extra,
            "tokens_sha256": tokens_sha,
            "digest": sha256_json({"tokens_sha256": tokens_sha, "seq_len": seq_len}),
        }
        write_json_atomic(tmp / META_FILE, meta)
    return PackedDataset(out_dir)
