"""The shape of the code base: layers import downwards only, no import cycles, one home per stage."""

from __future__ import annotations

import ast
from pathlib import Path

from tasks.caching import imported_modules

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bitnet", "kernels", "tasks", "flows")
# The layers, bottom up: each package may import itself and the packages listed for it, nothing else of ours.
ALLOWED = {"kernels": (), "bitnet": ("kernels",), "tasks": ("bitnet", "kernels"),
           "flows": ("tasks", "bitnet", "kernels")}
# Orchestration libraries: only tasks/ and flows/ may import them (bitnet/ and kernels/ run without Prefect & co.).
ORCHESTRATION = ("prefect", "mlflow", "sky")
NO_ORCHESTRATION = ("kernels", "bitnet")


def _module_name(file: Path, root: Path = ROOT) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(f, root): f for p in PACKAGES if (root / p).is_dir() for f in (root / p).rglob("*.py")}


def _imported(file: Path, name: str) -> set[str]:
    """Every module ``file`` (module ``name``) imports anywhere: import statements at any depth (relative ones
    resolved, function-local and ``TYPE_CHECKING`` ones included) and ``importlib.import_module("literal")``."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = imported_modules(file, package)
    for node in ast.walk(ast.parse(file.read_text())):
        if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
                and node.args and isinstance(arg := node.args[0], ast.Constant) and isinstance(arg.value, str)):
            found.add(arg.value)
    return found


def _imports() -> dict[str, set[str]]:
    """Module → project modules it imports anywhere (module level or inside functions)."""
    modules = _modules()
    return {name: {m for m in _imported(file, name) if m in modules and m != name} for name, file in modules.items()}


def upward_imports(root: Path = ROOT) -> list[str]:
    """Every import under ``root`` that goes against :data:`ALLOWED` or :data:`ORCHESTRATION`, as ``file: module``."""
    bad: set[str] = set()
    for name, file in _modules(root).items():
        layer = name.split(".")[0]
        for imported in _imported(file, name):
            top = imported.split(".")[0]
            upward = top in PACKAGES and top != layer and top not in ALLOWED[layer]
            if upward or (layer in NO_ORCHESTRATION and top in ORCHESTRATION):
                bad.add(f"{file.relative_to(root)}: {imported}")
    return sorted(bad)


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


def test_layers_import_downwards() -> None:
    """kernels → nothing of ours; bitnet → kernels; tasks → bitnet, kernels; flows → all three.
    Neither kernels nor bitnet imports prefect, mlflow or sky."""
    assert upward_imports() == []


def test_upward_imports_are_caught(tmp_path: Path) -> None:
    """The check sees an upward import wherever it hides: in a function, relative, under TYPE_CHECKING, by name."""
    sources = {
        "kernels/__init__.py": "",
        "kernels/ok.py": "import torch\nfrom kernels import quant\n",
        "kernels/bad.py": "def f():\n    from bitnet.quant import ste\n    return ste\n",
        "bitnet/__init__.py": "",
        "bitnet/ok.py": "from kernels.quant import ACT_EPS\nfrom . import bad\n",
        "bitnet/bad.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tasks import caching\n",
        "bitnet/sub/__init__.py": "",
        "bitnet/sub/orch.py": "def run():\n    import prefect.flows\n",
        "tasks/__init__.py": "",
        "tasks/bad.py": "import importlib\nCLI = importlib.import_module('flows.cli')\n",
        "flows/__init__.py": "",
        "flows/ok.py": "import prefect\nfrom tasks import bad\nfrom bitnet import ok\nfrom kernels import ok as k\n",
    }
    for path, text in sources.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert upward_imports(tmp_path) == ["bitnet/bad.py: tasks", "bitnet/bad.py: tasks.caching",
                                        "bitnet/sub/orch.py: prefect.flows", "kernels/bad.py: bitnet.quant",
                                        "kernels/bad.py: bitnet.quant.ste", "tasks/bad.py: flows.cli"]


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
