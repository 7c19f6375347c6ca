"""Checkpoints of :class:`bitnet.trainer.Trainer`: write, verify, resume.

Checkpoints every N steps hold model, optimizer, scheduler, RNG and data position, in safetensors + JSON, and
resume exactly: a run killed at any point and restarted reaches the same weights as an uninterrupted run.

- ``ddp``: the state is replicated, so rank 0 writes it whole (``model.safetensors``, ``optimizer.safetensors``).
- ``fsdp``: every rank writes its own shards through ``torch.distributed.checkpoint`` (safetensors files with the
  shard offsets in their header; no pickle).

Both layouts are read through ``torch.distributed.checkpoint``, keyed by parameter names. A checkpoint of either
mode therefore loads in either mode at any number of processes (resharding).

Each checkpoint is a directory ``step-NNNNNNNN`` that appears only once complete; ``trainer.json`` records the
sha256 of every file, the identity of the run that wrote it, and its own digest. On resume the newest intact
checkpoint is used and the others are skipped with a warning. A checkpoint of another run (identity) or another
model (names, shapes) is refused before any training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from bitnet.io import sha256_file, sha256_json
from bitnet.parallel import full_state_dict
from bitnet.student import CheckpointError, state_mismatch

CKPT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step-(\d{8})$")
STALE_RE = re.compile(r"^\.step-\d{8}\.(tmp|old)")  # temporary directories a killed save may leave behind
CKPT_FORMAT = 2  # 2: parameter-name keyed, per-file sha256, identity; 1 (before): optimizer keyed by index
TRAINER_STATE = "trainer.json"
OPTIM_PREFIX = "optim."

log = logging.getLogger("bitnet.trainer")


class ResumableLoader(Protocol):
    """A training data iterator whose position is part of a checkpoint."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...
    def __next__(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointSettings(Protocol):
    """What a checkpoint reads of :class:`bitnet.trainer.TrainConfig` (recorded whole in ``trainer.json``)."""

    parallel: str
    keep_checkpoints: int
    seed: int

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


class Checkpoints:
    """The checkpoint half of :class:`~bitnet.trainer.Trainer` (module docstring), over the run state the trainer
    holds: its model, optimizer, scheduler and loader, its position (``step``, ``tokens``, ``last_loss``,
    ``history``), its ranks and its identity. Collective where it says so."""

    cfg: CheckpointSettings
    out_dir: Path
    desc: str
    identity: dict[str, str] | None
    rank: int
    world_size: int
    fsdp: bool
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: ResumableLoader
    step: int
    tokens: int
    last_loss: float
    history: list[dict[str, float]]
    skipped: list[str]

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / CKPT_DIR

    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.ckpt_root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_root.iterdir() if (m := CKPT_RE.match(p.name))]
        return sorted(found)

    def sweep_stale(self) -> list[str]:
        """Remove temporary checkpoint directories a killed run left (rank 0; returns their names)."""
        if self.rank != 0 or not self.ckpt_root.is_dir():
            return []
        stale = sorted(p.name for p in self.ckpt_root.iterdir() if STALE_RE.match(p.name))
        for name in stale:
            shutil.rmtree(self.ckpt_root / name, ignore_errors=True)
        if stale:
            log.warning("%s: removed %d stale temporary checkpoint dir(s): %s", self.desc, len(stale), ", ".join(stale))
        return stale

    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": _jsonable(random.getstate()),
            "numpy": _jsonable(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return state

    def _gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _train_state(
        self, drop_tied: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, Any]]]:
        """(model tensors by name, optimizer tensors as ``optim.{name}.{key}``, param groups by name)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        aliases = _tied_aliases(self.model) if drop_tied else set()
        model_sd = {k: v for k, v in get_model_state_dict(self.model).items() if k not in aliases}
        osd = get_optimizer_state_dict(self.model, self.optimizer)
        optim: dict[str, torch.Tensor] = {}
        for name, pstate in osd["state"].items():
            for k, v in pstate.items():
                if not isinstance(v, torch.Tensor):
                    raise CheckpointError(f"optimizer state {name}.{k} is not a tensor ({type(v).__name__})")
                optim[f"{OPTIM_PREFIX}{name}.{k}"] = v
        return dict(model_sd), optim, list(osd["param_groups"])

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-NNNNNNNN`` (collective under DDP/FSDP); it appears only once complete. A full disk
        is a one-line :class:`bitnet.io.DiskFullError`: the partial checkpoint is removed, earlier ones stay."""
        from bitnet.io import disk_full_error, is_disk_full, tree_bytes

        try:
            return self._write_checkpoint()
        except BaseException as e:
            tmp = self.ckpt_root / f".step-{self.step:08d}.tmp"
            if self.rank != 0 or not is_disk_full(e, self.ckpt_root):
                raise
            written = tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.checkpoints()
            needed = tree_bytes(previous[-1][1]) if previous else self._state_bytes()
            raise disk_full_error(e, self.ckpt_root / f"step-{self.step:08d}", needed=needed, written=written) from e

    def _state_bytes(self) -> int:
        """About the size of a checkpoint: model and optimizer tensors (the estimate a full disk is told)."""
        try:
            tensors = [*self.model.state_dict().values(),
                       *(v for st in self.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))]
            return sum(t.numel() * t.element_size() for t in tensors)
        except Exception:  # noqa: BLE001 - an estimate only
            return 0

    def _write_checkpoint(self) -> Path:
        rng = self._gather(self._rng_state())
        final = self.ckpt_root / f"step-{self.step:08d}"
        tmp = self.ckpt_root / f".step-{self.step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        model_sd, optim, groups = self._train_state()
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import HuggingFaceStorageWriter

            dcp.save({**model_sd, **optim}, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        elif self.rank == 0:
            save_model(self.model, str(tmp / "model.safetensors"))
            save_file({k: v.detach().contiguous().cpu() for k, v in optim.items()}, str(tmp / "optimizer.safetensors"))
        if self.rank == 0:
            rng_tensors = {f"rank{r}.torch": s["torch"] for r, s in enumerate(rng)}
            rng_tensors.update({f"rank{r}.cuda": s["cuda"] for r, s in enumerate(rng) if s.get("cuda") is not None})
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
        self._barrier()
        files = self._hash_files(tmp, sorted(p.name for p in tmp.iterdir()) if self.rank == 0 else None)
        if self.rank == 0:
            meta = {
                "format": CKPT_FORMAT,
                "step": self.step,
                "tokens": self.tokens,
                "last_loss": self.last_loss,
                "world_size": self.world_size,
                "parallel": self.cfg.parallel,
                "identity": self.identity,
                "files": files,
                "optimizer": {"param_groups": groups},
                "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(),
                "rng": [{"python": s["python"], "numpy": s["numpy"]} for s in rng],
                "history": self.history,
                "config": self.cfg.model_dump(mode="json"),
            }
            meta["digest"] = sha256_json(meta)
            _write_json_synced(tmp / TRAINER_STATE, meta)
            _fsync_dir(tmp)
            if final.exists():
                old = self.ckpt_root / f".step-{self.step:08d}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_root)
            for _, old_ckpt in self.checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old_ckpt, ignore_errors=True)
        self._barrier()
        return final

    def _hash_files(self, directory: Path, names: list[str] | None) -> dict[str, str]:
        """sha256 of ``names`` (known on rank 0), the work spread over the ranks; every rank gets the result."""
        if self.world_size > 1:
            box = [names]
            dist.broadcast_object_list(box, src=0)
            names = box[0]
        assert names is not None
        mine = {n: sha256_file(directory / n) for n in names[self.rank :: self.world_size]}
        merged: dict[str, str] = {}
        for part in self._gather(mine):
            merged.update(part)
        return merged

    def _verify(self, path: Path) -> tuple[dict[str, Any] | None, str]:
        """(trainer state, "") when ``path`` is intact, else (None, reason). Collective."""
        meta: dict[str, Any] | None = None
        reason = ""
        if self.rank == 0:
            try:
                meta = json.loads((path / TRAINER_STATE).read_text())
                if meta.get("format") != CKPT_FORMAT:
                    reason = f"format {meta.get('format', 1)} of an older trainer, this one reads {CKPT_FORMAT}"
                elif sha256_json({k: v for k, v in meta.items() if k != "digest"}) != meta.get("digest"):
                    reason = f"{TRAINER_STATE} does not match its digest"
                else:
                    listed, present = set(meta["files"]), {p.name for p in path.iterdir()} - {TRAINER_STATE}
                    if listed != present:
                        reason = f"files differ from the recorded list (missing {sorted(listed - present)}, " \
                                 f"extra {sorted(present - listed)})"
                    elif not math.isfinite(float(meta.get("last_loss", 0.0))) and meta.get("history"):
                        reason = f"non-finite loss {meta['last_loss']} recorded"
            except (OSError, ValueError, KeyError, TypeError) as e:
                reason = f"unreadable {TRAINER_STATE} ({type(e).__name__}: {e})"
        if self.world_size > 1:
            box = [meta, reason]
            dist.broadcast_object_list(box, src=0)
            meta, reason = box
        if reason:
            return None, reason
        assert meta is not None
        names = sorted(meta["files"])
        actual = self._hash_files(path, names)
        bad = [n for n in names if actual.get(n) != meta["files"][n]]
        if bad:
            return None, f"checksum mismatch in {', '.join(bad)}"
        return meta, ""

    def _check_identity(self, path: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("identity")
        if self.identity is None or saved == self.identity:
            return
        if saved is None:
            raise CheckpointError(
                f"{path.parent} holds checkpoints of a run without identity, this run is {_short(self.identity)}: "
                f"refusing to resume from them (delete {path.parent} or choose another output directory)"
            )
        diff = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
        detail = "; ".join(f"{k} {str(saved.get(k))[:12]} vs {str(self.identity.get(k))[:12]}" for k in diff)
        raise CheckpointError(
            f"{path.parent} holds checkpoints of another run ({detail}): refusing to resume from them "
            f"(delete {path.parent} or choose another output directory)"
        )

    def load_checkpoint(self, path: Path, meta: dict[str, Any] | None = None) -> None:
        """Load ``path`` (written in any mode at any world size) into this run's model, optimizer and state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if meta is None:
            meta, reason = self._verify(path)
            if meta is None:
                raise CheckpointError(f"{path}: {reason}")
        model_sd, optim, groups = self._train_state(drop_tied=False)
        try:
            stored = HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable tensor files ({type(e).__name__}: {e})") from e
        stored_shapes = {k: tuple(v.size) for k, v in stored.items() if hasattr(v, "size")}
        model_sd = _drop_missing_tied(self.model, model_sd, stored_shapes)
        _check_fits(path, model_sd, stored_shapes, lambda k: not k.startswith((OPTIM_PREFIX, "rank")),
                    "does not fit this model")
        _check_fits(path, optim, stored_shapes, lambda k: k.startswith(OPTIM_PREFIX),
                    "optimizer state does not fit this model")
        target = {**model_sd, **optim}
        with warnings.catch_warnings():  # one process reads the shards itself: what no_dist says, no warning needed
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=self.world_size == 1)
        set_model_state_dict(self.model, model_sd, options=StateDictOptions(strict=False))
        osd: dict[str, Any] = {"state": {}, "param_groups": []}
        for key, value in optim.items():
            name, _, k = key[len(OPTIM_PREFIX) :].rpartition(".")
            osd["state"].setdefault(name, {})[k] = value
        saved_groups = meta["optimizer"]["param_groups"]
        if len(saved_groups) != len(groups):
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({len(saved_groups)} param groups)")
        osd["param_groups"] = [{**saved, "params": own["params"]} for saved, own in zip(saved_groups, groups)]
        set_optimizer_state_dict(self.model, self.optimizer, osd)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.loader.load_state_dict(self._rescale_loader(meta["loader"], meta.get("world_size", 1)))
        self._restore_rng(path, meta)
        self.step = int(meta["step"])
        self.tokens = int(meta["tokens"])
        self.last_loss = float(meta.get("last_loss", float("nan")))
        self.history = list(meta["history"])

    def _rescale_loader(self, state: dict[str, Any], saved_world: int) -> dict[str, Any]:
        """A loader position taken at another world size or batch size, moved to this run's (same blocks seen)."""
        own = self.loader.state_dict()
        keys = ("world_size", "batch_size", "position")
        if not all(k in state and k in own for k in keys) or (
            state["world_size"], state["batch_size"]) == (own["world_size"], own["batch_size"]):
            return state
        seen = int(state["position"]) * int(state["world_size"]) * int(state["batch_size"])
        per_batch = int(own["world_size"]) * int(own["batch_size"])
        if seen % per_batch and self.rank == 0:
            log.warning("%s: resharded data position rounded down from %d to %d blocks of the epoch", self.desc, seen,
                        seen // per_batch * per_batch)
        return {**state, "world_size": own["world_size"], "batch_size": own["batch_size"],
                "position": seen // per_batch}

    def _restore_rng(self, path: Path, meta: dict[str, Any]) -> None:
        saved = meta["rng"]
        if self.rank >= len(saved):  # resharded to more processes: a new rank gets a fresh, reproducible stream
            seed = self.cfg.seed + 1_000_003 * self.rank + int(meta["step"])
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return
        rng_tensors = load_file(str(path / "rng.safetensors"))
        py = saved[self.rank]
        random.setstate(_tuplify(py["python"]))
        np_state = py["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        torch.set_rng_state(rng_tensors[f"rank{self.rank}.torch"])
        if self.device.type == "cuda" and f"rank{self.rank}.cuda" in rng_tensors:
            torch.cuda.set_rng_state(rng_tensors[f"rank{self.rank}.cuda"], self.device)

    def resume(self) -> int | None:
        """Load the newest intact checkpoint (skipping corrupt ones, with a warning); None when there is none."""
        ckpts = self.checkpoints() if self.rank == 0 else []
        if self.world_size > 1:
            box = [ckpts]
            dist.broadcast_object_list(box, src=0)
            ckpts = box[0]
        reasons: list[str] = []
        for _, path in reversed(ckpts):
            meta, reason = self._verify(path)
            if meta is not None:
                self._check_identity(path, meta)
                self.load_checkpoint(path, meta)
                bad = self._non_finite_weights()
                if bad is None:
                    if reasons and self.rank == 0:
                        log.warning("%s: resumed from %s after skipping %s", self.desc, path.name, "; ".join(reasons))
                    self.skipped = reasons
                    return self.step
                reason = f"non-finite values in {bad}"
            reasons.append(f"{path.name}: {reason}")
            if self.rank == 0:
                log.warning("%s: skipping checkpoint %s: %s", self.desc, path, reason)
        if reasons:
            raise CheckpointError(
                f"no intact checkpoint in {self.ckpt_root} ({'; '.join(reasons)}); delete it to start over"
            )
        return None

    def _non_finite_weights(self) -> str | None:
        """Name of a parameter or optimizer state holding NaN/inf (any rank), else None. Collective."""
        bad = ""
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(_local(p)).all()):
                bad = name
                break
        if not bad:
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and not bool(torch.isfinite(_local(v)).all()):
                        bad = f"optimizer state {k}"
                        break
                if bad:
                    break
        names = [n for n in self._gather(bad) if n]
        return names[0] if names else None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained model's full state dict on rank 0 (CPU tensors), ``{}`` elsewhere; call on every rank."""
        return full_state_dict(self.model)


# ---------------------------------------------------------------------------------------------- helpers
def _short(identity: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {str(v)[:12]}" for k, v in sorted(identity.items()))


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names that share a parameter with an earlier name (sorted); one name of each tied group is stored, the same
    one safetensors' ``save_model`` keeps (``lm_head.weight`` rather than ``model.embed_tokens.weight``)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n for names in groups.values() for n in sorted(names)[1:]}


def _drop_missing_tied(model: nn.Module, sd: dict[str, torch.Tensor], stored: Mapping[str, tuple]) -> dict[str, Any]:
    """Leave out one name of a tied pair (lm_head.weight = embed_tokens.weight) when only its twin was stored."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    drop = set()
    for names in groups.values():
        if len(names) > 1 and any(n in stored for n in names):
            drop.update(n for n in names if n not in stored)
    return {k: v for k, v in sd.items() if k not in drop}


def _check_fits(path: Path, own: Mapping[str, torch.Tensor], stored: Mapping[str, tuple],
                ours: Callable[[str], bool], what: str) -> None:
    """A checkpoint that cannot be loaded into this model at any layout is refused in one line, before loading."""
    theirs = {k for k in stored if ours(k)}
    missing = [k for k in own if k not in stored]
    unexpected = sorted(theirs - set(own))
    wrong = [(k, tuple(stored[k]), tuple(own[k].shape)) for k in own
             if k in stored and tuple(own[k].shape) != tuple(stored[k])]
    if problem := state_mismatch(missing, unexpected, wrong):
        raise CheckpointError(f"{path} {what}: {problem}")


def _write_json_synced(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _tuplify(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuplify(o) for o in obj)
    return obj
