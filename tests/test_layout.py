"""The shape of the code base: layers import downwards only, no import cycles, one home per stage."""

from __future__ import annotations

import ast
import re
import tomllib
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


# --------------------------------------------------------------------------------------------- one home per option
def _sequences_of_strings(file: Path) -> list[set[str]]:
    """The string constants of every tuple/list/set literal and every ``Literal[...]`` in ``file``."""
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Literal"):
            node = node.slice
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            found.append({e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)})
    return found


def test_export_options_are_spelled_once() -> None:
    """The export types and options are the ``Literal``s of bitnet/export/quants.py; no other module of ours lists
    them again (the stage config, export_gguf, the plan's checks and the CLI's choices use those), and the per-type
    tables cover exactly them."""
    from bitnet.export import quants
    from bitnet.export.gguf import _FILE_TYPES
    from bitnet.stages.export import ExportConfig
    from flows.cli import build_parser

    options = {"weight": set(quants.WEIGHT_TYPES), "embedding": set(quants.EMBEDDING_TYPES),
               "fallback": set(quants.FALLBACKS), "delta": set(quants.DELTA_MODES)}
    for name, file in _modules().items():
        if name != "bitnet.export.quants":
            for strings in _sequences_of_strings(file):
                assert not [k for k, v in options.items() if v <= strings], f"{file.relative_to(ROOT)}: {strings}"
    assert set(quants.TERNARY_QTYPES) == set(_FILE_TYPES) == options["weight"]
    assert set(quants.EMBEDDING_QTYPES) == options["embedding"]
    assert ExportConfig.model_fields["weight_type"].annotation == quants.WeightType
    assert ExportConfig.model_fields["embedding_type"].annotation == quants.EmbeddingType
    assert ExportConfig.model_fields["fallback"].annotation == quants.Fallback
    parser = build_parser()
    for flag, values in (("--type", quants.WEIGHT_TYPES), ("--embedding-type", quants.EMBEDDING_TYPES),
                         ("--fallback", quants.FALLBACKS), ("--delta", quants.DELTA_MODES)):
        for value in values:
            parser.parse_args(["export", "--student", "s", flag, value])


# ------------------------------------------------------------------------------------------------------ the CLI
def test_cli_uses_no_private_argparse_attributes() -> None:
    """One console script, ``flows.cli:main``, builds its parser through bitnet/cli.py's public builders; nothing
    of ours reaches into argparse's private attributes (``_actions``, ``_SubParsersAction``, ...)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"bitdistill": "flows.cli:main"}
    for file in [*_modules().values(), *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {"_actions", "_SubParsersAction", "_subparsers",
                                                                 "_group_actions", "_option_string_actions"}:
                raise AssertionError(f"{file.relative_to(ROOT)}:{node.lineno}: argparse's private {node.attr}")


# ---------------------------------------------------------------------------------------------- docs and CI
ARCHITECTURE = ROOT / "docs" / "architecture.md"
TOP_LEVEL = {p.name for p in ROOT.iterdir()} - {"runs", "mlruns", ".venv"}


def _named_paths(text: str) -> list[str]:
    """Every repository path a markdown text names in backticks (``a/b.py``, ``a/b/``, ``a/<name>.py``): the first
    segment a top-level entry of the repository."""
    tokens = re.findall(r"`([^`\s]+)`", text)
    return [t for t in tokens if "/" in t and t.split("/")[0] in TOP_LEVEL and "://" not in t]


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_architecture_doc_names_only_what_exists_and_links_only_inside() -> None:
    """docs/architecture.md (the map, the recipes): every file or directory it names exists (a file to create is
    written with a ``<placeholder>`` and needs its directory), and every link stays in the repository."""
    text = ARCHITECTURE.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    paths = _named_paths(text)
    assert len(paths) > 30  # the map and the recipes are checked, not an empty match
    for path in paths:
        if "<" in path:
            assert (ROOT / path.split("<")[0]).is_dir(), path
        elif not (ROOT / path).exists():  # `tasks/caching.code_digest`: a module and a name it defines
            folder, _, last = path.rpartition("/")
            module, _, name = last.partition(".")
            file = ROOT / folder / f"{module}.py"
            assert name and file.is_file(), path
            assert re.search(rf"^(\s*(def|class) {name}\b|{name}\s*[:=])", file.read_text(), flags=re.M), path
    for link in _links(text):
        target, _, anchor = link.partition("#")
        assert "://" not in target and not target.startswith(("/", "mailto:")), f"leaves the repository: {link}"
        if target:
            resolved = (ARCHITECTURE.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"no such file in the repository: {link}"
        else:
            assert anchor in anchors, f"no heading for {link}"


def test_architecture_map_reaches_the_loss_in_five_hops() -> None:
    """The map from ``bitdistill run --set kd.temperature=2`` to the loss: at most five numbered hops, from the
    entry point to bitnet/objectives.py, each naming where it is."""
    section = ARCHITECTURE.read_text().split("## From the CLI to the loss", 1)[1].split("\n## ", 1)[0]
    hops = [line for line in section.splitlines() if line[:1].isdigit() and line[1:3] == ". "]
    assert 1 < len(hops) <= 5
    assert hops[0].startswith("1. `flows/cli.py`") and hops[-1].startswith(f"{len(hops)}. `bitnet/objectives.py`")
    for recipe in ("Adding a stage", "Adding a model family", "Adding a compute backend", "Adding a kernel"):
        assert f"### {recipe}\n" in ARCHITECTURE.read_text()


def test_ci_runs_ruff_and_the_import_layer_test() -> None:
    """.ci/run is `make test`, which runs ``ruff check .`` and the whole of tests/ (this file included)."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check ." in recipe and "-m pytest" in recipe and "--ignore" not in recipe
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert any(r.startswith("ruff") for r in pyproject["project"]["optional-dependencies"]["test"])
    assert any(line.startswith("ruff==") for line in (ROOT / "requirements.lock").read_text().splitlines())
