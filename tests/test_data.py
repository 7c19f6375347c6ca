"""Tests for bitnet.data: sources, splits, tokenizer, packing, loaders and the Python-docs corpus."""

from __future__ import annotations

import itertools
import json
import os
import random
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet.data import (
    EOT,
    PYTHON_DOCS_DIR,
    BlockLoader,
    DataError,
    Document,
    PackedDataset,
    TextSource,
    build_packed_dataset,
    clean_rst,
    iter_documents,
    iter_eval_batches,
    iter_python_docs,
    python_docs_available,
    python_docs_source,
    source_digest,
    split_documents,
    split_of,
    tokenizer_digest,
    train_bpe_tokenizer,
)
from bitnet.data import corpus as corpus_mod
from bitnet.data import packing as packing_mod
from bitnet.data import sources as sources_mod
from bitnet.data.packing import token_dtype
from bitnet.io import OverwriteRefusedError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language that lets you work quickly.",
    "Ternary weights take the values minus one, zero and plus one.",
    "Distillation trains a small student to imitate a large teacher.",
    "Packing concatenates documents into one long token stream.",
]


WORDS = " ".join(SENTENCES).replace(".", "").replace(",", "").split()


def _docs(n: int = 40) -> list[Document]:
    """Deterministic pseudo-random documents (so that packed blocks have distinct contents)."""
    out = []
    for i in range(n):
        rng = random.Random(i)
        out.append(Document(f"doc{i:03d}", f"Doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(5 + i % 11))))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_bpe_tokenizer(SENTENCES * 20, vocab_size=320, out_dir=out), out


@pytest.fixture(scope="module")
def tokenizer(trained):
    return trained[0]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> PackedDataset:
    ds = build_packed_dataset(_docs(60), tokenizer, tmp_path_factory.mktemp("packed") / "ds", seq_len=8)
    assert len(ds) >= 40
    return ds


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text")
    (root / "sub" / "b.txt").write_text("beta text")
    (root / "sub" / "deep" / "d.txt").write_bytes(b"delta \xff bytes")
    (root / "c.md").write_text("not matched by the default glob")
    (root / "blank.txt").write_text("  \n")
    return root


# ---------------------------------------------------------------- sources


def test_dir_source_sorted_relative_ids(corpus_dir: Path) -> None:
    docs = list(iter_documents(TextSource(kind="dir", path=str(corpus_dir))))
    assert [d.id for d in docs] == ["a.txt", "sub/b.txt", "sub/deep/d.txt"]
    assert docs[0].text == "alpha text"
    assert docs[2].text == "delta \ufffd bytes"  # invalid UTF-8 replaced
    top = list(iter_documents(TextSource(kind="dir", path=str(corpus_dir), glob="*")))
    assert [d.id for d in top] == ["a.txt", "c.md"]


def test_fsspec_file_urls(corpus_dir: Path) -> None:
    as_dir = [(d.id, d.text) for d in iter_documents(TextSource(kind="dir", path=str(corpus_dir)))]
    from_url = [(d.id, d.text) for d in iter_documents(TextSource(kind="fsspec", url=f"file://{corpus_dir}"))]
    assert from_url == as_dir
    globbed = iter_documents(TextSource(kind="fsspec", url=f"file://{corpus_dir}/sub/*.txt"))
    assert [d.id for d in globbed] == ["b.txt"]
    single = list(iter_documents(TextSource(kind="fsspec", url=f"file://{corpus_dir}/sub/deep/d.txt")))
    assert [(d.id, d.text) for d in single] == [("d.txt", "delta \ufffd bytes")]


def test_fsspec_memory_url_and_digest() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/bitnet-test-{uuid.uuid4().hex}"
    try:
        fs.pipe(f"{root}/z.txt", b"zulu")
        fs.pipe(f"{root}/x/y.txt", b"yankee")
        fs.pipe(f"{root}/x/skip.bin", b"binary")
        src = TextSource(kind="fsspec", url=f"memory://{root}")
        assert [(d.id, d.text) for d in iter_documents(src)] == [("x/y.txt", "yankee"), ("z.txt", "zulu")]
        d0 = source_digest(src)
        assert source_digest(src) == d0
        fs.pipe(f"{root}/w.txt", b"whiskey")
        assert source_digest(src) != d0
        assert [d.id for d in iter_documents(TextSource(kind="fsspec", url=f"memory://{root}/x/*"))] == [
            "skip.bin",
            "y.txt",
        ]
    finally:
        fs.rm(root, recursive=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source_with_local_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data = tmp_path / "rows.jsonl"
    _write_jsonl(data, [{"body": "first row", "n": 1}, {"body": "", "n": 2}, {"body": "third row", "n": 3}])
    src = TextSource(kind="hf", name="json", data_files=str(data), text_field="body", streaming=streaming)
    docs = list(iter_documents(src))
    assert [(d.id, d.text) for d in docs] == [("train/0", "first row"), ("train/2", "third row")]
    with pytest.raises(DataError, match="no field 'text'"):
        list(iter_documents(src.model_copy(update={"text_field": "text"})))


def test_hf_source_errors_and_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    with pytest.raises(DataError, match="cannot load hf dataset"):
        list(iter_documents(TextSource(kind="hf", name="json", data_files=str(tmp_path / "missing.jsonl"))))
    data = tmp_path / "rows.jsonl"
    _write_jsonl(data, [{"text": ""}])
    src = TextSource(kind="hf", name="json", data_files={"train": [str(data)]})
    with pytest.raises(DataError, match="no documents"):
        list(iter_documents(src))
    d0 = source_digest(src)
    _write_jsonl(data, [{"text": "now there is a longer row"}])
    assert source_digest(src) != d0


def test_dir_source_digest_tracks_changes(corpus_dir: Path) -> None:
    src = TextSource(kind="dir", path=str(corpus_dir))
    d0 = source_digest(src)
    assert d0 == source_digest(TextSource(kind="dir", path=str(corpus_dir)))
    assert source_digest(TextSource(kind="dir", path=str(corpus_dir), glob="*")) != d0
    (corpus_dir / "c.md").write_text("unmatched files do not count")
    assert source_digest(src) == d0
    (corpus_dir / "sub" / "b.txt").write_text("beta text, edited")
    d1 = source_digest(src)
    assert d1 != d0
    (corpus_dir / "new.txt").write_text("new")
    assert source_digest(src) != d1


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"kind": "dir"}, "requires path"),
        ({"kind": "fsspec", "path": "/x"}, "requires url"),
        ({"kind": "hf"}, "requires name"),
        ({"kind": "s3", "url": "s3://b/k"}, "kind"),
        ({"kind": "dir", "path": "/x", "colour": "red"}, "colour"),
    ],
)
def test_text_source_validation(kwargs: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as exc:
        TextSource(**kwargs)
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match=pattern):
        TextSource.model_validate(kwargs)


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        iter_documents(TextSource(kind="dir", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        list(iter_documents(TextSource(kind="dir", path=str(tmp_path / "empty"))))
    with pytest.raises(DataError, match="does not exist"):
        iter_documents(TextSource(kind="fsspec", url=f"file://{tmp_path}/missing"))


# ---------------------------------------------------------------- splits


def test_split_of_deterministic_and_proportional() -> None:
    ids = [f"file-{i}.txt" for i in range(4000)]
    fr = (0.8, 0.15, 0.05)
    a = [split_of(i, fr, seed=3) for i in ids]
    assert a == [split_of(i, fr, seed=3) for i in ids]
    counts = Counter(a)
    assert abs(counts["train"] / 4000 - 0.8) < 0.03
    assert abs(counts["validation"] / 4000 - 0.15) < 0.03
    assert abs(counts["test"] / 4000 - 0.05) < 0.02
    other = [split_of(i, fr, seed=4) for i in ids]
    assert other != a
    assert {split_of(i, (1, 1, 0)) for i in ids} == {"train", "validation"}
    assert split_of("x", (2, 0, 0)) == "train"


@pytest.mark.parametrize("bad", [(0.5, 0.5), (-0.1, 0.6, 0.5), (0, 0, 0), (float("nan"), 1, 1)])
def test_split_of_rejects_bad_fractions(bad: tuple) -> None:
    with pytest.raises(DataError, match="fractions"):
        split_of("x", bad)


def test_split_documents_coverage() -> None:
    docs = [Document(f"d{i}", f"text {i}") for i in range(3)]
    out = split_documents(docs, (0.98, 0.01, 0.01), seed=0)
    assert all(len(out[s]) == 1 for s in ("train", "validation", "test"))
    assert split_documents(docs, (0.98, 0.01, 0.01), seed=0) == out
    many = [Document(f"d{i}", "t") for i in range(50)]
    out = split_documents(many, (0.98, 0.01, 0.01), seed=1)
    assert sum(len(v) for v in out.values()) == 50
    assert all(out[s] for s in ("train", "validation", "test"))
    assert {d.id for v in out.values() for d in v} == {d.id for d in many}
    assert out["train"] == [d for d in many if d in out["train"]]  # input order kept
    untouched = [d for d in out["train"] if split_of(d.id, (0.98, 0.01, 0.01), 1) == "train"]
    assert len(untouched) >= len(out["train"]) - 2
    no_test = split_documents(many, (0.9, 0.1, 0.0))
    assert no_test["test"] == [] and no_test["validation"]
    two = split_documents(docs[:2], (0.98, 0.01, 0.01))
    assert sum(len(v) for v in two.values()) == 2 and two["train"]


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_reload(trained) -> None:
    from transformers import AutoTokenizer

    tokenizer, out = trained

    text = "The quick brown fox   jumps\tover the lazy dög 🦊!\n  Ternary, eh?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == tokenizer.unk_token == EOT
    assert tokenizer.convert_tokens_to_ids(EOT) == tokenizer.eos_token_id
    assert tokenizer("the quick", add_special_tokens=True)["input_ids"] == tokenizer(
        "the quick", add_special_tokens=False
    )["input_ids"]
    assert len(tokenizer(SENTENCES[0])["input_ids"]) < 0.7 * len(SENTENCES[0].encode())  # merges were learned
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokenizer"]  # saved atomically, no temp dirs
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.decode(ids) == text
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    assert len(reloaded) == len(tokenizer) <= 320
    assert tokenizer_digest(reloaded) == tokenizer_digest(tokenizer)


def test_tokenizer_digest_and_errors(tokenizer, tmp_path: Path) -> None:
    other = train_bpe_tokenizer(["completely different words here"] * 10, vocab_size=300, out_dir=tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert tokenizer_digest(other) != tokenizer_digest(tokenizer)
    with pytest.raises(DataError, match="no non-empty texts"):
        train_bpe_tokenizer(["", ""], vocab_size=300, out_dir=tmp_path / "e")
    with pytest.raises(DataError, match="vocab_size"):
        train_bpe_tokenizer(SENTENCES, vocab_size=100, out_dir=tmp_path / "v")
    assert not (tmp_path / "e").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OverwriteRefusedError, match="refusing to overwrite"):
        train_bpe_tokenizer(SENTENCES, vocab_size=300, out_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    retrained = train_bpe_tokenizer(SENTENCES * 3, vocab_size=300, out_dir=tmp_path / "t")  # replaces its own output
    assert tokenizer_digest(retrained) != tokenizer_digest(other)


# ---------------------------------------------------------------- packing


def test_packing_stream_and_blocks(tokenizer, tmp_path: Path) -> None:
    docs = _docs(30)
    ds = build_packed_dataset(docs, tokenizer, tmp_path / "p", seq_len=16)
    expected = []
    for d in docs:
        expected += tokenizer(d.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ds.n_tokens == len(expected)
    assert np.array_equal(np.asarray(ds.tokens), np.asarray(expected))
    assert ds.tokens.dtype == np.uint16
    assert len(ds) == ds.num_blocks == len(expected) // 16
    assert ds.seq_len == 16
    for i in (0, 1, len(ds) - 1):
        blk = ds[i]
        assert blk.dtype == torch.long and blk.shape == (16,)
        assert blk.tolist() == expected[i * 16 : (i + 1) * 16]
    assert ds[-1].tolist() == ds[len(ds) - 1].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["n_docs"] == 30 and meta["eos_token_id"] == tokenizer.eos_token_id
    assert meta["dtype"] == "uint16" and meta["tokenizer_digest"] == tokenizer_digest(tokenizer)
    ds.verify()
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    strings = build_packed_dataset([d.text for d in docs], tokenizer, tmp_path / "s", seq_len=16)
    assert np.array_equal(np.asarray(strings.tokens), np.asarray(expected))
    assert strings.digest == ds.digest  # same content, same digest


def test_packing_cache(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Counter()
    real = packing_mod.tokenize_stream

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(packing_mod, "tokenize_stream", counting)
    docs = _docs(20)
    out = tmp_path / "p"
    first = build_packed_dataset(docs, tokenizer, out, seq_len=8)
    mtime = (out / "tokens.npy").stat().st_mtime_ns
    again = build_packed_dataset(list(docs), tokenizer, out, seq_len=8)
    assert calls["n"] == 1 and again.digest == first.digest
    assert (out / "tokens.npy").stat().st_mtime_ns == mtime
    build_packed_dataset(docs[:-1], tokenizer, out, seq_len=8)
    assert calls["n"] == 2
    build_packed_dataset(docs, tokenizer, out, seq_len=4)
    assert calls["n"] == 3 and PackedDataset(out).seq_len == 4

    def exploding():
        raise AssertionError("docs must not be read on a cache hit")
        yield  # pragma: no cover

    keyed = tmp_path / "k"
    build_packed_dataset(iter(docs), tokenizer, keyed, seq_len=8, key_extra={"source": "abc"})
    assert calls["n"] == 4
    hit = build_packed_dataset(exploding(), tokenizer, keyed, seq_len=8, key_extra={"source": "abc"})
    assert calls["n"] == 4 and len(hit) == len(first)
    (keyed / "meta.json").write_text("{ not json")
    rebuilt = build_packed_dataset(iter(docs), tokenizer, keyed, seq_len=8, key_extra={"source": "abc"})
    assert calls["n"] == 5 and len(rebuilt) == len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "p"]  # atomic: no temp dirs left


def test_packing_errors(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"seq_len=4096") as exc:
        build_packed_dataset(["tiny"], tokenizer, tmp_path / "z", seq_len=4096)
    assert "tokens" in str(exc.value)
    assert not (tmp_path / "z").exists()
    with pytest.raises(DataError, match="no documents"):
        build_packed_dataset([], tokenizer, tmp_path / "z", seq_len=4)
    with pytest.raises(DataError, match="no meta.json"):
        PackedDataset(tmp_path / "missing")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(OverwriteRefusedError, match="refusing to overwrite"):
        build_packed_dataset(_docs(5), tokenizer, precious, seq_len=4)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_packed_dataset_detects_corruption(packed: PackedDataset, tmp_path: Path) -> None:
    import shutil

    cases = {
        "meta-garbage": lambda p: (p / "meta.json").write_text("{ truncated"),
        "meta-missing-key": lambda p: (p / "meta.json").write_text(
            json.dumps({k: v for k, v in packed.meta.items() if k != "n_tokens"})
        ),
        "meta-wrong-count": lambda p: (p / "meta.json").write_text(
            json.dumps({**packed.meta, "n_tokens": packed.n_tokens + 1})
        ),
        "tokens-truncated": lambda p: (p / "tokens.npy").write_bytes((p / "tokens.npy").read_bytes()[:100]),
        "tokens-missing": lambda p: (p / "tokens.npy").unlink(),
    }
    for name, corrupt in cases.items():
        p = tmp_path / name
        shutil.copytree(packed.path, p)
        PackedDataset(p)  # intact copy opens
        corrupt(p)
        with pytest.raises(DataError) as exc:
            PackedDataset(p)
        assert str(p) in str(exc.value) and "\n" not in str(exc.value), name


# ---------------------------------------------------------------- loaders


def _take(loader: BlockLoader, n: int) -> list[torch.Tensor]:
    return [b["input_ids"] for b in itertools.islice(loader, n)]


def test_loader_batches_are_dataset_blocks_and_deterministic(packed: PackedDataset) -> None:
    loader = BlockLoader(packed, batch_size=4, seed=7)
    assert iter(loader) is loader
    assert loader.epoch_batches == len(packed) // 4
    assert loader.tokens_per_batch == 4 * packed.seq_len
    batches = _take(loader, 3)
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(7 * 1_000_003 + 0))
    for k, b in enumerate(batches):
        assert b.dtype == torch.long and b.shape == (4, packed.seq_len)
        assert torch.equal(b, torch.stack([packed[int(i)] for i in order[4 * k : 4 * k + 4]]))
    again = _take(BlockLoader(packed, batch_size=4, seed=7), 3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = _take(BlockLoader(packed, batch_size=4, seed=8), 3)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other, strict=True))
    plain = _take(BlockLoader(packed, batch_size=4, shuffle=False), 2)
    assert torch.equal(plain[1], torch.stack([packed[i] for i in range(4, 8)]))


def test_loader_epoch_rollover(packed: PackedDataset) -> None:
    loader = BlockLoader(packed, batch_size=5, seed=1)
    n = loader.epoch_batches
    indices = [loader.batch_indices(0, k) for k in range(n)]
    epoch0 = _take(loader, n)
    for idx, b in zip(indices, epoch0, strict=True):
        assert torch.equal(b, packed.get_batch(idx))
    seen = [int(i) for t in indices for i in t]
    assert len(seen) == n * 5 and len(set(seen)) == len(seen)  # no block repeated within an epoch
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["position"] == n
    nxt = _take(loader, 1)[0]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 1
    order1 = torch.randperm(len(packed), generator=torch.Generator().manual_seed(1 * 1_000_003 + 1))
    assert torch.equal(nxt, packed.get_batch(order1[:5]))
    assert not torch.equal(order1, loader.epoch_order(0))


def test_loader_ranks_are_disjoint(packed: PackedDataset) -> None:
    r0 = BlockLoader(packed, batch_size=3, seed=2, rank=0, world_size=2)
    r1 = BlockLoader(packed, batch_size=3, seed=2, rank=1, world_size=2)
    n = r0.epoch_batches
    assert n == r1.epoch_batches == len(packed) // 6
    i0 = [r0.batch_indices(0, k) for k in range(n)]
    i1 = [r1.batch_indices(0, k) for k in range(n)]
    s0 = {int(i) for t in i0 for i in t}
    s1 = {int(i) for t in i1 for i in t}
    assert not s0 & s1 and len(s0) == len(s1) == 3 * n
    single = BlockLoader(packed, batch_size=3, seed=2)
    expected = set(single.epoch_order(0)[: 6 * n].tolist())
    assert s0 | s1 == expected
    assert torch.equal(_take(r1, 1)[0], packed.get_batch(i1[0]))


@pytest.mark.parametrize("stop", ["mid_epoch", "end_of_epoch", "second_epoch"])
def test_loader_exact_resume(packed: PackedDataset, stop: str) -> None:
    ref = BlockLoader(packed, batch_size=4, seed=11, rank=1, world_size=2)
    n = ref.epoch_batches
    k = {"mid_epoch": n // 2, "end_of_epoch": n, "second_epoch": n + max(1, n // 2)}[stop]
    _take(ref, k)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = _take(ref, 2 * n)
    resumed = BlockLoader(packed, batch_size=4, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = _take(resumed, 2 * n)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    fresh = _take(BlockLoader(packed, batch_size=4, seed=11, rank=1, world_size=2), 1)[0]
    assert not torch.equal(got[0], fresh)  # the state really moved the loader


def test_loader_errors(packed: PackedDataset) -> None:
    with pytest.raises(DataError, match=f"{len(packed)} blocks"):
        BlockLoader(packed, batch_size=len(packed) + 1)
    with pytest.raises(DataError, match="world_size"):
        BlockLoader(packed, batch_size=len(packed) // 2 + 1, world_size=2)
    with pytest.raises(DataError, match="rank"):
        BlockLoader(packed, batch_size=2, rank=2, world_size=2)
    loader = BlockLoader(packed, batch_size=4, seed=0)
    with pytest.raises(DataError, match="seed"):
        loader.load_state_dict({**loader.state_dict(), "seed": 1})
    with pytest.raises(DataError, match="epoch and position"):
        loader.load_state_dict({"seed": 0})
    with pytest.raises(DataError, match="out of range"):
        loader.load_state_dict({**loader.state_dict(), "position": loader.epoch_batches + 1})


def test_iter_eval_batches(packed: PackedDataset) -> None:
    batches = [b["input_ids"] for b in iter_eval_batches(packed, batch_size=7)]
    assert torch.equal(torch.cat(batches), torch.stack([packed[i] for i in range(len(packed))]))
    assert [len(b) for b in batches[:-1]] == [7] * (len(batches) - 1)
    assert len(batches[-1]) == len(packed) - 7 * (len(batches) - 1)
    assert [b["input_ids"] for b in iter_eval_batches(packed, 7)][0].equal(batches[0])
    assert len(list(iter_eval_batches(packed, batch_size=7, max_batches=2))) == 2
    with pytest.raises(DataError):
        iter_eval_batches(packed, batch_size=0)


# ---------------------------------------------------------------- corpus


def test_clean_rst() -> None:
    text = (
        ".. _tut-intro:\n"
        "\n"
        "************\n"
        "Introduction\n"
        "============\n"
        "\n"
        ".. index::\n"
        "   single: interpreter\n"
        "   pair: mode; interactive\n"
        "\n"
        "Use :func:`len` and :meth:`~str.join`, see :ref:`the tutorial <tut-informal>`.\n"
        "Also :mod:`!os` and :pep:`8`.\n"
        "\n"
        "\n"
        "\n"
        ".. note::\n"
        "\n"
        "   Keep this prose.\n"
    )
    assert clean_rst(text) == (
        "Introduction\n"
        "\n"
        "Use len and join, see the tutorial.\n"
        "Also os and 8.\n"
        "\n"
        ".. note::\n"
        "\n"
        "   Keep this prose.\n"
    )
    prose = "plain prose stays\n-- a dash line is prose too"
    assert clean_rst(prose) == prose + "\n"


@pytest.mark.skipif(not os.path.isdir(PYTHON_DOCS_DIR), reason="python3.11-doc is not installed")
def test_python_docs_corpus() -> None:
    assert python_docs_available()
    src = python_docs_source()
    assert src.kind == "dir" and src.glob == "**/*.rst.txt"
    docs = list(iter_documents(src))
    assert len(docs) >= 400
    assert sum(len(d.text.encode()) for d in docs) >= 10_000_000
    assert all(d.id.endswith(".rst.txt") for d in docs)
    ids = [d.id for d in docs]
    assert ids == sorted(ids) and "tutorial/introduction.rst.txt" in ids
    cleaned = {d.id: d.text for d in itertools.islice(iter_python_docs(clean=True), 50)}
    raw = {d.id: d.text for d in docs}
    assert all(len(cleaned[i]) < len(raw[i]) for i in cleaned)
    assert not any(".. index::" in t for t in cleaned.values())


def test_python_docs_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus_mod, "PYTHON_DOCS_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(sources_mod, "PYTHON_DOCS_DIR", str(tmp_path / "absent"))  # where the install hint lives
    assert not python_docs_available()
    with pytest.raises(DataError, match="python3.11-doc is not installed: apt-get install python3.11-doc"):
        list(iter_documents(python_docs_source()))
    with pytest.raises(DataError, match="python3.11-doc is not installed"):
        next(iter_python_docs())
