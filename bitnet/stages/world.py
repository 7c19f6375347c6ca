"""Stage ``world``: corpus → splits → tokenizer → packed token blocks (``bitnet.world``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitnet.data import source_digest
from bitnet.stages.base import Inputs, Stage
from bitnet.world import WorldConfig, build_world


def run(cfg: WorldConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    info = build_world(cfg, out).info
    return {k: info[k] for k in ("vocab_size", "splits", "unigram_test_ppl")}


def fingerprint(cfg: WorldConfig) -> dict[str, Any]:
    """The corpus listing (names, sizes, mtimes/etags): a changed corpus rebuilds the world."""
    return {"source": source_digest(cfg.source)}


STAGE = Stage("world", WorldConfig, run, fingerprint=fingerprint,
              help="split the corpus, train/load the tokenizer, pack token blocks")
