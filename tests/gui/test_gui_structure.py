"""The GUI package's shape, read from its source: no import circle among its modules (every
import counts: at module level, inside functions, under TYPE_CHECKING), only what starts the main
window names it (not the panels, nor the parts it wires), the project flow reaches no widget, and
nothing in the GUI matches a progress event by its stage's wording."""

from __future__ import annotations

import ast
from pathlib import Path

import defect_studio.gui

GUI_DIR = Path(defect_studio.gui.__file__).parent
GUI_PACKAGE = "defect_studio.gui"


def module_files(root: Path, package: str) -> dict[str, Path]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the module `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 more
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from package import module` imports the module; `from module import name`, the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = module_files(root, package)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        on_path.discard(node)
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_check_sees_a_circle_through_an_import_inside_a_function(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "panels").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "panels" / "__init__.py").write_text("")
    (package / "window.py").write_text("from pkg.panels.panel import Panel\n")
    (package / "panels" / "panel.py").write_text("def show():\n    from ..window import format_eta\n")
    assert find_cycle(import_graph(package, "pkg")) == ["pkg.panels.panel", "pkg.window", "pkg.panels.panel"]
    (package / "panels" / "panel.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import window\n")
    assert find_cycle(import_graph(package, "pkg")) is not None
    (package / "panels" / "panel.py").write_text("def show():\n    pass\n")
    assert find_cycle(import_graph(package, "pkg")) is None


def test_the_gui_package_has_no_import_circle() -> None:
    graph = import_graph(GUI_DIR, GUI_PACKAGE)
    assert "defect_studio.gui.panels.cam_panel" in graph["defect_studio.gui.main_window"]  # the graph is read
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


# They start the window (the app, the screenshot script); no other module of the GUI knows it.
WINDOW_STARTERS = {f"{GUI_PACKAGE}.main_window", f"{GUI_PACKAGE}.app", f"{GUI_PACKAGE}.screenshots"}


def test_no_panel_or_part_of_the_window_knows_the_main_window() -> None:
    """Panels, the gallery pane, the project flow, the image display... get the session (and the widgets
    they draw on), never the window."""
    modules = module_files(GUI_DIR, GUI_PACKAGE)
    assert {f"{GUI_PACKAGE}.panels.review_panel", f"{GUI_PACKAGE}.project_flow"} <= set(modules)
    for name, path in modules.items():
        if name in WINDOW_STARTERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert "MainWindow" not in names and "window_" not in attributes, name
        assert f"{GUI_PACKAGE}.main_window" not in imported_modules(name, path, set(modules)), name


def test_the_project_flow_knows_the_session_and_the_core_not_the_widgets() -> None:
    """It opens and closes projects through the session and the core's jobs; the gallery, the editor and
    the panels follow its signals, so it imports none of them."""
    path = GUI_DIR / "project_flow.py"
    imported = imported_modules(f"{GUI_PACKAGE}.project_flow", path, set(module_files(GUI_DIR, GUI_PACKAGE)))
    assert f"{GUI_PACKAGE}.session" in imported  # the imports are read
    assert imported <= {f"{GUI_PACKAGE}.session", f"{GUI_PACKAGE}.dialogs", f"{GUI_PACKAGE}.workers"}


def test_no_progress_event_is_matched_by_its_stage_text() -> None:
    """`Progress.stage` is words for people; code matches `Progress.kind`."""
    offences = []
    for path in sorted(GUI_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(operand, ast.Attribute) and operand.attr == "stage" for operand in operands):
                    offences.append(f"{path.relative_to(GUI_DIR)}:{node.lineno}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
                if isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "stage":
                    offences.append(f"{path.relative_to(GUI_DIR)}:{node.lineno}")
    assert offences == []
