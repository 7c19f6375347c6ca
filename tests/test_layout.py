"""The shape of the code base: layers import downwards only, no import cycles, one home per stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tasks.caching import imported_modules

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bitnet", "kernels", "tasks", "flows")


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module → project modules it imports anywhere (module level or inside functions)."""
    files = [f for p in PACKAGES for f in (ROOT / p).rglob("*.py")]
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        found = imported_modules(file, package)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = _imports()
    # a package __init__ that imports its own submodules is the package's API, not a cycle
    acyclic = {m: {d for d in deps if not (m.startswith(f"{d}.") and (ROOT / d.replace(".", "/")).is_dir())}
               for m, deps in graph.items()}
    assert _cycles(acyclic) == []


@pytest.mark.parametrize(("package", "forbidden"), [("bitnet", ("flows", "tasks", "prefect", "mlflow", "sky")),
                                                    ("kernels", ("flows", "tasks", "prefect", "bitnet.stages")),
                                                    ("tasks", ("flows",))])
def test_layers_import_downwards(package: str, forbidden: tuple[str, ...]) -> None:
    bad = []
    for file in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{file.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in forbidden or
                    any(n == f or n.startswith(f"{f}.") for f in forbidden)]
    assert bad == []


def test_kernels_hold_tensor_functions_only() -> None:
    """kernels/ defines no nn.Module: modules that use the kernels live in bitnet/."""
    for file in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not bases & {"nn.Module", "torch.nn.Module", "Module"}, f"{file.name}: {node.name}"


def test_every_stage_is_one_registered_module() -> None:
    from bitnet.stages import STAGES
    from flows.config import PipelineConfig

    expected = {"world", "teacher", "convert", "layerwise", "cpt", "kd", "lrc", "select", "export", "eval"}
    assert set(STAGES) == expected
    for name, st in STAGES.items():
        assert st.module == f"bitnet.stages.{name}" and st.config.__module__ in (st.module, "bitnet.world")
    # the pipeline's sections are stages of the registry, in pipeline order
    assert set(PipelineConfig.stage_names()) <= set(STAGES)
    names = [c.__name__ for st in STAGES.values() for c in (st.config,)]
    assert len(names) == len(set(names))


def test_package_root_exports_the_public_api() -> None:
    import bitnet

    for name in ("convert_to_bitnet", "BitNetConfig", "BitLinear", "BitLinearLRC", "SubLN", "save_student",
                 "load_student", "export_gguf"):
        assert callable(getattr(bitnet, name)), name
