"""Error dialogs and the log file: the user sees a clear message, the details go to the log."""

from __future__ import annotations

import logging
import logging.handlers
import os
import traceback
from pathlib import Path

from PySide6.QtCore import QStandardPaths, Qt
from PySide6.QtWidgets import QMessageBox, QWidget

from defect_studio.errors import DefectStudioError

log = logging.getLogger("defect_studio.gui")

LOG_DIR_ENV = "DEFECT_STUDIO_LOG_DIR"  # tests point it at a temporary folder


def log_dir() -> Path:
    override = os.environ.get(LOG_DIR_ENV)
    if override:
        return Path(override)
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
    return Path(base or Path.home() / ".defect-studio") / "logs"


def log_file() -> Path:
    return log_dir() / "defect-studio.log"


_installed_handler: logging.Handler | None = None


def install_log_file() -> Path:
    """Send the package's log records (and uncaught exceptions) to a rotating log file."""
    global _installed_handler
    path = log_file()
    if _installed_handler is not None and getattr(_installed_handler, "baseFilename", None) == str(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("defect_studio")
    if _installed_handler is not None:
        root.removeHandler(_installed_handler)
        _installed_handler.close()
    # Rotating appends are not atomic writes, by design: a log is appended to, never replaced.
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=2_000_000, backupCount=3, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    _installed_handler = handler
    return path


def remove_log_file_handler() -> None:
    global _installed_handler
    if _installed_handler is not None:
        logging.getLogger("defect_studio").removeHandler(_installed_handler)
        _installed_handler.close()
        _installed_handler = None


def describe_error(error: BaseException) -> tuple[str, bool]:
    """(message for the user, whether it was unexpected)."""
    if isinstance(error, DefectStudioError):
        return str(error), False
    return (
        f"Something went wrong that the app did not expect ({type(error).__name__}: {error}).\n\n"
        f"The details were written to the log file:\n{log_file()}",
        True,
    )


def report_error(parent: QWidget | None, title: str, error: BaseException, details: str | None = None) -> None:
    """Show a dialog for `error`; unexpected errors also get their traceback logged (not shown)."""
    message, unexpected = describe_error(error)
    if unexpected:
        log.error("%s: %s\n%s", title, error, details or "".join(traceback.format_exception(error)))
    else:
        log.warning("%s: %s", title, message)
    if os.environ.get("DEFECT_STUDIO_NO_DIALOGS"):  # headless benchmark/screenshot runs
        return
    box = QMessageBox(QMessageBox.Icon.Warning if not unexpected else QMessageBox.Icon.Critical, title, message, parent=parent)
    box.setObjectName("errorDialog")
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    # open(), not exec(): no nested event loop, so a running job keeps reporting behind the dialog.
    box.open()


def confirm(parent: QWidget | None, title: str, question: str) -> bool:
    """Ask yes/no before a change of many records at once (Enter says yes)."""
    if os.environ.get("DEFECT_STUDIO_NO_DIALOGS"):  # headless benchmark/screenshot runs: nobody to ask
        return True
    answer = QMessageBox.question(parent, title, question, QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.Yes)
    return answer == QMessageBox.StandardButton.Yes
