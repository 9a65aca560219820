"""The core never imports Qt: the CLI, the benchmarks and a headless server must run without it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import defect_studio

REPO = Path(__file__).resolve().parents[1]


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
