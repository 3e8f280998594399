"""The house rules (docs/architecture.md), checked on the source: which package may import which, no
import circles inside a package nor between packages, only the composition root builds the parts,
no torch behind the HTTP layer, no disk inside lora/."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "server" / "mole_serve"

FORBIDDEN = {  # package -> packages of server it must not import
    "lora": {"library", "routing", "api", "training", "engine"},
    "engine": {"library", "api", "training", "compose", "deploy"},
    "routing": {"library", "engine", "api", "training", "compose", "deploy"},
    "library": {"engine", "api", "training", "compose", "deploy"},
    "api": {"training", "compose", "deploy"},
}
DISK_MODULES = {"safetensors", "pathlib", "os", "shutil", "json", "tempfile"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Modules imported anywhere in the file (functions included), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


MODULES = {module_name(p): runtime_imports(p) for p in ROOT.rglob("*.py")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_the_layers_allow(package):
    bad = sorted(
        (mod, imp)
        for mod, imports in MODULES.items()
        if mod.startswith(f"mole_serve.{package}.")
        for imp in imports
        for other in FORBIDDEN[package]
        if imp.startswith(f"mole_serve.{other}")
    )
    assert not bad, bad


def test_lora_never_touches_disk():
    bad = sorted(
        (mod, imp)
        for mod, imports in MODULES.items()
        if mod.startswith("mole_serve.lora.")
        for imp in imports
        if imp.split(".")[0] in DISK_MODULES
    )
    assert not bad, bad


def first_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path that comes back to where it started, or None (depth-first, in name order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node, [node]))), None)


def package_of(module: str) -> str:
    """mole_serve.engine.engine -> engine; a top-level module (mole_serve.compose) is its own."""
    return module.split(".")[1] if "." in module else module


def test_no_import_circles_inside_a_package():
    graph = {
        mod: {
            imp for imp in imports if imp in MODULES and imp != mod and imp.rsplit(".", 1)[0] == mod.rsplit(".", 1)[0]
        }
        for mod, imports in MODULES.items()
    }
    circle = first_circle(graph)
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_no_import_circles_between_packages():
    graph: dict[str, set[str]] = {}
    for mod, imports in MODULES.items():
        deps = {package_of(imp) for imp in imports if imp in MODULES}
        graph.setdefault(package_of(mod), set()).update(deps - {package_of(mod)})
    circle = first_circle(graph)
    assert circle is None, f"packages import in a circle: {' -> '.join(circle)}"


BUILT_BY_THE_ROOT = re.compile(r"(?<![\w.])(LLMEngine|Catalog|Retriever|Embedder)\(")


def test_only_the_composition_root_builds_engine_and_library():
    """The parts receive what they serve from; only compose.py constructs the engine, the catalog
    and the retriever (train-retriever fits a projection on a plain encoder of its own)."""
    allowed = {"compose.py", "training/train_retriever.py"}
    bad = sorted(
        (str(path.relative_to(ROOT)), found)
        for path in ROOT.rglob("*.py")
        if str(path.relative_to(ROOT)) not in allowed
        for found in BUILT_BY_THE_ROOT.findall(path.read_text())
    )
    assert not bad, bad


def test_the_http_layer_imports_no_torch():
    code = (
        "import sys, mole_serve.api.app, mole_serve.api.serving, mole_serve.api.openai_routes, "
        "mole_serve.api.admin_routes; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
