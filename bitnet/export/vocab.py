"""Tokenizer metadata for llama.cpp from a Hugging Face fast tokenizer: byte-level BPE or SentencePiece BPE.

llama.cpp has two tokenizer models for the families we export, and a vocabulary is written as one of them only
when llama.cpp then tokenizes exactly as the HF tokenizer does; anything else is a one-line
:class:`~bitnet.export.errors.UnsupportedExportError`, because a vocabulary that tokenizes differently would load
and silently produce other token ids.

- ``gpt2`` (byte-level BPE: GPT-2, SmolLM, Llama 3, Qwen2/2.5/3): token strings in the byte-to-unicode alphabet,
  the merges and a named pre-tokenizer (``tokenizer.ggml.pre``: the regexes llama.cpp splits text with before BPE).
  The name is looked up in :data:`BYTE_LEVEL_PRE_TOKENIZERS` by the tokenizer's normalizer and pre-tokenizer exactly
  as the ``tokenizers`` library serialises them (every field that changes tokenization compared, the Split regex
  string included) and by the BPE model's ``ignore_merges``; never by the model type. ``tokenizer_pre`` overrides
  the lookup.
- ``llama`` (SentencePiece BPE: Llama 2, Mistral 7B): ``▁`` for spaces, ``<0xNN>`` byte tokens for everything
  else, token scores and types. llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation
  is the vocabulary token of the highest score; HF's BPE merges the adjacent pair of the lowest merge rank. The
  scores are derived from the merge ranks (a token's score is minus the rank of its first merge), which makes the
  two the same whenever the merges are the closed, grouped set a SentencePiece vocabulary implies (every split of a
  token into two tokens is a merge, and the merges of one token are adjacent): that is checked, and refused if not.

Two known differences are accepted, logged and documented (docs/export.md, "Tokenizers"): llama.cpp does not
NFC-normalize (Qwen: exact on NFC text; llama.cpp's own converter writes such vocabularies too), and, like
sentencepiece, it always prepends the SentencePiece space where HF's Metaspace skips it for text that already starts
with a space.

Merges and special-token ids are read with the ``gguf`` package's own ``SpecialVocab`` (the code llama.cpp's
converter uses); whether BOS/EOS are added is taken from what the HF tokenizer actually does.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gguf

from bitnet.export.errors import UnsupportedExportError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("bitdistill.export")

# The split regexes as the families' tokenizer.json files and transformers' own classes (Qwen2Tokenizer's
# PRETOKENIZE_REGEX) spell them; llama.cpp's LLAMA3 / QWEN2 pre-types implement exactly these.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

SPM = "▁"  # SentencePiece's whitespace symbol (U+2581)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

Part = dict[str, Any]

# the fields of each tokenizers component that change tokenization (trim_offsets only moves offsets: ignored);
# a component type not listed here is compared whole, so it never matches a table entry by accident
_FIELDS: dict[str, tuple[str, ...]] = {
    "ByteLevel": ("add_prefix_space", "use_regex"),
    "Split": ("pattern", "behavior", "invert"),
    "Digits": ("individual_digits",),
    "Metaspace": ("replacement", "prepend_scheme", "split"),
    "Prepend": ("prepend",),
    "Replace": ("pattern", "content"),
    "Strip": ("content", "start", "stop"),
    "NFC": (),
    "ByteFallback": (),
    "Fuse": (),
}
_DEFAULTS: dict[str, Part] = {"ByteLevel": {"add_prefix_space": True, "use_regex": True}}


def _byte_level(*, use_regex: bool) -> Part:
    return {"type": "ByteLevel", "add_prefix_space": False, "use_regex": use_regex}


def _split(regex: str) -> Part:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _replace(old: str, new: str) -> Part:
    return {"type": "Replace", "pattern": {"String": old}, "content": new}


class ByteLevelPre(NamedTuple):
    """One llama.cpp pre-tokenizer and the HF normalizer + pre-tokenizer (+ ``ignore_merges``) it reproduces."""

    name: str
    normalizer: tuple[Part, ...]
    pre_tokenizer: tuple[Part, ...]
    ignore_merges: bool
    note: str = ""


# llama.cpp src/llama-vocab.cpp (llama-cpp-python 0.3.36's vendored copy): "gpt-2" → GPT2 regex; "smollm" → \p{N},
# then the GPT-2 regex; "llama-bpe" → LLAMA3 regex with ignore_merges; "smaug-bpe" → the same regex without it;
# "qwen2" → QWEN2 regex. llama.cpp never normalizes: Qwen's NFC is exact only on NFC text.
BYTE_LEVEL_PRE_TOKENIZERS: tuple[ByteLevelPre, ...] = (
    ByteLevelPre("gpt-2", (), (_byte_level(use_regex=True),), ignore_merges=False),
    ByteLevelPre("smollm", (), ({"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)),
                 ignore_merges=False),
    ByteLevelPre("llama-bpe", (), (_split(LLAMA3_REGEX), _byte_level(use_regex=False)), ignore_merges=True),
    ByteLevelPre("smaug-bpe", (), (_split(LLAMA3_REGEX), _byte_level(use_regex=False)), ignore_merges=False),
    ByteLevelPre("qwen2", ({"type": "NFC"},), (_split(QWEN2_REGEX), _byte_level(use_regex=False)),
                 ignore_merges=False, note="llama.cpp does not NFC-normalize: exact on NFC text"),
    ByteLevelPre("qwen2", (), (_split(QWEN2_REGEX), _byte_level(use_regex=False)), ignore_merges=False),
)
SUPPORTED_PRE_TOKENIZERS = tuple(dict.fromkeys(p.name for p in BYTE_LEVEL_PRE_TOKENIZERS))

# SentencePiece-style whitespace handling → llama.cpp's add_space_prefix. transformers 4 wrote the legacy normalizer
# form into tokenizer.json; transformers 5's LlamaTokenizer rebuilds a Metaspace pre-tokenizer (split=False: the
# whole text is one word, as in llama.cpp). llama.cpp, like sentencepiece and Prepend, always adds the '▁'; Metaspace
# adds it only when the text does not already start with a space ("first": and not after a special token).
_METASPACE_NOTE = "text that starts with a space gets one more '▁' in llama.cpp than in HF's Metaspace"
_SPM_WHITESPACE: tuple[tuple[tuple[Part, ...], tuple[Part, ...], bool, str], ...] = (
    (({"type": "Prepend", "prepend": SPM}, _replace(" ", SPM)), (), True, ""),
    ((_replace(" ", SPM),), (), False, ""),
    *(((), ({"type": "Metaspace", "replacement": SPM, "prepend_scheme": scheme, "split": False},), prefix, note)
      for scheme, prefix, note in (("always", True, _METASPACE_NOTE), ("first", True, _METASPACE_NOTE),
                                   ("never", False, ""))),
)
_SPM_DECODER = (_replace(SPM, " "), {"type": "ByteFallback"}, {"type": "Fuse"})
_SPM_STRIP = {"type": "Strip", "content": " ", "start": 1, "stop": 0}


class TokenizerKind(NamedTuple):
    """What the GGUF says about the tokenizer: llama.cpp's tokenizer model and pre-tokenizer name."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    add_space_prefix: bool | None = None  # SentencePiece only


@dataclass
class VocabMetadata:
    """Everything ``tokenizer.ggml.*`` holds for the vocabulary."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab
    n_real: int  # tokens the HF tokenizer knows; the rest are padding rows of the embedding
    model: str = "gpt2"
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def _parts(spec: Part | None) -> list[Part]:
    """A tokenizers component as a flat list (a ``Sequence`` is its members; none is an empty list)."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        members = spec.get("pretokenizers") or spec.get("decoders") or spec.get("normalizers") or []
        return [p for m in members for p in _parts(m)]
    return [spec]


def _relevant(part: Part) -> Part:
    """The part reduced to its type and the fields that change tokenization (defaults filled in)."""
    kind = part.get("type", "")
    if kind not in _FIELDS:
        return part
    defaults = _DEFAULTS.get(kind, {})
    return {"type": kind, **{k: part.get(k, defaults.get(k)) for k in _FIELDS[kind]}}


def _signature(spec: Part | None) -> tuple[Part, ...]:
    return tuple(_relevant(p) for p in _parts(spec))


def _short(spec: Any, limit: int = 160) -> str:
    text = json.dumps(spec, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_pre(spec: Part) -> UnsupportedExportError:
    return UnsupportedExportError(
        f"cannot tell which llama.cpp pre-tokenizer reproduces this byte-level BPE tokenizer (normalizer "
        f"{_short(spec.get('normalizer'), 60)}, pre_tokenizer {_short(spec.get('pre_tokenizer'))}, ignore_merges "
        f"{bool((spec.get('model') or {}).get('ignore_merges'))}): it matches none of "
        f"{', '.join(SUPPORTED_PRE_TOKENIZERS)} exactly; pass tokenizer_pre=<llama.cpp name> (--tokenizer-pre, "
        f"export.tokenizer_pre) if you know llama.cpp reproduces it"
    )


def _byte_level_pre(spec: Part) -> ByteLevelPre:
    normalizer, pre = _signature(spec.get("normalizer")), _signature(spec.get("pre_tokenizer"))
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges"))
    for entry in BYTE_LEVEL_PRE_TOKENIZERS:
        if (normalizer, pre, ignore_merges) == (entry.normalizer, entry.pre_tokenizer, entry.ignore_merges):
            return entry
    raise _refuse_pre(spec)


def _spm_whitespace(spec: Part) -> tuple[bool, str]:
    """SentencePiece BPE as llama.cpp's ``llama`` model tokenizes it: ``add_space_prefix`` and a caveat."""
    normalizer, pre = _signature(spec.get("normalizer")), _signature(spec.get("pre_tokenizer"))
    for norm_form, pre_form, prefix, note in _SPM_WHITESPACE:
        if (normalizer, pre) == (norm_form, pre_form):
            decoder = _signature(spec.get("decoder"))
            if decoder != _SPM_DECODER + ((_SPM_STRIP,) if prefix else ()):
                raise UnsupportedExportError(
                    f"SentencePiece BPE tokenizer with decoder {_short(spec.get('decoder'))}: llama.cpp's 'llama' "
                    f"model decodes as Replace('{SPM}', ' '), ByteFallback, Fuse{', Strip(1 space)' if prefix else ''}"
                )
            return prefix, note
    raise UnsupportedExportError(
        f"SentencePiece BPE tokenizer with normalizer {_short(spec.get('normalizer'), 80)} and pre_tokenizer "
        f"{_short(spec.get('pre_tokenizer'), 80)}: llama.cpp's 'llama' model only reproduces '{SPM}' for spaces over "
        f"the whole text (Prepend + Replace normalizers, or Metaspace with split=false)"
    )


def _model_kind(spec: Part) -> str:
    """``gpt2`` or ``llama``: which of llama.cpp's tokenizer models the HF tokenizer's model can be."""
    model = spec.get("model") or {}
    vocab = model.get("vocab") or {}
    pre_types = [p.get("type") for p in _parts(spec.get("pre_tokenizer"))]
    dec_types = [p.get("type") for p in _parts(spec.get("decoder"))]
    byte_level = "ByteLevel" in pre_types and "ByteLevel" in dec_types
    byte_tokens = sum(f"<0x{b:02X}>" in vocab for b in range(256))
    fallback = bool(model.get("byte_fallback"))
    got = (f"got model {model.get('type')!r} (byte_fallback={fallback}, {byte_tokens} <0xNN> tokens) with "
           f"pre-tokenizer {pre_types} and decoder {dec_types}")
    if model.get("type") == "BPE" and not (model.get("dropout") or model.get("continuing_subword_prefix")
                                           or model.get("end_of_word_suffix")):
        # byte_fallback (set by transformers when it rebuilds a GGUF's gpt2 vocabulary) is harmless under a
        # ByteLevel pre-tokenizer when there are no <0xNN> tokens to fall back to: a piece that is not a token then
        # becomes the unknown token exactly as without the flag (SmolLM2 lacks 21 of the 256 byte symbols)
        if byte_level and not (fallback and byte_tokens):
            return "gpt2"
        if fallback and not byte_level and "ByteLevel" not in pre_types + dec_types:
            if byte_tokens != 256:
                raise UnsupportedExportError(f"SentencePiece BPE tokenizer with {byte_tokens} of the 256 <0xNN> byte "
                                             f"tokens: llama.cpp's 'llama' model needs all of them for byte fallback")
            return "llama"
    raise UnsupportedExportError(
        "only byte-level BPE (llama.cpp 'gpt2') and SentencePiece BPE with byte fallback (llama.cpp 'llama') "
        f"tokenizers are exported; {got}"
    )


def _spec(tokenizer: PreTrainedTokenizerBase) -> Part:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    return json.loads(backend.to_str())


def _kind(spec: Part, tokenizer_pre: str | None) -> tuple[TokenizerKind, str]:
    model = _model_kind(spec)
    if model == "llama":
        if tokenizer_pre not in (None, "default"):
            raise UnsupportedExportError(
                f"tokenizer_pre={tokenizer_pre!r} names a byte-level BPE pre-tokenizer, but this tokenizer is "
                "SentencePiece BPE (llama.cpp 'llama', which has none)"
            )
        prefix, note = _spm_whitespace(spec)
        vocab = spec["model"].get("vocab") or {}
        spm_scores(vocab, _merge_pairs(spec["model"]), max(vocab.values(), default=-1) + 1)  # refuses what differs
        return TokenizerKind("llama", "default", prefix), note
    if tokenizer_pre:
        return TokenizerKind("gpt2", tokenizer_pre), f"pre-tokenizer {tokenizer_pre!r} given explicitly, not checked"
    entry = _byte_level_pre(spec)
    return TokenizerKind("gpt2", entry.name), entry.note


def tokenizer_kind(tokenizer: PreTrainedTokenizerBase, *, tokenizer_pre: str | None = None) -> TokenizerKind:
    """The llama.cpp tokenizer model and pre-tokenizer that reproduce ``tokenizer``, or a one-line
    :class:`UnsupportedExportError`; cheap enough to refuse a run before training. ``tokenizer_pre`` is the
    user's override of the pre-tokenizer name for byte-level BPE (taken as given)."""
    return _kind(_spec(tokenizer), tokenizer_pre)[0]


def _merge_pairs(model: Part) -> list[tuple[str, str]]:
    merges = model.get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]  # type: ignore[misc]


def spm_scores(vocab: dict[str, int], merges: list[tuple[str, str]], n_vocab: int) -> list[float]:
    """Scores under which llama.cpp's SPM merge loop (highest-scoring vocabulary token among adjacent pairs, leftmost
    first) applies HF's merges in rank order: ``-(1 + rank of the token's first merge)``, 0 for tokens no merge
    makes. Exact when every merge makes a token, the merges of one token are adjacent in rank and every split of a
    token into two tokens is a merge (llama.cpp would merge any such pair); refused otherwise."""
    first: dict[str, int] = {}
    previous = None
    merge_set = set(merges)
    for rank, (a, b) in enumerate(merges):
        token = a + b
        if token not in vocab or a not in vocab or b not in vocab:
            raise UnsupportedExportError(f"merge {a!r} + {b!r} of the SentencePiece BPE tokenizer is not a token")
        if token != previous:
            if token in first:
                raise UnsupportedExportError(
                    f"the merges making {token!r} are not adjacent in rank (ranks {first[token]} and {rank}): no "
                    "SentencePiece token scores make llama.cpp merge in HF's order"
                )
            first[token] = rank
            previous = token
    for token in vocab:
        for i in range(1, len(token)):
            pair = (token[:i], token[i:])
            if pair[0] in vocab and pair[1] in vocab and pair not in merge_set:
                raise UnsupportedExportError(
                    f"{pair[0]!r} + {pair[1]!r} is the token {token!r} but not one of the SentencePiece BPE "
                    "tokenizer's merges: llama.cpp's 'llama' model would merge it, HF does not"
                )
    scores = [0.0] * n_vocab
    for token, rank in first.items():
        scores[vocab[token]] = -float(rank + 1)
    return scores


def _adds(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding with special tokens prepends BOS / appends EOS (what the HF tokenizer really does)."""
    probe = "Hello world"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1 : 1 + len(plain)] == plain
    add_eos = eos is not None and len(full) > len(plain) + int(add_bos) and full[-1] == eos
    return add_bos, add_eos


def _token_types(tokenizer: PreTrainedTokenizerBase, by_id: dict[int, str], n_vocab: int,
                 spm: bool) -> tuple[list[str], list[int]]:
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id if spm else None
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif spm and _BYTE_TOKEN.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def vocab_metadata(
    tokenizer: PreTrainedTokenizerBase, n_vocab: int, *, tokenizer_pre: str | None = None
) -> VocabMetadata:
    """Token list (padded to the embedding's ``n_vocab`` rows), types, merges or scores, and special ids."""
    spec = _spec(tokenizer)
    kind, note = _kind(spec, tokenizer_pre)
    if note:
        log.warning("GGUF tokenizer %s/%s: %s", kind.model, kind.pre, note)
    spm = kind.model == "llama"
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values(), default=0) >= n_vocab:
        raise UnsupportedExportError(f"the tokenizer has {len(vocab)} tokens but the embedding only {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = _token_types(tokenizer, by_id, n_vocab, spm)
    scores = spm_scores(vocab, _merge_pairs(spec.get("model") or {}), n_vocab) if spm else None
    with tempfile.TemporaryDirectory(prefix="bitdistill-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=not spm, n_vocab=n_vocab)
    if not spm and not special.merges:
        raise UnsupportedExportError("the BPE tokenizer has no merges")
    add_bos, add_eos = _adds(tokenizer)
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = add_eos
    return VocabMetadata(
        tokens=tokens, token_types=types, pre=kind.pre, special=special, n_real=len(vocab), model=kind.model,
        scores=scores, add_space_prefix=kind.add_space_prefix, notes=[note] if note else [],
    )
