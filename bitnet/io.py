"""Small filesystem helpers: atomic writes of files and directories, digests."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def finite(obj: Any) -> Any:
    """``obj`` as strict JSON: non-finite floats become ``None``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets; outputs get the usual permissions
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OverwriteRefusedError(FileExistsError):
    """An output path exists and is not a previous output of the same kind: it is not ours to replace."""


def check_replaceable(path: str | Path, marker: str) -> None:
    """Refuse to replace an existing, non-empty directory that lacks ``marker`` (e.g. a user's own folder)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise OverwriteRefusedError(
            f"refusing to overwrite {out}: it exists and is not a previous output (no {marker})"
        )


@contextmanager
def atomic_dir(path: str | Path, *, marker: str) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` as a whole.

    ``path`` may be absent, empty, or a previous output of the same kind (it holds ``marker``); anything else
    is refused. On failure the temporary directory is removed and whatever was at ``path`` stays untouched.
    """
    path = Path(path)
    check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ content identity
CONTENT_EXCLUDE = ("metrics.json", "stage.json", "train/*", "manifest.json", ".*", "*/.*")
"""Files that describe a run rather than its result: metrics (wall times), the stage marker, trainer state."""


class ContentError(ValueError):
    """A file cannot be read for its content identity (e.g. a truncated safetensors file)."""


def safetensors_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, tensors)`` of a safetensors file, checked against its size (a truncated or malformed file
    raises :class:`ContentError`); reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ContentError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ContentError(f"{path}: truncated or not a safetensors file (header of {n} bytes in {size})")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            ends = [int(info["data_offsets"][1]) for info in header.values()]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ContentError(f"{path}: malformed safetensors header ({e})") from e
    if ends and 8 + n + max(ends) > size:
        raise ContentError(f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + n + max(ends)})")
    return 8 + n, header


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite, in place, the ``__metadata__`` of a safetensors file with its keys sorted.

    safetensors (Rust) serialises the metadata from a ``HashMap`` whose iteration order is seeded per map: with two
    or more keys (``format`` and ``bitdistill``, tied names from ``save_model``) the same tensors and metadata give
    different bytes on every call. Sorting makes the file a function of its contents; the header keeps its length
    (same keys and values, same compact JSON), so the tensor data is not moved."""
    path = Path(path)
    start, _ = safetensors_header(path)  # checks the file is whole
    with open(path, "r+b") as f:
        f.seek(8)
        raw = f.read(start - 8)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if not meta or len(meta) < 2:
            return
        canonical = {"__metadata__": dict(sorted(meta.items())), **header}
        new = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > len(raw):
            raise ContentError(f"{path}: cannot sort its safetensors metadata in place")
        f.seek(8)
        f.write(new.ljust(len(raw), b" "))  # safetensors pads its header with spaces


def _safetensors_digest(path: Path) -> str:
    """Tensors sorted by name: name, dtype, shape and the sha256 of the bytes (not the header order or metadata)."""
    h = hashlib.sha256(b"safetensors\0")
    start0, header = safetensors_header(path)
    with open(path, "rb") as f:
        for name in sorted(header):
            info = header[name]
            start, end = info["data_offsets"]
            f.seek(start0 + start)
            t = hashlib.sha256()
            left = end - start
            while left > 0:
                block = f.read(min(left, 1 << 22))
                t.update(block)
                left -= len(block)
            h.update(json.dumps([name, info["dtype"], info["shape"], t.hexdigest()]).encode())
    return h.hexdigest()


def file_content_digest(path: str | Path) -> str:
    """Content identity of one file: tensor values for safetensors, canonical JSON for JSON, bytes otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_digest(path)
    if path.suffix == ".json":
        try:
            return sha256_json(json.loads(path.read_text()))
        except (ValueError, UnicodeDecodeError):
            pass
    return sha256_file(path)


def content_files(root: str | Path, exclude: Iterable[str] = CONTENT_EXCLUDE) -> list[str]:
    """Relative paths of the files under ``root`` that make up its content (sorted)."""
    root = Path(root)
    pats = tuple(exclude)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(rel, p) for p in pats):
                out.append(rel)
    return out


def content_digest(root: str | Path, files: Iterable[str] | None = None) -> str:
    """Content identity of a directory: its files' content digests by relative path (see
    :func:`file_content_digest`); run records (metrics, timings, trainer checkpoints) are not part of it."""
    root = Path(root)
    rels = sorted(files) if files is not None else content_files(root)
    return sha256_json({rel: file_content_digest(root / rel) for rel in rels})


# ------------------------------------------------------------------------------------------------- locks
class LockBusyError(RuntimeError):
    """Another process holds the lock of the same output."""


@contextmanager
def file_lock(path: str | Path, *, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) for the duration of the block; released on process death.

    ``wait_s``: how long to wait for another holder before raising :class:`LockBusyError` naming ``what``.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    raise LockBusyError(f"{what} is being written by another process ({holder or 'unknown'}); "
                                        "wait for it to finish or use another output") from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def model_dir(path: str | Path) -> Path:
    """The model directory of a stage output: ``path/model`` when it holds one, else ``path`` itself (what every
    command and loader that takes "a model directory" accepts, README)."""
    p = Path(path)
    return p / "model" if (p / "model" / "config.json").is_file() else p
