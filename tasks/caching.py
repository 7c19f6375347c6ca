"""Cache keys of the stage tasks: INPUTS + TASK_SOURCE + a digest of the code each stage runs.

Prefect's ``TASK_SOURCE`` hashes only the task function's own source; the training math lives in ``bitnet/``.
:class:`CodeDigest` adds a sha256 over the ``bitnet`` modules a stage can execute: the static import closure
(``ast``; module-level and function-local ``import bitnet.x`` / ``from bitnet.x import y``) of the stage's entry
modules. Changing the training math re-runs the stages that import it (e.g. ``bitnet/objectives.py`` re-runs
the teacher and student stages, not the world build); a new module nobody imports re-runs nothing.
``BITDISTILL_CODE_VERSION`` pins the digest to a chosen string (e.g. to keep a 10B-token stage after a
docstring edit; use with care).
"""

from __future__ import annotations

import ast
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

CODE_VERSION_ENV = "BITDISTILL_CODE_VERSION"


CODE_PACKAGES = ("bitnet", "kernels")  # the training math and the kernels BitLinear dispatches to


def code_roots() -> list[Path]:
    """Package directories whose modules can determine stage outputs."""
    import importlib

    return [Path(importlib.import_module(name).__file__).parent for name in CODE_PACKAGES]  # type: ignore[arg-type]


def _module_file(root: Path, module: str) -> Path | None:
    """``bitnet.a.b`` → ``root/a/b.py`` or ``root/a/b/__init__.py`` (``root`` is the ``bitnet`` directory)."""
    parts = module.split(".")[1:]
    base = root.joinpath(*parts) if parts else root
    for cand in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if cand is not None and cand.is_file():
            return cand
    return None


def imported_modules(file: Path, package: str) -> set[str]:
    """Every module named by an import statement in ``file`` (anywhere in it), with relative imports resolved."""
    tree = ast.parse(file.read_text(), filename=str(file))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from bitnet.data import loader`
    return found


def code_files(modules: tuple[str, ...], roots: list[Path]) -> list[Path]:
    """Files of ``modules`` and of every module of the ``roots`` packages they import, transitively."""
    by_name = {r.name: r for r in roots}
    ours = lambda m: m.split(".")[0] in by_name  # noqa: E731
    seen: dict[str, Path] = {}
    todo = [m for m in modules if ours(m)]
    while todo:
        mod = todo.pop()
        if mod in seen or (file := _module_file(by_name[mod.split(".")[0]], mod)) is None:
            continue
        seen[mod] = file
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages' __init__ run first
        package = mod if file.name == "__init__.py" else ".".join(parts[:-1])
        todo += [m for m in imported_modules(file, package) if ours(m)]
    return sorted(set(seen.values()))


def code_digest(modules: tuple[str, ...] = CODE_PACKAGES, roots: list[Path] | None = None) -> str:
    """sha256 over the sources ``modules`` can run (see the module doc), or the pinned version."""
    if pinned := os.environ.get(CODE_VERSION_ENV):
        return f"pinned:{pinned}"
    roots = roots or code_roots()
    h = hashlib.sha256()
    for f in code_files(modules, roots):
        root = next(r for r in roots if f.is_relative_to(r))
        h.update(f.relative_to(root.parent).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class StageCode(CachePolicy):
    """Cache-key component of the stage task: the digest of the code stage ``name`` imports, its config identity
    (:func:`bitnet.stages.outputs.identity_config`), its upstream content identities, and the stage's own fingerprint
    of what its config points at (the world's corpus listing: names, sizes, mtimes/etags)."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        from bitnet.io import sha256_json
        from bitnet.stages import STAGES
        from bitnet.stages.outputs import identity_config

        st = STAGES[inputs["name"]]
        fingerprint = st.fingerprint(inputs["cfg"]) if st.fingerprint else {}
        config = identity_config(inputs["cfg"].model_dump(mode="json"))
        return sha256_json({"code": code_digest((st.module,)), "upstream": upstream_identity(inputs["inputs"]),
                            "config": config, **fingerprint})


def upstream_identity(inputs: Mapping[str, Any]) -> dict[str, str]:
    """What a stage key hashes of its upstream artifacts: their content identity (tensor values, configs), never
    their manifest bytes (timestamps, producers) or where they live."""
    from tasks.artifacts import ArtifactRef

    return {k: (r if isinstance(r, ArtifactRef) else ArtifactRef.model_validate(r)).identity
            for k, r in sorted(inputs.items())}


def stage_cache_policy() -> CachePolicy:
    """INPUTS (minus ``reuse_only`` and ``compute``, which decide whether and where a stage computes, not what it
    holds, minus ``inputs``, the upstream refs, which enter by content identity, and minus ``cfg``, which enters as
    :func:`bitnet.stages.outputs.identity_config`, the same view the store key and ``stage.json`` take) +
    TASK_SOURCE + the stage's code digest, config identity, upstream content identities and fingerprint."""
    return (INPUTS - "reuse_only" - "compute" - "inputs" - "cfg") + TASK_SOURCE + StageCode()
