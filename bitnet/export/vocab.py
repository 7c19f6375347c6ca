"""Tokenizer metadata for llama.cpp from a Hugging Face byte-level BPE tokenizer.

llama.cpp's ``gpt2`` tokenizer model is byte-level BPE: the token strings (in the byte-to-unicode alphabet),
their types, the merges and a named pre-tokenizer (the regex that splits text before BPE). Only a tokenizer
whose pre-tokenization llama.cpp reproduces gets exported; anything else is a clear error
(:class:`~bitnet.export.errors.UnsupportedExportError`), because a vocabulary that tokenizes differently would
load and silently produce other token ids.

The merges and the special-token ids are read with the ``gguf`` package's own ``SpecialVocab`` (the same code
llama.cpp's converter uses); whether BOS/EOS are added is taken from what the HF tokenizer actually does.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from bitnet.export.errors import UnsupportedExportError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# pre_tokenizer specs that llama.cpp reproduces, mapped to its ``tokenizer.ggml.pre`` name
_GPT2_BYTELEVEL = {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}


@dataclass
class VocabMetadata:
    """Everything ``tokenizer.ggml.*`` holds for a byte-level BPE vocabulary."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab
    n_real: int  # tokens the HF tokenizer knows; the rest are padding rows of the embedding
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)


def _parts(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A tokenizers component as a flat list (a ``Sequence`` is its members; none is an empty list)."""
    if not spec:
        return []
    members = spec.get("pretokenizers") or spec.get("decoders") or spec.get("normalizers")
    if spec.get("type") == "Sequence":
        return [p for m in members or [] for p in _parts(m)]
    return [spec]


def _is_gpt2_byte_level(part: dict[str, Any]) -> bool:
    return part.get("type") == "ByteLevel" and all(part.get(k, False) == v for k, v in _GPT2_BYTELEVEL.items())


def _pre_tokenizer_name(spec: dict[str, Any], explicit: str | None) -> str:
    if explicit:
        return explicit
    pre = _parts(spec.get("pre_tokenizer"))
    if not _parts(spec.get("normalizer")):
        if len(pre) == 1 and _is_gpt2_byte_level(pre[0]):
            return "gpt-2"
        # SmolLM's tokenizer.json: every digit its own piece, then the GPT-2 regex (llama.cpp "smollm")
        if (len(pre) == 2 and pre[0] == {"type": "Digits", "individual_digits": True}
                and _is_gpt2_byte_level(pre[1])):
            return "smollm"
    raise UnsupportedExportError(
        f"cannot tell which llama.cpp pre-tokenizer reproduces this tokenizer's pre_tokenizer "
        f"{json.dumps(spec.get('pre_tokenizer'))[:120]}; pass tokenizer_pre=<llama.cpp name> if you know it"
    )


def _check_byte_level_bpe(spec: dict[str, Any]) -> None:
    """BPE over the byte-to-unicode alphabet, decoded back to bytes: llama.cpp's ``gpt2`` tokenizer model.

    ``byte_fallback`` (set by transformers when it rebuilds a GGUF's ``gpt2`` vocabulary) is harmless under a
    ByteLevel pre-tokenizer when the vocabulary has no ``<0xNN>`` byte tokens: a piece that is not a token then falls
    back to the unknown token, exactly as without the flag (SmolLM2 lacks 21 of the 256 byte symbols, the bytes
    that valid UTF-8 never holds and a few control bytes, in its original tokenizer as well).
    """
    model = spec.get("model") or {}
    byte_level_pre = any(p.get("type") == "ByteLevel" for p in _parts(spec.get("pre_tokenizer")))
    byte_level_dec = any(p.get("type") == "ByteLevel" for p in _parts(spec.get("decoder")))
    byte_tokens = any(f"<0x{b:02X}>" in (model.get("vocab") or {}) for b in range(256))
    fallback_fires = bool(model.get("byte_fallback")) and byte_tokens
    if model.get("type") != "BPE" or not byte_level_pre or not byte_level_dec or fallback_fires:
        raise UnsupportedExportError(
            f"only byte-level BPE tokenizers are exported (llama.cpp 'gpt2'); got model {model.get('type')!r} "
            f"(byte_fallback={bool(model.get('byte_fallback'))}) with pre-tokenizer "
            f"{[p.get('type') for p in _parts(spec.get('pre_tokenizer'))]} and decoder "
            f"{[p.get('type') for p in _parts(spec.get('decoder'))]}"
        )


def _adds(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding with special tokens prepends BOS / appends EOS (what the HF tokenizer really does)."""
    probe = "Hello world"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1 : 1 + len(plain)] == plain
    add_eos = eos is not None and len(full) > len(plain) + int(add_bos) and full[-1] == eos
    return add_bos, add_eos


def vocab_metadata(
    tokenizer: PreTrainedTokenizerBase, n_vocab: int, *, tokenizer_pre: str | None = None
) -> VocabMetadata:
    """Token list (padded to the embedding's ``n_vocab`` rows), types, merges and special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    _check_byte_level_bpe(spec)
    pre = _pre_tokenizer_name(spec, tokenizer_pre)
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise UnsupportedExportError(f"the tokenizer has {len(vocab)} tokens but the embedding only {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    with tempfile.TemporaryDirectory(prefix="bitdistill-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise UnsupportedExportError("the BPE tokenizer has no merges")
    add_bos, add_eos = _adds(tokenizer)
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = add_eos
    return VocabMetadata(
        tokens=tokens, token_types=[int(t) for t in types], pre=pre, special=special, n_real=len(vocab)
    )
