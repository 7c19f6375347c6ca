"""``python -m tasks.worker REQUEST``: run one stage from a request file (backends ``torchrun`` and ``skypilot``;
``local`` calls the same :func:`tasks.execute.execute` in-process).

REQUEST is a JSON :class:`tasks.execute.StageRequest` at a local path or an fsspec URL (``s3://``, ``gs://``;
fsspec options without secrets in ``$BITDISTILL_STORAGE_OPTIONS``). A valid manifest at the output → nothing to
do. Under ``torchrun`` every process runs the stage (DDP) and rank 0 commits; processes sharing a machine take
turns downloading upstream artifacts. For remote artifact roots the trainer checkpoints are mirrored to
``{root}/{stage}/{key}/train/checkpoints/`` (and restored from there), so a preempted job resumes on a new machine.

Exit codes: 0 done, 2 bad request (one line on stderr), 1 the stage failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import fsspec
from pydantic import ValidationError

from tasks.artifacts import ArtifactStore
from tasks.execute import StageRequest, execute
from tasks.progress import TrainProgress

STORAGE_OPTIONS_ENV = "BITDISTILL_STORAGE_OPTIONS"
CKPT_REL = "train/checkpoints"
CKPT_MARKER = "trainer.json"  # the trainer writes it last: a checkpoint directory without it is incomplete

log = logging.getLogger("bitdistill.worker")


class RequestError(ValueError):
    """The request file is missing or invalid."""


def load_request(where: str) -> StageRequest:
    opts = json.loads(os.environ.get(STORAGE_OPTIONS_ENV) or "{}") if "://" in where else {}
    try:
        with fsspec.open(where, "rb", **opts) as f:
            raw = f.read()
    except (OSError, ValueError) as e:
        raise RequestError(f"cannot read request {where}: {type(e).__name__}: {e}") from e
    try:
        req = StageRequest.model_validate_json(raw)
        req.stage_config()
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise RequestError(f"invalid request {where}: {loc}: {first['msg']}") from e
    except ValueError as e:
        raise RequestError(f"invalid request {where}: {e}") from e
    return req


def _rank() -> int:
    """The global rank torchrun gave this process (0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


@contextlib.contextmanager
def machine_lock(store: ArtifactStore, name: str) -> Iterator[None]:
    """An exclusive lock shared by the processes of one machine (same cache directory)."""
    store.cache_dir.mkdir(parents=True, exist_ok=True)
    with open(store.cache_dir / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CheckpointMirror:
    """Restore trainer checkpoints from the artifact root before training; upload new ones while it trains.

    Only for remote roots (a local root already holds them). Every process restores under the machine lock
    (idempotent: complete local checkpoints are kept); rank 0 uploads (``trainer.json`` last) every ``interval``
    seconds and once more at the end, and removes remote checkpoints the trainer pruned.
    """

    def __init__(self, store: ArtifactStore, stage: str, key: str, work: Path, rank: int,
                 interval: float = 60.0) -> None:
        self.store, self.rank, self.interval = store, rank, interval
        self.remote = f"{store.root_path}/{stage}/{key}/{CKPT_REL}"
        self.local = work / CKPT_REL
        self.lock_name = f"ckpt-{stage}-{key}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._uploaded: set[str] = set()

    def restore(self) -> None:
        fs = self.store.fs
        fs.invalidate_cache(self.remote)
        if not fs.exists(self.remote):
            return
        for d in sorted(fs.ls(self.remote, detail=False)):
            name = d.rstrip("/").rsplit("/", 1)[1]
            dst = self.local / name
            if (dst / CKPT_MARKER).is_file() or not fs.exists(f"{d}/{CKPT_MARKER}"):
                continue
            tmp = self.local / f".{name}.restoring"  # hidden, renamed when complete (the trainer lists step-*)
            shutil.rmtree(tmp, ignore_errors=True)
            for f in fs.find(d):
                target = tmp / f[len(d.rstrip("/")) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(target))
            shutil.rmtree(dst, ignore_errors=True)  # an incomplete local copy
            tmp.rename(dst)
            log.info("restored checkpoint %s from the artifact root", name)
            self._uploaded.add(name)

    def upload(self) -> None:
        if not self.local.is_dir():
            return
        done = {p.name for p in self.local.iterdir() if (p / CKPT_MARKER).is_file()}
        for name in sorted(done - self._uploaded):
            src = self.local / name
            files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != CKPT_MARKER)
            for p in [*files, src / CKPT_MARKER]:
                self.store.fs.put_file(str(p), f"{self.remote}/{name}/{p.relative_to(src).as_posix()}")
            self._uploaded.add(name)
        for name in sorted(self._uploaded - done):  # pruned by the trainer
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm(f"{self.remote}/{name}", recursive=True)
            self._uploaded.discard(name)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.upload()
            except Exception as e:  # noqa: BLE001 — mirroring must never break training
                log.warning("checkpoint upload failed: %s", e)

    def __enter__(self) -> CheckpointMirror:
        with machine_lock(self.store, self.lock_name):
            self.restore()
        if self.rank == 0:
            self._thread = threading.Thread(target=self._loop, name="ckpt-mirror", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            try:
                self.upload()
            except Exception as e:  # noqa: BLE001
                log.warning("checkpoint upload failed: %s", e)


def _progress(stage: str, work: Path, max_steps: int) -> TrainProgress:
    return TrainProgress(stage, work / "train" / "metrics.jsonl", max_steps, log, artifact=False)


def run(where: str) -> int:
    req = load_request(where)
    rank = _rank()
    store = ArtifactStore.from_config(req.store)
    mirror = None if store.local else (
        lambda s, work: CheckpointMirror(s, req.stage, req.key, work, rank))  # noqa: E731
    ref = execute(
        req,
        progress=_progress if rank == 0 else (lambda *a: contextlib.nullcontext()),
        logger=log,
        commit=rank == 0,
        fetch_lock=lambda: machine_lock(store, "fetch"),  # one download at a time into this machine's cache
        before_compute=mirror,
    )
    if ref is not None:
        print(f"bitdistill-worker: {req.stage} → {ref.uri} (manifest sha256 {ref.sha256})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rank = _rank()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m tasks.worker REQUEST   (a StageRequest JSON: local path or fsspec URL)",
              file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        return run(args[0])
    except RequestError as e:
        print(f"bitdistill-worker: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
