"""Small filesystem helpers: atomic writes of files and directories, digests."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import socket
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


# ------------------------------------------------------------------------------------------ data directory
HOME_ENV = "BITDISTILL_HOME"


def data_home() -> Path:
    """The project's data directory (absolute): ``$BITDISTILL_HOME``, else ``$XDG_DATA_HOME/bitdistill``, else
    ``~/.local/share/bitdistill``. Default artifact roots (``runs/<preset>/artifacts``) and output locks live here,
    never in the checkout or the working directory a command runs from."""
    if home := os.environ.get(HOME_ENV):
        return Path(os.path.abspath(os.path.expanduser(home)))
    xdg = os.path.expanduser(os.environ.get("XDG_DATA_HOME") or "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"  # XDG: a relative value is ignored
    return Path(os.path.abspath(base / "bitdistill"))


# ------------------------------------------------------------------------------------ temporaries of writers
def host_tag() -> str:
    """This host's name as it appears in temporary names (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32]


def temp_name(name: str, kind: str = "tmp") -> str:
    """The name prefix of a temporary next to ``name``: ``.NAME.tmp-PID@HOST.`` (a random part follows). The owner's
    PID and host let the next writer of the directory tell a killed writer's leftovers (:func:`sweep_temporaries`)
    from a running one's."""
    return f".{name}.{kind}-{os.getpid()}@{host_tag()}."


_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)(?:\.[A-Za-z0-9_]*)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def writer_alive(name: str) -> bool | None:
    """Whether the writer that owns the temporary ``name`` (:func:`temp_name`) still runs: ``None`` when ``name`` is
    not such a temporary, ``True`` when it belongs to a running process or to another host (not ours to judge)."""
    m = _TEMP.match(name)
    if not m:
        return None
    if m["host"] != host_tag():
        return True
    return _pid_alive(int(m["pid"]))


def sweep_temporaries(directory: str | Path) -> list[str]:
    """Remove the temporaries (``.NAME.tmp-PID@HOST.*``, ``.NAME.old-PID@HOST``) in ``directory`` whose writer was
    killed: its PID runs no more on this host. A running writer's temporaries and every other file stay."""
    d = Path(directory)
    try:
        entries = list(d.iterdir())
    except OSError:
        return []
    gone = []
    for p in entries:
        if writer_alive(p.name) is False:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(str(p))
    if gone:
        import logging

        logging.getLogger("bitdistill.io").warning("removed %d temporar%s of killed writers: %s", len(gone),
                                                   "y" if len(gone) == 1 else "ies", ", ".join(gone))
    return gone


def through_link(path: str | Path) -> Path:
    """Where an output at ``path`` is written: ``path`` itself, or its target when ``path`` is a symbolic link (the
    target is replaced atomically and the link stays a link; an output never replaces a link)."""
    p = Path(path)
    return Path(os.path.realpath(p)) if p.is_symlink() else p


# ------------------------------------------------------------------------------------------------ disk full
class DiskFullError(OSError):
    """A write ran out of space (or quota): one line naming the output, the space it needs and the space free."""

    def __init__(self, message: str, code: int = errno.ENOSPC, *, needed: int = 0, written: int = 0) -> None:
        super().__init__(code, message)
        self.message, self.needed, self.written = message, needed, written

    def __str__(self) -> str:
        return self.message


_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
_NEARLY_FULL = 1 << 20  # free bytes below which a failed write is taken for a full disk (numpy, torch and
# safetensors report it without an errno: "N requested and M written", "unexpected pos", "os error 28")


def free_bytes(path: str | Path) -> int:
    """Bytes free for this user on the filesystem of ``path`` (its nearest existing ancestor); -1 when unknown or
    the filesystem has no size (sysfs, procfs)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return -1
    return usage.free if usage.total > 0 else -1


def tree_bytes(path: str | Path) -> int:
    """Size of a file, or of the files under a directory (0 when absent)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def is_disk_full(e: BaseException, where: str | Path) -> bool:
    """``e`` is a write that ran out of space: ENOSPC/EDQUOT, their text (writers that drop the errno), or an error
    without an errno while the filesystem of ``where`` has (almost) nothing left. Another errno (EACCES, EROFS, ...)
    is never taken for a full disk."""
    if not isinstance(e, Exception):
        return False
    seen: BaseException | None = e
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno in (errno.ENOSPC, errno.EDQUOT)
        if any(t in str(seen).lower() for t in _FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return 0 <= free_bytes(where) < _NEARLY_FULL


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}" if n < 10_000_000 else f"{n / 1e6:.0f}"


def disk_full_error(e: BaseException, path: str | Path, *, needed: int = 0, written: int = 0) -> DiskFullError:
    """The one-line error of a write of ``path`` that ran out of space; call it after the temporary is removed
    (the free space is what the write can have). ``needed``: the expected size (e.g. the output it replaces),
    ``written``: what the write had written when it failed. An inner write's error (a nested atomic_dir) gives its
    numbers to the outer output's."""
    if isinstance(e, DiskFullError):
        needed, written = max(needed, e.needed), max(written, e.written)
    quota = any(isinstance(x, OSError) and x.errno == errno.EDQUOT for x in (e, e.__cause__, e.__context__))
    what = "disk quota exceeded" if quota else "no space left on device"
    need = f"~{_mb(needed)} MB" if needed > written else f"more than {_mb(written)} MB"
    free = free_bytes(path)
    return DiskFullError(f"{what} writing {path}: needs {need}, {_mb(max(free, 0))} MB free",
                         errno.EDQUOT if quota else errno.ENOSPC, needed=needed, written=written)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same directory and ``os.replace`` (through a symbolic
    link, :func:`through_link`)."""
    path = through_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path.name), dir=path.parent)
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
def atomic_dir(path: str | Path, *, marker: str, expected: int = 0) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` as a whole.

    ``path`` may be absent, empty, or a previous output of the same kind (it holds ``marker``); anything else
    is refused. On failure the temporary directory is removed and whatever was at ``path`` stays untouched; a full
    disk is a :class:`DiskFullError` naming ``path``. A symbolic link at ``path`` is written through (its target is
    replaced, the link stays). Temporaries of killed writers in the same directory are swept first. ``expected``:
    the bytes the output will take, when the caller knows (the space a full disk lacks is estimated from it, else
    from the output it replaces).
    """
    path = through_link(path)
    check_replaceable(path, marker)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=temp_name(path.name), dir=path.parent))
    except OSError as e:
        if is_disk_full(e, path.parent):
            raise disk_full_error(e, path, needed=max(expected, tree_bytes(path))) from e
        raise
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException as e:
        written = tree_bytes(tmp)
        full = is_disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:  # one line naming this output (an inner atomic_dir's error is renamed to the outer output)
            raise disk_full_error(e, path, needed=max(expected, tree_bytes(path)), written=written) from e
        raise
    old = None
    if path.exists():
        old = path.with_name(temp_name(path.name, "old").rstrip("."))
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
def file_lock(path: str | Path, *, what: str, wait_s: float = 0.0, remove: bool = False) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) for the duration of the block; released on process death.

    ``wait_s``: how long to wait for another holder before raising :class:`LockBusyError` naming ``what``.
    ``remove``: delete the lock file on release (a waiter that locked the removed file opens the path again).
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
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
            try:  # the holder before us may have removed the file we locked: lock the one at the path
                current = not remove or os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)  # still holding it: nobody locks the file between the unlink and the close
        os.close(fd)  # closing the descriptor releases the lock


def _lock_dir() -> Path:
    """``data_home()/locks``; where the data directory cannot be written (a read-only or missing home), a private
    directory under the system's temporary directory."""
    first = data_home() / "locks"
    try:
        first.mkdir(parents=True, exist_ok=True)
        return first
    except OSError as e:
        spare = Path(tempfile.gettempdir()) / f"bitdistill-locks-{os.getuid()}"
        try:
            spare.mkdir(mode=0o700, exist_ok=True)
            if spare.is_symlink() or spare.stat().st_uid != os.getuid():
                raise e
        except OSError:
            raise e from None
        return spare


@contextmanager
def output_lock(out: str | Path, *, wait_s: float = 0.0) -> Iterator[None]:
    """Exclusive right to write the output ``out`` (a file lock keyed by the hash of its real path, under
    :func:`data_home`: nothing is created next to ``out``, and the lock file is removed on release)."""
    key = hashlib.sha256(os.path.realpath(out).encode()).hexdigest()[:32]
    with file_lock(_lock_dir() / f"{key}.lock", what=str(out), wait_s=wait_s, remove=True):
        yield


def model_dir(path: str | Path) -> Path:
    """The model directory of a stage output: ``path/model`` when it holds one, else ``path`` itself (what every
    command and loader that takes "a model directory" accepts, README)."""
    p = Path(path)
    return p / "model" if (p / "model" / "config.json").is_file() else p
