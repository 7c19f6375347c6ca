"""The offline tiny world: corpus splits, a byte-level BPE tokenizer and packed token datasets.

``build_world`` turns any :class:`~bitnet.data.TextSource` (by default the Python documentation that
Debian's ``python3.11-doc`` ships) into::

    world/
      tokenizer/                 HF tokenizer (byte-level BPE trained on the train split)
      data/{train,validation,test}/   packed token blocks (tokens.npy + meta.json)
      world.json                 config, corpus digest and statistics (written last)

A world directory whose ``world.json`` matches the config and corpus digest is reused as it is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedTokenizerBase

from bitnet.data import (
    DataError,
    Document,
    PackedDataset,
    TextSource,
    build_packed_dataset,
    iter_documents,
    source_digest,
    split_documents,
    train_bpe_tokenizer,
)
from bitnet.data.baseline import unigram_perplexity
from bitnet.data.corpus import clean_rst, python_docs_source
from bitnet.data.tokenizer import TOKENIZER_MARKER, TokenizerError, load_tokenizer, tokenizer_digest
from bitnet.io import atomic_dir, check_replaceable, sha256_json, write_json_atomic

log = logging.getLogger("bitdistill.world")

SPLITS = ("train", "validation", "test")


class WorldConfig(BaseModel):
    """Corpus, splits, tokenizer and block length of a world."""

    model_config = ConfigDict(extra="forbid")

    source: TextSource = Field(default_factory=python_docs_source)
    clean_rst: bool = Field(default=True, description="strip pure reStructuredText markup lines")
    split_fractions: tuple[float, float, float] = (0.96, 0.02, 0.02)
    split_seed: int = 0
    tokenizer: str | None = Field(
        default=None, description="HF tokenizer (local dir or hub id) to use instead of training a BPE tokenizer"
    )
    vocab_size: int = Field(default=4096, ge=260, description="size of the trained BPE tokenizer")
    seq_len: int = Field(default=256, ge=8)

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] == 0:
            raise ValueError(f"split_fractions must be non-negative, sum to 1 and give train a share, got {v}")
        return v


@dataclass(frozen=True)
class World:
    root: Path
    info: dict[str, Any]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The world's tokenizer; missing or malformed files are a one-line :class:`~bitnet.data.DataError`."""
        return load_tokenizer(self.tokenizer_dir)

    @property
    def seq_len(self) -> int:
        return int(self.info["config"]["seq_len"])

    def dataset(self, split: str) -> PackedDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return PackedDataset(self.root / "data" / split)


def open_world(path: str | Path) -> World:
    """Open a built world; a directory without a valid world.json is reported as not built."""
    root = Path(path)
    info_file = root / "world.json"
    if not info_file.is_file():
        raise DataError(f"{root} is not a built world (world.json missing); run `bitdistill world build`")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{info_file}: malformed JSON ({e})") from e
    return World(root=root, info=info)


def _documents(cfg: WorldConfig, skipped: list[str] | None = None) -> list[Document]:
    docs = list(iter_documents(cfg.source, skipped=skipped))
    if cfg.clean_rst:
        docs = [Document(id=d.id, text=clean_rst(d.text)) for d in docs]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError("the corpus has no non-empty documents")
    return docs


def _load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """An HF tokenizer (directory or hub id) or a teacher source's (a named source or a GGUF file)."""
    from bitnet.pretrained import load_teacher_tokenizer

    try:
        tokenizer = load_teacher_tokenizer(name_or_path)
    except TokenizerError:
        raise  # it names the directory and the file already
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no EOS token to separate documents")
    return tokenizer


def build_world(cfg: WorldConfig, out_dir: str | Path, *, force: bool = False) -> World:
    """Build (or reuse) the world for ``cfg`` under ``out_dir``.

    The world is built in a temporary directory next to ``out_dir`` and replaces it only when complete: a failed
    build (e.g. a corpus too small for ``seq_len``) leaves an existing world as it was. A directory that is not a
    world (no ``world.json``) is refused, never overwritten.
    """
    root = Path(out_dir)
    key = sha256_json({"config": cfg.model_dump(mode="json"), "source": source_digest(cfg.source)})
    if not force and (root / "world.json").is_file():
        world = open_world(root)
        if world.info.get("key") == key:
            return world
    check_replaceable(root, "world.json")
    skipped: list[str] = []
    docs = _documents(cfg, skipped)
    with atomic_dir(root, marker="world.json") as tmp:
        info = _build(cfg, docs, key, tmp)
        info["skipped_files"] = len(skipped)
        write_json_atomic(tmp / "world.json", info)
    return World(root=root, info=info)


def _build(cfg: WorldConfig, docs: list[Document], key: str, root: Path) -> dict[str, Any]:
    splits = split_documents(docs, cfg.split_fractions, cfg.split_seed)
    for name, frac in zip(SPLITS, cfg.split_fractions):
        if frac > 0 and not splits.get(name):
            raise DataError(f"split {name!r} is empty: the corpus has too few documents ({len(docs)})")
    if cfg.tokenizer is None:
        tokenizer = train_bpe_tokenizer((d.text for d in splits["train"]), cfg.vocab_size, root / "tokenizer")
    else:
        tokenizer = _load_tokenizer(cfg.tokenizer)
        with atomic_dir(root / "tokenizer", marker=TOKENIZER_MARKER) as tmp:
            tokenizer.save_pretrained(tmp)
    datasets = {
        name: build_packed_dataset(splits[name], tokenizer, root / "data" / name, cfg.seq_len)
        for name in SPLITS
        if splits.get(name)
    }
    train_tokens = datasets["train"].tokens
    test = datasets.get("test") or datasets["validation"]
    unigram = unigram_perplexity(train_tokens, test.get_batch(range(test.num_blocks)).numpy(), len(tokenizer))
    return {
        "key": key,
        "config": cfg.model_dump(mode="json"),
        "vocab_size": len(tokenizer),
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "splits": {
            name: {
                "documents": len(splits[name]),
                "bytes": sum(len(d.text.encode()) for d in splits[name]),
                "tokens": ds.n_tokens,
                "blocks": ds.num_blocks,
                "digest": ds.digest,
            }
            for name, ds in datasets.items()
        },
        "unigram_test_ppl": unigram,
    }


def check_seq_len_fits(seq_len: int, model_config: Any, what: str) -> None:
    """Refuse blocks of ``seq_len`` tokens for a model with fewer positions (its ``max_position_embeddings``):
    it would train and evaluate past the context it was made for without a word. ``model_config`` is a
    transformers config (without weights); one without ``max_position_embeddings`` is not checked."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and seq_len > positions:
        raise DataError(f"the world's seq_len ({seq_len}) exceeds the {what}'s max_position_embeddings "
                        f"({positions}): build the world with --seq-len {positions} or less")


def world_tokenizer_digest(world: World) -> str:
    """The identity of the world's tokenizer (vocab, merges, special tokens); recomputed for older worlds."""
    return str(world.info.get("tokenizer_digest") or tokenizer_digest(world.tokenizer()))


def check_tokenizer_matches(world: World, model_dir: str | Path, what: str = "teacher") -> None:
    """Refuse a world tokenized with another tokenizer than the model's (even at equal vocab size): the token ids
    would silently mean other strings. A model directory without a tokenizer cannot be checked (a warning)."""
    d = Path(model_dir)
    if d.is_dir() and not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        log.warning("%s %s has no tokenizer files: cannot check that the world %s uses its tokenizer",
                    what, model_dir, world.root)
        return
    try:
        theirs = tokenizer_digest(load_tokenizer(model_dir))
    except (OSError, ValueError) as e:
        if not d.exists():  # a hub id whose tokenizer cannot be fetched here: the model load will say more
            log.warning("cannot load the %s's tokenizer %s to check the world against it: %s", what, model_dir,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return
        raise DataError(f"cannot load the {what}'s tokenizer from {d}: {str(e).splitlines()[0]}") from e
    if theirs != world_tokenizer_digest(world):
        raise DataError(f"the world {world.root} was tokenized with another tokenizer than the {what}'s ({d}): "
                        f"token ids would mean other text; build the world with --tokenizer {d}")
