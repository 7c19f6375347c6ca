"""Atomic GGUF writing with a whole-file SHA-256 that the reader requires (see :mod:`bitnet.export.reader`).

Every GGUF the project writes carries two metadata keys:

- ``bitdistill.producer`` — marks the file as ours;
- ``bitdistill.sha256`` — the SHA-256 of the **whole file** (header, every metadata key and value, tensor infos,
  tensor data, padding) computed with this value's own 64 bytes set to ASCII ``0``.

The value is written as 64 zeros first, the digest is computed over the finished temporary file and patched into
place, and only then is the file fsynced and renamed onto the destination. A changed metadata value (say
``layer_norm_rms_epsilon``), a renamed key, a flipped tensor bit or a truncation all change the digest. The reader
treats a file with either key (or a key one bit-flip away from them) as ours and then *requires* the digest.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

CHECKSUM_KEY = "bitdistill.sha256"
PRODUCER_KEY = "bitdistill.producer"
LEGACY_CHECKSUM_KEY = "bitdistill.tensor_data_sha256"  # tensor data only, written before 2026-11-30
PLACEHOLDER = b"0" * 64
_CHUNK = 1 << 22

RawTensor = tuple[str, np.ndarray, "gguf.GGMLQuantizationType | None"]


def producer() -> str:
    try:
        from importlib.metadata import version

        return f"bitdistill {version('bitdistill')}"
    except Exception:  # noqa: BLE001 - an uninstalled checkout is still bitdistill
        return "bitdistill"


def checksum_value_offset(field_offset: int) -> int:
    """Byte offset of a string value in a GGUF v3 KV entry: u64 key length, key, u32 type, u64 value length."""
    return field_offset + 8 + len(CHECKSUM_KEY.encode()) + 4 + 8


def file_digest(path: str | Path, value_offset: int) -> str:
    """SHA-256 of the file with the 64 checksum bytes at ``value_offset`` replaced by the placeholder."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = value_offset
        while remaining > 0 and (block := f.read(min(_CHUNK, remaining))):
            h.update(block)
            remaining -= len(block)
        h.update(PLACEHOLDER)
        f.seek(value_offset + 64)
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _patch_checksum(path: str) -> None:
    reader = gguf.GGUFReader(path)
    field = reader.get_field(CHECKSUM_KEY)
    if field is None:  # pragma: no cover - atomic_gguf_write always adds it
        raise RuntimeError("checksum key missing from the file just written")
    off = checksum_value_offset(field.offset)
    del reader
    digest = file_digest(path, off).encode()
    with open(path, "rb+") as f:
        f.seek(off)
        if f.read(64) != PLACEHOLDER:  # pragma: no cover - layout assumption broken
            raise RuntimeError("checksum placeholder not where GGUF v3 puts it")
        f.seek(off)
        f.write(digest)
        f.flush()
        os.fsync(f.fileno())


def atomic_gguf_write(path: Path, fill: Callable[[gguf.GGUFWriter], None], arch: str) -> None:
    """Create a GGUF at ``path`` through a temporary sibling file, its checksum patched in, and ``os.replace``.

    A symbolic link ``path`` is written through (its target is replaced); temporaries of killed writers in the
    directory are swept first; a full disk is a one-line :class:`bitnet.io.DiskFullError` and leaves ``path`` as
    it was."""
    from bitnet.io import _umask, disk_full_error, is_disk_full, sweep_temporaries, temp_name, through_link, tree_bytes

    path = through_link(path)
    expected = tree_bytes(path)  # the file it replaces, until the tensors are known
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=temp_name(path.name), dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets; a GGUF gets the usual permissions
    except OSError as e:
        if is_disk_full(e, path.parent):
            raise disk_full_error(e, path, needed=expected) from e
        raise
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_string(PRODUCER_KEY, producer())
            writer.add_string(CHECKSUM_KEY, PLACEHOLDER.decode())
            fill(writer)
            expected = sum(t.nbytes for shard in writer.tensors for t in shard.values()) or expected
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        _patch_checksum(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        written = tree_bytes(tmp)
        full = is_disk_full(e, tmp)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full_error(e, path, needed=expected, written=written) from e
        raise


def add_tensors(w: gguf.GGUFWriter, tensors: list[RawTensor]) -> None:
    for name, data, raw in tensors:
        w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)


# kept for callers of the old API: the whole-file checksum now covers the tensors (and everything else)
add_tensors_with_checksum = add_tensors
