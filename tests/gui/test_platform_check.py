"""Qt cannot start here (no display, a missing system library, an unwritable log folder): one plain
line saying what to do, exit code 2, never Qt's abort or a Python traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from defect_studio.gui import platform_check

REPO = Path(__file__).resolve().parents[2]
DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "XDG_SESSION_TYPE", "QT_QPA_PLATFORM")


def start_the_app(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`run_app()` in a fresh process (as `defect-studio` runs it) with only the display variables given."""
    environment = {key: value for key, value in os.environ.items() if key not in DISPLAY_VARIABLES}
    environment.update(HOME=str(tmp_path), DEFECT_STUDIO_LOG_DIR=str(tmp_path / "logs"), **env)
    return subprocess.run([sys.executable, "-c", "from defect_studio.gui.app import run_app; raise SystemExit(run_app())"],
                          env=environment, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def assert_one_plain_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("defect-studio cannot open its window"), result.stderr[-2000:]
    return lines[0]


def test_no_display_is_one_plain_line(tmp_path: Path) -> None:
    line = assert_one_plain_line(start_the_app(tmp_path))
    assert "DISPLAY is not set" in line and "xvfb-run" in line


def test_an_x_display_that_does_not_answer_is_one_plain_line(tmp_path: Path) -> None:
    line = assert_one_plain_line(start_the_app(tmp_path, DISPLAY=":87"))
    # Either the plugin's libraries are there and the display is the problem, or they are named.
    assert "does not answer" in line or "sudo apt-get install" in line


def test_missing_xcb_libraries_name_the_packages_to_install(monkeypatch) -> None:
    monkeypatch.setattr(platform_check, "can_load", lambda library: library not in ("libxcb-cursor.so.0", "libxcb-icccm.so.4"))
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.delenv("XDG_SESSION_TYPE", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    problem = platform_check.qt_start_problem()
    assert problem is not None and "\n" not in problem
    assert problem.endswith("sudo apt-get install libxcb-cursor0 libxcb-icccm4")
    # Offscreen needs no display and no xcb plugin; Qt's GUI libraries still count.
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert platform_check.qt_start_problem() is None
    monkeypatch.setattr(platform_check, "can_load", lambda library: library != "libEGL.so.1")
    assert platform_check.qt_start_problem().endswith("sudo apt-get install libegl1")


@pytest.mark.parametrize("env, platform", [
    ({}, "xcb"),
    ({"QT_QPA_PLATFORM": "wayland;xcb"}, "wayland"),
    ({"QT_QPA_PLATFORM": "xcb:nograb"}, "xcb"),
    ({"XDG_SESSION_TYPE": "wayland", "WAYLAND_DISPLAY": "wayland-0"}, "wayland"),
    ({"XDG_SESSION_TYPE": "x11", "WAYLAND_DISPLAY": "wayland-0"}, "xcb"),
])
def test_the_platform_qt_will_try(monkeypatch, env: dict[str, str], platform: str) -> None:
    for name in DISPLAY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert platform_check.qt_platform() == platform


def test_the_readme_names_every_package_the_check_asks_for() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"sudo apt-get install ([^\n`]+)", readme)
    assert commands, "the README has no apt-get line for Qt's system libraries"
    named = set(commands[0].split())
    assert named == set(platform_check.QT_GUI_LIBRARIES.values()) | set(platform_check.XCB_PLUGIN_LIBRARIES.values())


def test_an_unwritable_log_folder_is_a_line_on_stderr_not_a_crash(qtbot, review_project: Path, tmp_path: Path,
                                                                  monkeypatch, capsys) -> None:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from defect_studio.gui.app import run_app
    from defect_studio.gui.main_window import MainWindow

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DEFECT_STUDIO_LOG_DIR", str(blocker / "logs"))

    def close_when_open() -> None:
        windows = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if windows and windows[0].project is not None:
            windows[0].close()
        else:
            QTimer.singleShot(50, close_when_open)

    QTimer.singleShot(50, close_when_open)
    assert run_app(review_project) == 0
    assert "cannot write its log file" in capsys.readouterr().err
