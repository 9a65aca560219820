"""Open the main window on a project the way `defect-studio open PROJECT` does (gui.app.run_app),
offscreen; close it once the project's images are listed. Fails when it does not get there within
two minutes, when it is unstyled (resources missing from the install), or when an error is logged."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from defect_studio.gui.app import run_app  # noqa: E402
from defect_studio.gui.dialogs import log_file  # noqa: E402
from defect_studio.gui.main_window import MainWindow  # noqa: E402

TIMEOUT_MS = 120_000


def main() -> int:
    project = Path(sys.argv[1])
    app = QApplication(sys.argv[:1])
    seen: dict[str, object] = {}

    def close_when_shown() -> None:
        windows = [w for w in app.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if windows and windows[0].project is not None and windows[0].gallery_pane.gallery_model.rowCount() > 0:
            seen["images"] = windows[0].gallery_pane.gallery_model.rowCount()
            seen["styled"] = bool(app.styleSheet()) and not app.windowIcon().isNull()
            windows[0].close()
        else:
            QTimer.singleShot(100, close_when_shown)

    def give_up() -> None:
        seen["timed out"] = True
        app.exit(1)

    QTimer.singleShot(0, close_when_shown)
    QTimer.singleShot(TIMEOUT_MS, give_up)
    code = run_app(project)
    errors = [line for line in log_file().read_text(encoding="utf-8").splitlines() if " ERROR " in line] \
        if log_file().is_file() else []
    print(f"run_app returned {code}; seen {seen}; {len(errors)} error(s) logged")
    for line in errors:
        print(line, file=sys.stderr)
    ok = code == 0 and not seen.get("timed out") and seen.get("styled") is True and not errors
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
