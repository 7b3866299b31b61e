"""The package's rooms (ARCHITECTURE.md): the library never imports an application, applications
never import each other, and no module imports itself through a loop, lazy imports included."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bavq"
# The command-line applications (mirrored in ARCHITECTURE.md); every other module is the library.
APPLICATIONS = ("bavq.train", "bavq.evaluate", "bavq.export", "bavq.tokenize", "bavq.prep", "bavq.report",
                "bavq.sweep")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def application_of(module: str) -> str | None:
    return next((app for app in APPLICATIONS if module == app or module.startswith(app + ".")), None)


def imported_modules(module: str, path: Path) -> set[str]:
    """Package modules that ``module`` imports anywhere in its file (top level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .blocks import x, from . import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import sub` imports the submodule sub
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. An import of one's own ancestor package (``from bavq
    import __version__``) is no edge: Python has imported the ancestors before the module runs."""
    return {module: {target for target in imported_modules(module, path)
                     if target != module and not module.startswith(target + ".")}
            for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_application_list_names_real_modules():
    assert all(app in MODULES for app in APPLICATIONS)
    assert "bavq.train.main" in MODULES and "bavq.cli" in MODULES and application_of("bavq.cli") is None


def test_importing_the_library_imports_no_application():
    library = [m for m in MODULES if application_of(m) is None]
    code = ("import importlib, json, sys\n"
            f"for name in {library!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert [m for m in loaded if m.startswith("bavq") and application_of(m)] == []


def test_no_import_crosses_a_room_or_closes_a_loop():
    graph = import_graph()
    crossings = []
    for module, targets in graph.items():
        mine = application_of(module)
        for target in sorted(targets):
            theirs = application_of(target)
            if theirs is not None and theirs != mine:
                crossings.append(f"{module} -> {target}" + (" (library imports an application)" if mine is None
                                                             else " (one application imports another)"))
    assert crossings == []
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_checks_see_lazy_imports_and_loops(tmp_path):
    """The graph reads imports inside functions, relative imports and `from pkg import module`."""
    graph = import_graph()
    assert "bavq.tokenizer" in graph["bavq"]  # bavq.__getattr__ imports it lazily
    assert "bavq.models.blocks" in graph["bavq.models.vqgan"]  # from .blocks import ...
    assert "bavq.dist" in graph["bavq.metrics"]  # from bavq import dist
    assert "bavq.quantizers._fused" in graph["bavq.quantizers._ops"]  # inside _fused_backend()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
