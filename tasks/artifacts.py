"""Artifact store on fsspec (``file://``, ``s3://``, ``gs://``): content-hashed stage outputs with manifests.

A stage's output lives under ``{root}/{stage}/{key}/``. Files are written first, ``manifest.json`` last; the
manifest holds the sha256 and size of every file, the stage config, the upstream refs and the metrics. A
directory without a manifest, with a malformed one, or whose files do not match it is *not done*: it is never
reported as a finished artifact (the caller recomputes it).

Training code works on local directories, so the store stages data through a local cache for remote roots:
:meth:`ArtifactStore.work_dir` is where a stage writes (the stage directory itself for local roots, a cache
directory otherwise), :meth:`ArtifactStore.commit` uploads it and writes the manifest, :meth:`ArtifactStore.fetch`
returns a verified local copy of an upstream artifact.

An :class:`ArtifactRef` (URI + sha256 of the manifest bytes) is what Prefect tasks pass around and cache.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bitnet.config import refuse_credentials, secret_options
from bitnet.io import CONTENT_EXCLUDE, LockBusyError, content_digest, file_lock, sha256_file

MANIFEST = "manifest.json"
VERIFIED_MARKER = ".bitdistill-verified"  # in a local cache copy: the sha256 of the manifest it was checked against
DEFAULT_EXCLUDE = ("train/checkpoints/*", "*/.*", ".*")  # trainer checkpoints and temporary/hidden files

log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """An artifact is missing, unfinished or unreadable."""


class CorruptArtifactError(ArtifactError):
    """An artifact's files or manifest do not match the hashes that describe them."""


class ArtifactLockedError(ArtifactError):
    """Another run is computing the same stage output."""


class ArtifactRef(BaseModel):
    """A finished stage output: where it is and the sha256 of its manifest (small, JSON, hashable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(description="the stage directory, e.g. s3://bucket/runs/teacher/3f2a…")
    sha256: str = Field(description="sha256 of the manifest.json bytes", min_length=64, max_length=64)
    stage: str
    key: str
    content: str = Field(default="", description="content identity of the files (tensor values, configs): "
                         "what downstream keys hash, so a recomputed stage with equal content changes nothing after it")

    @property
    def identity(self) -> str:
        """What a downstream key hashes: the content identity (the manifest sha256 for refs made before it)."""
        return f"content:{self.content}" if self.content else self.sha256


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    size: int


class Manifest(BaseModel):
    """What a finished stage directory holds (written last)."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    stage: str
    key: str
    files: dict[str, FileEntry]
    config: dict[str, Any] = Field(default_factory=dict)
    upstream: dict[str, ArtifactRef] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    code: str = Field(default="", description="digest of the code that produced the artifact")
    content: str = Field(default="", description="bitnet.io.content_digest of the files (not metrics, checkpoints)")
    producer: dict[str, Any] = Field(default_factory=dict, description="flow run / task run / host that wrote it")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


_CREDENTIALS_HINT = ("set them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                     "GOOGLE_APPLICATION_CREDENTIALS), fsspec's config or a Prefect block")


class StoreConfig(BaseModel):
    """Where artifacts live. Credentials never go here: they come from the environment (AWS_*, GOOGLE_*) or fsspec's
    own config, because this config is stored in run records (Prefect flow-run parameters, manifests, MLflow)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    root: str | None = Field(
        default=None, description="artifact root: a local path (relative to the working directory), file://, s3:// or "
        "gs:// URL; unset (the presets' default): $BITDISTILL_HOME/runs/<preset>/artifacts, BITDISTILL_HOME "
        "defaulting to ~/.local/share/bitdistill (see default_root)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options without secrets, e.g. {'endpoint_url': ...} for s3"
    )
    cache_dir: str | None = Field(default=None, description="local staging directory for remote roots")

    @field_validator("root")
    @classmethod
    def _no_secret_root(cls, v: str | None) -> str | None:
        if v is not None:
            refuse_credentials(v, "store.root", _CREDENTIALS_HINT)
        return v

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        if bad := secret_options(v):
            raise ValueError(f"storage_options must not hold credentials ({'; '.join(bad)}): they would be stored "
                             f"in run records; {_CREDENTIALS_HINT}")
        return v


def default_root(preset: str) -> Path:
    """The artifact root of a run whose ``store.root`` is unset: ``runs/<preset>/artifacts`` under the data directory
    (``bitnet.io.data_home``: ``$BITDISTILL_HOME``, default ``~/.local/share/bitdistill``), absolute and outside the
    checkout. Computed when a run starts (``PipelineConfig.resolved``), so the stored config keeps ``root: null``."""
    from bitnet.io import data_home

    return data_home() / "runs" / preset / "artifacts"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bitdistill" / "artifacts"


def _excluded(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def _local_files(root: Path, exclude: tuple[str, ...]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST and not _excluded(rel, exclude):
                out.append(rel)
    return out


class ArtifactStore:
    """Stage outputs under ``{root}/{stage}/{key}/`` on any fsspec filesystem."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, cache_dir: str | Path | None = None):
        self.fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root_path = path.rstrip("/") if not self.local else str(Path(path).resolve())
        proto = self.fs.protocol
        self.protocol = "file" if self.local else (proto[0] if isinstance(proto, tuple) else proto)
        self.cache_dir = Path(cache_dir) if cache_dir else _default_cache_dir()

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> ArtifactStore:
        if cfg.root is None:
            raise ArtifactError("store.root is unset: resolve the config first (PipelineConfig.resolved)")
        return cls(cfg.root, cfg.storage_options, cfg.cache_dir)

    # ------------------------------------------------------------------------------------------- locations
    @property
    def root_uri(self) -> str:
        return f"{self.protocol}://{self.root_path}"

    def _path(self, stage: str, key: str, rel: str = "") -> str:
        p = f"{self.root_path}/{stage}/{key}"
        return f"{p}/{rel}" if rel else p

    def uri(self, stage: str, key: str) -> str:
        return f"{self.protocol}://{self._path(stage, key)}"

    def path_of(self, uri: str) -> str:
        """The filesystem path of a URI inside this store (refs from another root are refused)."""
        prefix = f"{self.protocol}://"
        if not uri.startswith(prefix) or not uri[len(prefix):].startswith(self.root_path + "/"):
            raise ArtifactError(f"{uri} is not inside the artifact root {self.root_uri}")
        return uri[len(prefix):]

    def work_dir(self, stage: str, key: str) -> Path:
        """The local directory a stage writes into (the stage directory itself for a local root)."""
        d = Path(self._path(stage, key)) if self.local else self.cache_dir / self._cache_name(stage, key)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _cache_name(self, stage: str, key: str) -> str:
        root_id = hashlib.sha256(self.root_uri.encode()).hexdigest()[:12]
        return f"{root_id}/{stage}/{key}"

    def check(self) -> None:
        """Fail early, in one line, when the root cannot be written (unreachable, missing credentials, read-only)."""
        probe = f"{self.root_path}/.bitdistill-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            if self.local:
                Path(self.root_path).mkdir(parents=True, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 — any backend error means the same thing here
            msg = " ".join(str(e).split())[:300] or type(e).__name__
            raise ArtifactError(f"artifact root {self.root_uri} is not writable: {type(e).__name__}: {msg}") from e

    # ----------------------------------------------------------------------------------------- manifests
    def _read_bytes(self, path: str) -> bytes | None:
        try:
            self.fs.invalidate_cache(path)
            with self.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write_bytes_atomic(self, path: str, data: bytes) -> None:
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", dir=Path(path).parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:  # a single object PUT is atomic on S3 and GCS
            self.fs.pipe_file(path, data)

    def read_manifest(self, ref: ArtifactRef) -> Manifest:
        """The manifest of ``ref``; it must be byte-identical to the one the ref was made from."""
        raw = self._read_bytes(f"{self.path_of(ref.uri)}/{MANIFEST}")
        if raw is None:
            raise ArtifactError(f"{ref.uri}: no {MANIFEST} (unfinished or deleted)")
        if hashlib.sha256(raw).hexdigest() != ref.sha256:
            raise CorruptArtifactError(f"{ref.uri}: {MANIFEST} changed since the ref was made (sha256 mismatch)")
        return _parse_manifest(raw, ref.uri)

    def _check_files(self, base: str, manifest: Manifest, deep: bool) -> None:
        """Raise CorruptArtifactError when a listed file is missing or differs (size, and sha256 when ``deep``)."""
        self.fs.invalidate_cache(base)
        for rel, entry in manifest.files.items():
            path = f"{base}/{rel}"
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                raise CorruptArtifactError(f"{base}: {rel} is missing") from None
            if size != entry.size:
                raise CorruptArtifactError(f"{base}: {rel} has {size} bytes, the manifest says {entry.size}")
            if deep:
                digest = sha256_file(path) if self.local else _sha256_remote(self.fs, path)
                if digest != entry.sha256:
                    raise CorruptArtifactError(f"{base}: {rel} sha256 differs from the manifest")

    def lookup(self, stage: str, key: str, *, deep: bool | None = None) -> ArtifactRef | None:
        """The ref of a finished, intact ``{stage}/{key}``; ``None`` when it is absent, unfinished or corrupt.

        ``deep`` re-hashes every file (default: for local roots; remote roots check sizes here and hashes on fetch).
        """
        base = self._path(stage, key)
        raw = self._read_bytes(f"{base}/{MANIFEST}")
        if raw is None:
            return None
        try:
            manifest = _parse_manifest(raw, self.uri(stage, key))
            if (manifest.stage, manifest.key) != (stage, key):
                raise CorruptArtifactError(f"{self.uri(stage, key)}: manifest is for {manifest.stage}/{manifest.key}")
            self._check_files(base, manifest, self.local if deep is None else deep)
        except ArtifactError as e:
            log.warning("ignoring %s: %s", self.uri(stage, key), e)
            return None
        return ArtifactRef(uri=self.uri(stage, key), sha256=hashlib.sha256(raw).hexdigest(), stage=stage, key=key,
                           content=manifest.content)

    def verify(self, ref: ArtifactRef, *, deep: bool | None = None) -> Manifest:
        """Check that ``ref`` still describes intact files; raise ArtifactError/CorruptArtifactError otherwise."""
        manifest = self.read_manifest(ref)
        self._check_files(self.path_of(ref.uri), manifest, self.local if deep is None else deep)
        return manifest

    def invalidate(self, stage: str, key: str) -> None:
        """Mark ``{stage}/{key}`` unfinished (remove its manifest); its files stay for a resume."""
        path = self._path(stage, key, MANIFEST)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------------------------ commit / fetch
    def commit(
        self,
        stage: str,
        key: str,
        work: Path,
        *,
        config: dict[str, Any] | None = None,
        upstream: dict[str, ArtifactRef] | None = None,
        metrics: dict[str, Any] | None = None,
        code: str = "",
        producer: dict[str, Any] | None = None,
        exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    ) -> ArtifactRef:
        """Hash the files of ``work``, upload them (remote roots), then write the manifest last."""
        work = Path(work)
        base = self._path(stage, key)
        self.invalidate(stage, key)
        files = {rel: FileEntry(sha256=sha256_file(work / rel), size=(work / rel).stat().st_size)
                 for rel in _local_files(work, exclude)}
        content = content_digest(work, [r for r in files if not _excluded(r, CONTENT_EXCLUDE)])
        if not self.local:
            for rel in files:
                self.fs.put_file(str(work / rel), f"{base}/{rel}")
        elif Path(base).resolve() != work.resolve():
            for rel in files:
                dst = Path(base) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(work / rel, dst)
        manifest = Manifest(
            stage=stage, key=key, files=files, config=config or {}, upstream=upstream or {},
            metrics=metrics or {}, code=code, producer=producer or {}, content=content,
        )
        raw = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, default=str).encode()
        self._write_bytes_atomic(f"{base}/{MANIFEST}", raw)
        sha = hashlib.sha256(raw).hexdigest()
        if not self.local:
            (work / VERIFIED_MARKER).write_text(sha)
        return ArtifactRef(uri=self.uri(stage, key), sha256=sha, stage=stage, key=key, content=content)

    # -------------------------------------------------------------------------------------------- locks
    @contextlib.contextmanager
    def lock(self, stage: str, key: str, *, wait_s: float = 0.0) -> Iterator[None]:
        """Exclusive right to compute and commit ``{stage}/{key}``: a file lock for local roots, a lock object
        created with a conditional write (if-none-match) on object stores, refreshed while held."""
        what = self.uri(stage, key)
        path = f"{self.root_path}/{stage}/.{key}.lock"
        if not self.local:
            with _RemoteLock(self.fs, path, what, wait_s):
                yield
            return
        try:
            lock = file_lock(path, what=what, wait_s=wait_s)
            lock.__enter__()
        except LockBusyError as e:
            raise ArtifactLockedError(str(e)) from None
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    def fetch(self, ref: ArtifactRef) -> Path:
        """A verified local directory with the files of ``ref`` (downloaded into the cache for remote roots)."""
        manifest = self.read_manifest(ref)
        base = self.path_of(ref.uri)
        if self.local:
            self._check_files(base, manifest, deep=True)
            return Path(base)
        local = self.cache_dir / self._cache_name(ref.stage, ref.key)
        marker = local / VERIFIED_MARKER
        if marker.is_file() and marker.read_text() == ref.sha256 and _local_matches(local, manifest):
            return local
        marker.unlink(missing_ok=True)
        for rel, entry in manifest.files.items():
            dst = local / rel
            if dst.is_file() and dst.stat().st_size == entry.size and sha256_file(dst) == entry.sha256:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(f"{base}/{rel}", str(dst))
            except FileNotFoundError:
                raise CorruptArtifactError(f"{ref.uri}: {rel} is missing") from None
            if sha256_file(dst) != entry.sha256:
                raise CorruptArtifactError(f"{ref.uri}: {rel} sha256 differs from the manifest")
        marker.write_text(ref.sha256)
        return local


class _RemoteLock:
    """A lock object on an object store: created only if absent (S3 If-None-Match, GCS ifGenerationMatch=0),
    its timestamp refreshed every ``beat_s`` while held, broken when older than ``stale_s`` (a killed holder)."""

    beat_s, stale_s = 30.0, 300.0

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, what: str, wait_s: float) -> None:
        self.fs, self.path, self.what, self.wait_s = fs, path, what, wait_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "time": time.time()}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            self.fs.invalidate_cache(self.path)
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"owner": "unknown", "time": 0.0}

    def __enter__(self) -> _RemoteLock:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self.fs.pipe_file(self.path, self._body(), mode="create")
                break
            except (FileExistsError, OSError) as e:
                holder = self._holder()
                if holder is None:
                    continue
                if time.time() - float(holder.get("time", 0)) > self.stale_s:
                    log.warning("%s: breaking the stale lock of %s", self.what, holder.get("owner"))
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(self.path)
                    continue
                if time.monotonic() >= deadline:
                    raise ArtifactLockedError(f"{self.what} is being computed by another run ({holder.get('owner')});"
                                              " wait for it to finish") from e
                time.sleep(1.0)
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat_s):
            with contextlib.suppress(Exception):
                self.fs.pipe_file(self.path, self._body())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            holder = self._holder()
            if holder is not None and holder.get("owner") == self.owner:
                self.fs.rm_file(self.path)


def _parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        return Manifest.model_validate_json(raw)
    except (ValidationError, ValueError) as e:
        raise CorruptArtifactError(f"{where}: malformed {MANIFEST} ({str(e).splitlines()[0]})") from e


def _sha256_remote(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _local_matches(local: Path, manifest: Manifest) -> bool:
    for rel, entry in manifest.files.items():
        p = local / rel
        if not p.is_file() or p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
            return False
    return True


def stage_key(stage: str, material: dict[str, Any]) -> str:
    """The directory key of a stage output: a hash of everything that determines it (config, inputs, code)."""
    blob = json.dumps({"stage": stage, **material}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def local_root_uri(path: str | Path) -> str:
    """``file://`` URI of a local path (made absolute); URLs with a scheme are returned unchanged."""
    s = str(path)
    if "://" in s:
        return s
    return f"file://{PurePosixPath(Path(s).resolve().as_posix())}"
