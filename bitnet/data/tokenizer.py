"""Byte-level BPE tokenizer training (``tokenizers``) wrapped as a ``transformers`` fast tokenizer, and
:func:`load_tokenizer`, the one way a tokenizer is read from a user's path (every malformed one is one line)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitnet.data.errors import DataError
from bitnet.io import atomic_dir, check_replaceable, sha256_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOT = "<|endoftext|>"
_MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>


TOKENIZER_MARKER = "tokenizer_config.json"
# the files that hold a vocabulary in the formats transformers reads (fast, SentencePiece, BPE/WordPiece vocab)
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model")
# the JSON files of a tokenizer directory, each a JSON object when it is there
_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")


class TokenizerError(DataError):
    """A tokenizer directory with missing, truncated or malformed files (one line, no traceback)."""


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(source)`` for a local directory or a hub id. A local directory's JSON files
    are checked first (:func:`check_tokenizer_files`), and any failure to load it is a :class:`TokenizerError`:
    transformers and tokenizers fail on malformed files with ``KeyError``, ``TypeError``, a bare ``Exception`` or
    a ``ValueError`` of several lines. A hub id that cannot be fetched raises ``OSError`` as before (the caller
    decides whether that is fatal)."""
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    local = path.is_dir()
    if local:
        check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(str(path) if local else str(source))
    except Exception as e:  # noqa: BLE001 — see the docstring: malformed files raise anything
        if isinstance(e, OSError) and not local:
            raise
        raise TokenizerError(f"cannot load the tokenizer {source}: {_reason(e, path if local else None)}") from e


def _reason(e: Exception, local: Path | None) -> str:
    """Why a tokenizer did not load, in one line: no vocabulary file at all in a local directory, else the first
    line of the error (with its type where the message alone is a bare key or index)."""
    if local is not None and not any((local / f).is_file() for f in VOCAB_FILES):
        return f"no tokenizer files ({', '.join(VOCAB_FILES[:4])}, ...)"
    text = str(e) if isinstance(e, OSError | ValueError) else f"{type(e).__name__}: {e}"
    return (text.strip().splitlines() or [type(e).__name__])[0].rstrip(": ")


def check_tokenizer_files(path: Path) -> None:
    """Refuse a tokenizer directory whose JSON files are truncated or not JSON objects, or whose ``tokenizer.json``
    lacks what every ``tokenizers`` serialization holds: a ``model`` object and an ``added_tokens`` list."""
    for name in _JSON_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            spec = json.loads(file.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{file} is not valid JSON (truncated or corrupt?): {e}") from None
        if not isinstance(spec, dict):
            raise TokenizerError(f"{file} must hold a JSON object, not a {type(spec).__name__}")
        if name == "tokenizer.json" and not (isinstance(spec.get("model"), dict)
                                             and isinstance(spec.get("added_tokens"), list)):
            raise TokenizerError(f"{file} is not a tokenizers file: it needs a 'model' object and an 'added_tokens' "
                                 "list")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on ``texts`` and save it atomically to ``out_dir``.

    ``<|endoftext|>`` (id 0) is the bos/eos/unk/pad token; no special tokens are added when encoding.
    The result reloads with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < _MIN_VOCAB:
        raise DataError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + {EOT}), got {vocab_size}")
    if min_frequency < 1:
        raise DataError(f"min_frequency must be >= 1, got {min_frequency}")
    check_replaceable(out_dir, TOKENIZER_MARKER)  # fail before the training, not after
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = [0]
    tok.train_from_iterator(_counting(texts, counter), trainer=trainer)
    if counter[0] == 0:
        raise DataError("cannot train a tokenizer: no non-empty texts")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        clean_up_tokenization_spaces=False,
    )
    with atomic_dir(out_dir, marker=TOKENIZER_MARKER) as tmp:
        fast.save_pretrained(str(tmp))
    return fast


MAX_RUN = 256  # characters without whitespace the BPE trainer sees as one piece (longer runs are cut)
MAX_PIECE = 1 << 16  # characters per string handed to the trainer


_LONG_RUN = re.compile(r"\S{" + str(MAX_RUN + 1) + ",}")


def bounded_pieces(text: str) -> Iterator[str]:
    """``text`` cut so that tokenizer training stays bounded in time and memory: runs of more than ``MAX_RUN``
    non-whitespace characters (minified data, base64, a corpus without spaces) are cut into ``MAX_RUN`` pieces and
    strings longer than ``MAX_PIECE`` are split at whitespace. Ordinary prose passes through unchanged."""
    start = 0
    for m in _LONG_RUN.finditer(text):
        yield from _split_long(text[start:m.start()])
        run = m.group()
        for i in range(0, len(run), MAX_RUN):
            yield run[i:i + MAX_RUN]
        start = m.end()
    yield from _split_long(text[start:])


def _split_long(text: str) -> Iterator[str]:
    while len(text) > MAX_PIECE:
        cut = max(text.rfind(" ", 0, MAX_PIECE), text.rfind("\n", 0, MAX_PIECE))
        cut = cut if cut > 0 else MAX_PIECE
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _counting(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    for t in texts:
        if t:
            counter[0] += 1
            yield from bounded_pieces(t)


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable hash of a tokenizer's model, normaliser, pre-tokeniser and added tokens (not its padding state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec: dict[str, Any] = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special_tokens"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return sha256_json(spec)
