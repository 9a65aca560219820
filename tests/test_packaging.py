"""What a plain `pip install .` gets: every package folder, the resources as package data, and a
declared dependency behind every import the app makes at module level. (.ci/first-run installs it
for real, with no extras, and imports every module.)"""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_package_folder_and_the_resources_are_installed() -> None:
    folders = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "defect_studio").rglob("__init__.py")}
    assert folders | {"defect_studio.resources"} == set(SETUPTOOLS["packages"])
    assert SETUPTOOLS["package-dir"] == {"defect_studio.resources": "resources"}
    patterns = SETUPTOOLS["package-data"]["defect_studio.resources"]
    data_files = [path.relative_to(REPO / "resources").as_posix() for path in (REPO / "resources").rglob("*")
                  if path.is_file() and path.suffix != ".py" and "__pycache__" not in path.parts]
    assert "style.qss" in data_files and "icons/app.svg" in data_files
    for name in data_files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), f"resources/{name} is not package data"


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when the module loads (not inside functions or try blocks: those
    are on use, or optional)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_level_import_is_a_declared_dependency() -> None:
    declared = {canonical(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))
                for requirement in PYPROJECT["project"]["dependencies"]}
    distributions = packages_distributions()
    undeclared = []
    for path in sorted((REPO / "defect_studio").rglob("*.py")):
        for name in module_level_imports(path):
            if name in sys.stdlib_module_names or name in ("defect_studio", "__future__"):
                continue
            providers = {canonical(distribution) for distribution in distributions.get(name, [])}
            if not providers & declared:
                undeclared.append(f"{path.relative_to(REPO)}: {name} (from {sorted(providers) or 'nothing installed'})")
    assert undeclared == []
