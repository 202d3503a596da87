"""The package's shape, checked so it cannot silently decay (docs/architecture.md describes it):
the layer contract of pyproject.toml (import-linter), no import circle between any two modules, no
function-local import of the package's own modules, and a first docstring line for every module."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "apo_ray"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None, reason="import-linter not installed")
def test_layer_contract_is_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, check=False,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _own_imports(path: Path) -> set[str]:
    """The apo_ray modules ``path`` imports at module level (``from apo_ray.x import y`` counts
    ``apo_ray.x.y`` when that is a module, else ``apo_ray.x``)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("apo_ray"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if _module_file(sub) else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("apo_ray")}
    return {m for m in out if _module_file(m)}


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle():
    graph = {_name(p): _own_imports(p) for p in _modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt.endswith("__init__"):
                continue
            if state.get(nxt) == 1:
                circle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_function_local_import_of_own_modules():
    """Imports inside functions hide the real dependency graph; the only ones allowed keep an
    optional third-party dependency optional, and those are never of apo_ray itself."""
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    module = inner.module if isinstance(inner, ast.ImportFrom) else None
                    names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
                    if (module or "").startswith("apo_ray") or any(n.startswith("apo_ray") for n in names):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert not found, "function-local imports of apo_ray: " + ", ".join(found)


def test_every_module_says_what_it_is():
    missing = [str(p.relative_to(ROOT)) for p in _modules()
               if p.name != "__init__.py" and not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    packages = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")
                if p.parent != PACKAGE and not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert not missing and not packages, f"no docstring: {missing + packages}"
