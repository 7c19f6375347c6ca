"""Data pipeline: text sources, deterministic splits, BPE tokenizer, packed token blocks and loaders."""

from bitnet.data.corpus import (
    PYTHON_DOCS_DIR,
    clean_rst,
    iter_python_docs,
    python_docs_available,
    python_docs_source,
)
from bitnet.data.errors import DataError
from bitnet.data.loader import BlockLoader, iter_eval_batches
from bitnet.data.packing import PackedDataset, build_packed_dataset
from bitnet.data.sources import Document, TextSource, iter_documents, source_digest
from bitnet.data.splits import split_documents, split_of
from bitnet.data.tokenizer import EOT, tokenizer_digest, train_bpe_tokenizer

__all__ = [
    "EOT",
    "PYTHON_DOCS_DIR",
    "BlockLoader",
    "DataError",
    "Document",
    "PackedDataset",
    "TextSource",
    "build_packed_dataset",
    "clean_rst",
    "iter_documents",
    "iter_eval_batches",
    "iter_python_docs",
    "python_docs_available",
    "python_docs_source",
    "source_digest",
    "split_documents",
    "split_of",
    "tokenizer_digest",
    "train_bpe_tokenizer",
]
