"""The core never imports Qt: the CLI, the benchmarks and a headless server must run without it."""

from __future__ import annotations

import ast
import pkgutil
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import defect_studio

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(defect_studio.__file__).resolve().parent


def core_modules() -> list[str]:
    names = []
    for module in pkgutil.walk_packages(defect_studio.__path__, prefix="defect_studio."):
        if not module.name.startswith("defect_studio.gui") and not module.name.endswith("__main__"):
            names.append(module.name)
    return sorted(names)


def test_there_are_core_modules_to_check():
    modules = core_modules()
    assert {"defect_studio.project.store", "defect_studio.jobs", "defect_studio.cli"} <= set(modules)


def test_importing_every_core_module_loads_no_qt():
    script = (
        "import importlib, sys\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "qt = sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'PyQt5', 'PyQt6', 'shiboken6', 'pyqtgraph'))\n"
        "print(qt)\n"
        "sys.exit(1 if qt else 0)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_project_store_needs_no_torch():
    script = (
        "import sys\nimport defect_studio.project.store, defect_studio.project.importer\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == 0


# ----------------------------------------------------------------------------------------------------
# The same rule on the whole import graph, read from the source: every `import` anywhere in a module
# (inside functions, methods and `if TYPE_CHECKING:` blocks too) and `importlib.import_module("...")`
# with a literal or f-string name. Importing a module never runs these function-level imports, so
# the test above cannot see them; this one does, and names the chain that reaches Qt.

QT_PACKAGES = frozenset({"PySide6", "PyQt5", "PyQt6", "shiboken6", "pyqtgraph"})
# Modules that are Qt by nature: the window, and the benchmark that drives it.
QT_FACES = ("defect_studio.gui", "defect_studio.bench.gui_responsiveness")
# The only places the core may reach a Qt face: the commands that start the app, each a
# function-level import in the named function, so the CLI still runs where Qt is absent.
LAUNCH_POINTS = {
    ("defect_studio.cli", "main"): {"defect_studio.gui.app", "defect_studio.gui"},
    ("defect_studio.cli.project_cmds", "run_demo"): {"defect_studio.gui.app", "defect_studio.gui"},
    ("defect_studio.cli.project_cmds", "run_open"): {"defect_studio.gui.app", "defect_studio.gui"},
    # `bench` imports `defect_studio.bench.<which>`, read here as any bench module; `which` does not
    # offer gui_responsiveness (it runs with `python -m`), and if it did, that would be a launch point.
    ("defect_studio.cli.bench_cmds", "run_bench"): {"defect_studio.bench.gui_responsiveness"},
}


@dataclass(frozen=True)
class ImportEdge:
    target: str  # a module of the package, or the top-level name of anything else
    function: str  # the enclosing function ("" at module level)
    line: int


def _is_qt_face(name: str) -> bool:
    return any(name == face or name.startswith(face + ".") for face in QT_FACES)


def _is_forbidden(name: str) -> bool:
    return name.split(".")[0] in QT_PACKAGES or _is_qt_face(name)


def package_modules(package_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package under package_dir."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.module, self.known = module, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.functions: list[str] = []
        self.edges: list[ImportEdge] = []

    def _add(self, name: str, node: ast.AST) -> None:
        function = ".".join(self.functions)
        root = self.module.split(".")[0]
        if name.split(".")[0] != root:
            self.edges.append(ImportEdge(name.split(".")[0], function, node.lineno))
            return
        parts = name.split(".")
        for end in range(len(parts), 0, -1):  # importing a.b.c runs a.b.c, a.b and a (named first: a.b.c)
            prefix = ".".join(parts[:end])
            if prefix in self.known:
                self.edges.append(ImportEdge(prefix, function, node.lineno))
        if name not in self.known and _is_qt_face(name):  # a face module the package does not have
            self.edges.append(ImportEdge(name, function, node.lineno))

    def _visit_function(self, node: ast.AST) -> None:
        self.functions.append(node.name)  # type: ignore[attr-defined]
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        self._add(base, node)
        for alias in node.names:
            if f"{base}.{alias.name}" in self.known:  # a submodule, not a name defined in base
                self._add(f"{base}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args:
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                self._add(argument.value, node)
            elif isinstance(argument, ast.JoinedStr):
                prefix = ""
                for part in argument.values:
                    if isinstance(part, ast.Constant):
                        prefix += str(part.value)
                    elif isinstance(part.value, ast.Name) and part.value.id == "__name__":  # type: ignore[attr-defined]
                        prefix += self.module
                    else:
                        break
                for module in sorted(self.known):  # any module the name could be
                    if module.startswith(prefix) and module != prefix.rstrip("."):
                        self._add(module, node)
        self.generic_visit(node)


def import_graph(package_dir: Path) -> dict[str, list[ImportEdge]]:
    modules = package_modules(package_dir)
    graph = {}
    for name, path in modules.items():
        collector = _ImportCollector(name, path.name == "__init__.py", set(modules))
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[name] = collector.edges
    return graph


def qt_violations(package_dir: Path) -> list[str]:
    """Every module outside the Qt faces that imports Qt or a Qt face, directly or through the
    package's own modules, at module level or in a function; one chain per module."""
    graph = import_graph(package_dir)
    violations = []
    for start in sorted(graph):
        if _is_qt_face(start):
            continue
        seen, stack = {start}, [(start, [start])]
        while stack:
            module, chain = stack.pop()
            found = None
            for edge in graph.get(module, []):
                if edge.target in LAUNCH_POINTS.get((module, edge.function), set()):
                    continue
                where = f"{edge.target} ({module}:{edge.line}{' in ' + edge.function if edge.function else ''})"
                if _is_forbidden(edge.target):
                    found = chain + [where]
                    break
                if edge.target in graph and edge.target not in seen:
                    seen.add(edge.target)
                    stack.append((edge.target, chain + [where]))
            if found:
                violations.append(" -> ".join(found))
                break
    return violations


def test_no_core_module_reaches_qt_through_any_import():
    violations = qt_violations(PACKAGE_DIR)
    assert not violations, "the core imports Qt:\n" + "\n".join(violations)


def test_the_graph_sees_function_level_and_dynamic_imports():
    graph = import_graph(PACKAGE_DIR)
    targets = {(edge.target, edge.function) for edge in graph["defect_studio.cli.project_cmds"]}
    assert ("defect_studio.gui.app", "run_open") in targets  # a function-level import
    dynamic = {edge.target for edge in graph["defect_studio.ml.cams"]}
    assert "defect_studio.ml.cams.compute" in dynamic  # importlib.import_module("...")
    assert "defect_studio.cli.project_cmds" in {edge.target for edge in graph["defect_studio.cli"]}  # f"{__name__}.{..}"


def _copy_package(tmp_path: Path) -> Path:
    copy = tmp_path / "defect_studio"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return copy


def _plant(path: Path, code: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n\n" + code + "\n", encoding="utf-8")


@pytest.mark.parametrize(
    ("module_file", "code", "expected"),
    [
        # deep in the core, inside a function: reached from the CLI through the store
        ("errors.py", "def _show(message):\n    from PySide6.QtWidgets import QMessageBox\n", "defect_studio.errors -> PySide6"),
        ("project/schema.py", "def _plot():\n    import pyqtgraph\n", "defect_studio.project.schema -> pyqtgraph"),
        # the core reaching into the GUI package, under TYPE_CHECKING, or by name
        ("project/review.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from defect_studio.gui.main_window import MainWindow\n",
         "defect_studio.gui.main_window"),
        ("jobs/__init__.py", "def _late():\n    import importlib\n    return importlib.import_module('defect_studio.gui.workers')\n",
         "defect_studio.gui.workers"),
        ("imageio.py", "def _ui():\n    from .gui import dialogs\n", "defect_studio.gui"),
        # a launch point is one named function, not the whole module
        ("cli/project_cmds.py", "def run_preview(args):\n    from defect_studio.gui.app import run_app\n", "in run_preview"),
    ],
)
def test_a_planted_qt_import_fails_the_rule(tmp_path: Path, module_file: str, code: str, expected: str):
    copy = _copy_package(tmp_path)
    assert qt_violations(copy) == []  # the copy is clean, like the package
    _plant(copy / module_file, code)
    violations = qt_violations(copy)
    assert violations and any(expected in chain for chain in violations), violations
    if module_file in ("errors.py", "project/schema.py"):  # reached through other modules: the chain shows how
        assert any(chain.startswith("defect_studio.cli") and chain.count("->") >= 2 for chain in violations), violations


def test_the_benchmarks_never_import_the_cli_and_the_cli_reaches_them_only_to_run_them():
    """No cli <-> bench loop: the benchmarks take their options from bench.options and their tables from
    defect_studio.markdown (which `evaluate` prints too); the CLI imports bench only in `bench`."""
    graph = import_graph(PACKAGE_DIR)
    upward = [f"{module}:{edge.line} -> {edge.target}" for module, edges in graph.items()
              if module.startswith("defect_studio.bench") for edge in edges if edge.target.startswith("defect_studio.cli")]
    assert not upward, upward
    into_bench = {(module, edge.target) for module, edges in graph.items() if module.startswith("defect_studio.cli")
                  for edge in edges if edge.target.startswith("defect_studio.bench")
                  and not (module == "defect_studio.cli.bench_cmds" and edge.function == "run_bench")}
    assert into_bench <= {("defect_studio.cli.bench_cmds", "defect_studio.bench.options"),
                          ("defect_studio.cli.bench_cmds", "defect_studio.bench")}, into_bench
