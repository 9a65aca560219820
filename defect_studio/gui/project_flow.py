"""Opening, creating, importing into and closing the project: File ▸ Open folder…, File ▸ Open the
demo project, the Tag stage's Rescan, and `defect-studio open PROJECT`.

`ProjectFlow` sets the `Session`'s project and runs the core's jobs (the import, the making of the
demo project) in a runner of the session, as the CLI runs the same jobs. It never touches the window's
widgets: the parts that hold the project follow its signals, in this order:

- `closing`: the open project is about to close and its jobs have stopped: save and let go of it;
- `closed`: it is closed and the session has none (the panels have heard of it);
- `opening(project)`: `project` is about to become the session's;
- `opened(project)`: the session has it (the panels have heard of it);
- `images_imported`: an import into the open project finished;
- `message(text, ms)`: a line for the status bar.

Imports, rescans and the making of the demo share one runner (the session's "import" runner), one job
at a time: the window disables Rescan and Open the demo project while it runs, and a call meanwhile
says so in the status bar.

Errors the user can act on (a folder that is no project, a project open in another window) show in
a dialog over the window.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, QSettings, Qt, QTimer, Signal
from PySide6.QtWidgets import QFileDialog, QMessageBox, QWidget

from defect_studio.errors import DefectStudioError
from defect_studio.gui.dialogs import report_error
from defect_studio.gui.session import Session
from defect_studio.project import Project
from defect_studio.project.location import default_project_dir, find_project_dir


class ProjectFlow(QObject):
    closing = Signal()
    closed = Signal()
    opening = Signal(object)  # Project
    opened = Signal(object)  # Project
    images_imported = Signal()
    message = Signal(str, int)  # status-bar text and how long to show it (ms)

    def __init__(self, session: Session, settings: QSettings, parent: QWidget) -> None:
        super().__init__(parent)
        self.session = session
        self._settings = settings
        self._dialog_parent = parent
        self.import_runner = session.shared_runner("import", "Import")  # the Tag stage's Rescan follows it
        self.import_runner.succeeded.connect(self._on_import_done)

    def choose_folder(self) -> None:
        """Ask for a folder (starting at the last one chosen) and open it."""
        start = self._settings.value("project/lastFolder", str(Path.home()))
        folder = QFileDialog.getExistingDirectory(self._dialog_parent, "Open a project, or a folder of images to make one from",
                                                  str(start))
        if folder:
            self._settings.setValue("project/lastFolder", folder)
            self.open_path(Path(folder))

    def open_path(self, folder: Path) -> bool:
        """Open the project at `folder` (or in `folder/.defect-studio`), else create one there and import."""
        folder = Path(folder)
        try:
            project_dir = find_project_dir(folder)
            if project_dir is None:
                return self.create_project(folder)
            if self.session.project is not None and self.session.project.path.resolve() == project_dir.resolve():
                # Opening it again would meet its own lock ("open in another defect-studio").
                self.message.emit(f"{project_dir} is open already.", 6000)
                return True
            self.set_project(Project.open(project_dir))
        except DefectStudioError as error:
            report_error(self._dialog_parent, "Cannot open the project", error)
            return False
        return True

    def create_project(self, image_dir: Path, project_dir: Path | None = None, labels_csv: Path | None = None) -> bool:
        """Make a project of the images in `image_dir` and import them in the background."""
        from defect_studio.project.importer import import_job

        project_dir = project_dir or default_project_dir(image_dir)
        try:
            project = Project.create(project_dir, image_dir)
        except DefectStudioError as error:
            report_error(self._dialog_parent, "Cannot create the project", error)
            return False
        self.set_project(project)
        self.import_runner.start(lambda cancel: import_job(project, image_dir, labels_csv, cancel), "Import images")
        return True

    def rescan(self) -> None:
        """Import images added to the folder since (re-import is safe: known images are skipped)."""
        from defect_studio.project.importer import import_job

        project = self.session.project
        if project is None or self._refused_while_importing("import the folder's new images"):
            return
        self.import_runner.start(lambda cancel: import_job(project, project.image_root, None, cancel), "Import images")

    def open_demo(self) -> None:
        """Make (once) and open the synthetic demo project, in the background (the core's demo job)."""
        from defect_studio.project.demo_project import default_demo_dir, demo_project_exists, demo_project_job

        if self._refused_while_importing("open the demo project"):
            return
        out_dir = default_demo_dir()
        if demo_project_exists(out_dir):
            self.open_path(out_dir / "project")
            return
        self.import_runner.start(lambda cancel: demo_project_job(out_dir, cancel), "Make the demo project")

    def _refused_while_importing(self, what: str) -> bool:
        """Whether the import runner is busy, saying in the status bar that `what` waits for it: a start now
        would be refused without a word (a rescan or the demo while an import runs)."""
        if not self.import_runner.busy:
            return False
        self.message.emit(f"“{self.import_runner.title}” is still running: {what} when it has finished.", 6000)
        return True

    def set_project(self, project: Project | None) -> None:
        """Close the open project, then make `project` the session's (None: no project). This flow closes
        it in turn, when the next one opens or the window closes."""
        self.close_project()
        if project is None:
            return
        self.opening.emit(project)
        self._settings.setValue("project/last", str(project.path))
        self.session.set_project(project)
        self.opened.emit(project)
        if project.took_over_stale_lock:
            # Say so: the user may wonder whether the crash cost them work (it did not: saves are atomic).
            self.message.emit(
                f"This project was left locked by {project.took_over_stale_lock}, which has ended "
                "(a crash?). Everything it saved is here.", 20000)

    def close_project(self) -> None:
        """Stop the open project's jobs, let the window's parts save and let go of it, and close it."""
        project = self.session.project
        if project is None:
            return
        self.session.shutdown_jobs()  # a job must not outlive the project it writes to
        self.closing.emit()
        self.session.set_project(None)
        project.close()
        self.closed.emit()

    def _on_import_done(self, result: object) -> None:
        if isinstance(result, Path):  # the demo job returns the project folder to open
            QTimer.singleShot(0, lambda: self.open_path(result))
            return
        self.images_imported.emit()
        lines = getattr(result, "lines", None)
        if callable(lines):
            summary = lines()
            self.message.emit(summary[0], 8000)
            if getattr(result, "skipped", None):
                box = QMessageBox(QMessageBox.Icon.Information, "Import finished", "\n".join(summary[:30]),
                                  parent=self._dialog_parent)
                box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
                box.open()
