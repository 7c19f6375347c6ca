"""Who owns a stage's output directory, and what a run may do to it.

Every stage output holds ``stage.json``: the stage's name and the *identity* of the run that wrote it (digests of
its config, its fingerprint and the content of each input), and whether it finished. Before a stage runs,
:func:`claim_output` decides:

* ``out`` is absent or empty → a fresh output;
* ``out`` holds a finished output of the same stage and identity → nothing to do (its metrics are reused);
* ``out`` holds an unfinished output of the same stage and identity → a resume (training stages continue from
  their checkpoints under ``out/train``);
* anything else — a plain file, a directory of another command or stage, an output of another config or other
  inputs — is refused with a one-line error naming the difference. Nothing is deleted.

:func:`sweep_stale` removes what killed runs left next to and inside ``out`` (temporary directories of
``bitnet.io.atomic_dir``); the trainer sweeps its own checkpoint temporaries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from bitnet.io import OverwriteRefusedError, content_digest, sha256_json, sweep_temporaries, write_json_atomic

STAGE_RECORD = "stage.json"
TRAIN_DIR = "train"
NEUTRAL_CONFIG = ("train.progress",)  # settings that do not change a stage's result (not part of its identity)

log = logging.getLogger("bitdistill.stages")

Claim = Literal["fresh", "finished", "resume"]


def _drop(config: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = config
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def input_identity(path: str | Path) -> str:
    """Content identity of one input: the ``content`` its artifact manifest records, else the digest of its files
    (tensor values, configs; see :func:`bitnet.io.content_digest`); a hub id stands for itself."""
    p = Path(path)
    if not p.exists():
        return f"name:{path}"
    manifest = p / "manifest.json"
    if manifest.is_file():
        try:
            content = json.loads(manifest.read_text()).get("content")
        except ValueError:
            content = None
        if content:
            return f"content:{content}"
    return f"content:{content_digest(p)}" if p.is_dir() else f"file:{content_digest(p.parent, [p.name])}"


def identity_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stage config as its identity sees it: JSON values, without the settings that cannot change the output
    (:data:`NEUTRAL_CONFIG`). The one place that decides it, for the CLI's ``stage.json``, the flow's store key and
    Prefect's cache key alike."""
    cfg = json.loads(json.dumps(dict(config), default=str))
    for dotted in NEUTRAL_CONFIG:
        _drop(cfg, dotted)
    return cfg


def stage_identity(name: str, config: dict[str, Any], fingerprint: Mapping[str, Any] | None,
                   inputs: Mapping[str, Path]) -> dict[str, str]:
    """What determines a stage's output apart from the code: digests of its config (:func:`identity_config`), its
    fingerprint (e.g. the corpus listing) and each input's content."""
    identity = {"stage": name, "config": sha256_json(identity_config(config))}
    if fingerprint:
        identity["fingerprint"] = sha256_json(dict(fingerprint))
    for k, path in sorted(inputs.items()):
        identity[f"input.{k}"] = sha256_json(input_identity(path))
    return identity


def read_record(out: str | Path) -> dict[str, Any] | None:
    """The ``stage.json`` of ``out`` (``None`` when there is none or it is unreadable)."""
    f = Path(out) / STAGE_RECORD
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def run_identity(out: str | Path) -> dict[str, str] | None:
    """The identity recorded for ``out``: what the trainer writes into its checkpoints (``Trainer(identity=)``)."""
    rec = read_record(out)
    return dict(rec["identity"]) if rec and isinstance(rec.get("identity"), dict) else None


def write_record(out: str | Path, name: str, identity: Mapping[str, str], *, finished: bool) -> None:
    write_json_atomic(Path(out) / STAGE_RECORD, {"stage": name, "identity": dict(identity), "finished": finished})


def forget_output(out: str | Path) -> None:
    """Mark ``out`` unfinished so the next run of its stage recomputes it (it stays in place until replaced)."""
    rec = read_record(out)
    if rec is not None and rec.get("finished"):
        write_json_atomic(Path(out) / STAGE_RECORD, {**rec, "finished": False})


def _short(v: Any) -> str:
    return str(v)[:12]


def claim_output(out: str | Path, name: str, identity: Mapping[str, str]) -> Claim:
    """What running stage ``name`` with ``identity`` into ``out`` means (see the module doc); raises
    :class:`~bitnet.io.OverwriteRefusedError` when ``out`` is not this run's to write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OverwriteRefusedError(f"refusing to write stage {name} into {out}: it is a file, not an output directory")
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if not [e for e in entries if e != STAGE_RECORD]:  # nothing but the record of a run that failed at once
        return "fresh"
    rec = read_record(out)
    if rec is None:
        if set(entries) <= {TRAIN_DIR}:  # trainer checkpoints only (e.g. restored by a worker): they check identity
            return "resume"
        if name == "world" and "world.json" in entries:  # a world built before stage records: rebuilt atomically
            return "resume"
        raise OverwriteRefusedError(
            f"refusing to write stage {name} into {out}: it is not empty and is not a stage output (no "
            f"{STAGE_RECORD}); pass another --out")
    if rec.get("stage") != name:
        raise OverwriteRefusedError(
            f"refusing to write stage {name} into {out}: it holds the output of stage {rec.get('stage')!r}; "
            "pass another --out")
    saved = rec.get("identity") or {}
    if saved != dict(identity):
        diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        detail = ", ".join(f"{k} {_short(saved.get(k))} vs {_short(identity.get(k))}" for k in diff)
        raise OverwriteRefusedError(
            f"refusing to resume stage {name} in {out}: it holds a run of another config or other inputs ({detail}); "
            "pass another --out or delete it")
    return "finished" if rec.get("finished") and (out / "metrics.json").is_file() else "resume"


_STALE = re.compile(r"^\..+\.(tmp|old)-[^/]+$")


def sweep_stale(out: str | Path) -> list[str]:
    """Remove temporary directories killed runs left: ``.NAME.tmp-*`` / ``.NAME.old-*`` inside ``out`` and those of
    ``out`` itself next to it (``bitnet.io.atomic_dir``), and any temporary of a killed writer next to ``out``
    (``bitnet.io.sweep_temporaries``, e.g. the nested one of a killed world build). Call it holding the output's
    lock."""
    out = Path(out)
    swept = sweep_temporaries(out.parent) if out.parent.is_dir() else []
    found: list[Path] = []
    if out.is_dir():
        found += [p for p in out.iterdir() if _STALE.match(p.name)]
    if out.parent.is_dir():
        found += [p for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")) and not _alive(p)]
        found += [p for p in [out.parent / f".{out.name}.out-lock"] if p.is_file()]  # where locks were before 2026-12
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if found:
        log.warning("removed %d stale temporary director%s of killed runs: %s", len(found),
                    "y" if len(found) == 1 else "ies", ", ".join(str(p) for p in found))
    return swept + [str(p) for p in found]


def _alive(p: Path) -> bool:
    """An ``.old-PID`` directory of a process that still runs is not stale."""
    m = re.search(r"\.old-(\d+)(?:@[A-Za-z0-9-]*)?$", p.name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(m.group(1)) != os.getpid()
