"""The main window: gallery (left), viewer (centre), one panel per stage (right), status bar.

It lays these out and wires them to the `Session` it owns, to the `ProjectFlow` that opens and
closes projects and to the `ImageDisplay` that shows the image chosen in the gallery pane, and it
fulfils the panels' requests (select an image, show a stage, put a widget in the centre). The
panels get the session, never the window.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
from PySide6.QtCore import QByteArray, QSettings, Qt
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence, QUndoStack
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QDockWidget,
    QLabel,
    QMainWindow,
    QMessageBox,
    QStackedWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from defect_studio.errors import DefectStudioError
from defect_studio.gui.dialogs import log_file, report_error
from defect_studio.gui.gallery_pane import GalleryPane
from defect_studio.gui.image_display import ImageDisplay
from defect_studio.gui.job_status import JobStatus
from defect_studio.gui.mask_editor import MaskEditor
from defect_studio.gui.project_flow import ProjectFlow
from defect_studio.gui.session import Session, Stage
from defect_studio.gui.shortcuts import SHORTCUTS, html_sheet
from defect_studio.gui.stage_tabs import StagePage, StageTabs
from defect_studio.gui.viewer import ImageViewer
from defect_studio.gui.workers import JobRunner
from defect_studio.project import Project

log = logging.getLogger(__name__)


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        self.setObjectName("mainWindow")
        self.setWindowTitle("defect-studio")
        self.settings = settings or QSettings()
        self.session = Session(self)
        # Connected before the panels connect theirs: the gallery and the counts are up to date
        # when a panel hears of a change.
        self.session.tag_requested.connect(self.tag_selected)
        self.session.counts_changed.connect(self._show_counts)
        self.session.project_changed.connect(self._on_project_changed)
        self.session.stage_requested.connect(self._show_stage)
        self.session.central_widget_requested.connect(self._show_in_centre)
        self.session.job_failed.connect(lambda runner, error, details: report_error(self, f"{runner.title} failed", error, details))
        self._actions: dict[str, QAction] = {}

        self._build_central()
        self._build_gallery_dock()
        self.editor = MaskEditor(self.viewer, self)
        self.editor.message.connect(lambda text: self.statusBar().showMessage(text, 6000))  # what the assist tool did
        self.editor.mask_saved.connect(self.session.notify_mask_state)
        self.image_display = ImageDisplay(self.session, self.viewer, self.editor, self.gallery_pane.next_item, self)
        self.image_display.message.connect(self._show_message)
        self.gallery_pane.current_image_changed.connect(self.image_display.show_image)
        self._build_stage_dock()
        self.project_flow = ProjectFlow(self.session, self.settings, self)
        self._wire_project_flow()
        self._build_status_bar()
        self._build_actions_and_menus()
        self._restore_window_state()
        self._update_title()
        self.gallery_pane.update_counts()
        self.stage_tabs.currentChanged.connect(self._on_stage_changed)

    # ================================================================= building
    def _build_central(self) -> None:
        self.viewer = ImageViewer(self)
        self.center_stack = QStackedWidget(self)
        self.center_stack.setObjectName("centerStack")
        self.center_stack.addWidget(self.viewer)
        self.empty_hint = QLabel(
            "<h2>No project open</h2><p>File ▸ Open folder… (Ctrl+O) opens a project, or makes one from a folder of images."
            "<br>File ▸ Open the demo project makes a small synthetic one to try the app on.</p>"
        )
        self.empty_hint.setObjectName("emptyHint")
        self.empty_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_hint.setWordWrap(True)
        self.center_stack.addWidget(self.empty_hint)
        self.center_stack.setCurrentWidget(self.empty_hint)
        self.setCentralWidget(self.center_stack)

    def _build_gallery_dock(self) -> None:
        dock = QDockWidget("Images", self)
        dock.setObjectName("galleryDock")
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.gallery_pane = GalleryPane(self.session, dock)
        self.gallery_pane.message.connect(self._show_message)
        self.session.image_requested.connect(self.gallery_pane.select_image)
        self.session.step_requested.connect(self.gallery_pane.step_image)
        dock.setWidget(self.gallery_pane)
        dock.setMinimumWidth(300)
        self._initial_dock_width = 430
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, dock)
        self.gallery_dock = dock

    def _build_stage_dock(self) -> None:
        from defect_studio.gui.panels.cam_panel import CamPanel
        from defect_studio.gui.panels.review_panel import ReviewPanel
        from defect_studio.gui.panels.rounds_panel import RoundsPanel
        from defect_studio.gui.panels.tag_panel import TagPanel
        from defect_studio.gui.panels.train_panel import TrainPanel

        dock = QDockWidget("Stages", self)
        dock.setObjectName("stageDock")
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.stage_tabs = StageTabs(dock)
        self.stage_tabs.setObjectName("stageTabs")
        self._panel_of_page = self.stage_tabs.panel_of_page
        session = self.session
        self.tag_panel = TagPanel(session, self)
        self.train_panel = TrainPanel(session, self)
        self.cam_panel = CamPanel(session, self.viewer, self)
        self.review_panel = ReviewPanel(session, self.editor, self)
        self.rounds_panel = RoundsPanel(session, self.editor, self)
        self.panel_of_stage: dict[Stage, QWidget] = {
            Stage.TAG: self.tag_panel, Stage.TRAIN: self.train_panel, Stage.CAMS: self.cam_panel,
            Stage.REVIEW: self.review_panel, Stage.ROUNDS: self.rounds_panel,
        }
        for panel, title, tip in (
            (self.tag_panel, "Tag", "Tag images good or defect (G / D / U)"),
            (self.train_panel, "Train", "Train the good/defect classifier"),
            (self.cam_panel, "CAMs", "Class activation maps: where the classifier sees the defect"),
            (self.review_panel, "Review", "Review and edit the proposed masks (A / R / B / E)"),
            (self.rounds_panel, "Rounds", "Refinement rounds, segmenter training and export"),
        ):
            # Scrollable, so the window fits small screens (1366 × 768 laptops) whatever a panel holds.
            scroller = StagePage(panel, self.stage_tabs)
            panel.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
            panel.setProperty("stagePanel", True)
            self._panel_of_page[scroller] = panel
            index = self.stage_tabs.addTab(scroller, title)
            self.stage_tabs.setTabToolTip(index, tip)
        dock.setWidget(self.stage_tabs)  # its minimum width is the widest panel's (StagePage)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        self.stage_dock = dock

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.device_label = QLabel(self)
        self.device_label.setObjectName("deviceLabel")
        self.device_label.setText(_device_text())
        bar.addWidget(self.device_label)
        self.job_status = JobStatus(self.session, bar, self)  # the running jobs, with Cancel
        self.job_label = self.job_status.label
        self.counts_label = QLabel(self)
        self.counts_label.setObjectName("countsLabel")
        bar.addPermanentWidget(self.counts_label)

    def _action(self, name: str, text: str, slot: Callable[[], object], checkable: bool = False) -> QAction:
        action = QAction(text, self)
        action.setObjectName(f"action_{name}")
        try:
            entry = next(s for s in SHORTCUTS if s.action == name)
        except StopIteration:
            entry = None
        if entry is not None:
            action.setShortcuts([QKeySequence(key) for key in entry.keys])
            action.setToolTip(f"{entry.description} ({entry.keys[0]})")
            action.setStatusTip(entry.description)
        action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        action.setCheckable(checkable)
        action.triggered.connect(lambda *_: slot())
        self.addAction(action)  # shortcuts work even while the menu bar is hidden
        self._actions[name] = action
        return action

    def action(self, name: str) -> QAction:
        return self._actions[name]

    def _build_actions_and_menus(self) -> None:
        menu = self.menuBar()
        file_menu = menu.addMenu("&File")
        file_menu.addAction(self._action("open_project", "&Open folder…", self.project_flow.choose_folder))
        file_menu.addAction(self._action("open_demo", "Open the &demo project", self.project_flow.open_demo))
        file_menu.addSeparator()
        file_menu.addAction(self._action("export", "&Export segmenter…", lambda: self.rounds_panel.open_export_dialog()))
        file_menu.addSeparator()
        file_menu.addAction(self._action("quit", "&Quit", self.close))

        edit_menu = menu.addMenu("&Edit")
        edit_menu.addAction(self._action("undo", "&Undo", self.undo))
        edit_menu.addAction(self._action("redo", "&Redo", self.redo))

        tag_menu = menu.addMenu("&Tag")
        tag_menu.addAction(self._action("tag_good", "Tag &good", lambda: self.tag_selected("good")))
        tag_menu.addAction(self._action("tag_defect", "Tag &defect", lambda: self.tag_selected("defect")))
        tag_menu.addAction(self._action("untag", "&Untag", lambda: self.tag_selected("untagged")))
        tag_menu.addAction(self._action("confirm_tag", "&Confirm tag (suspect tags)", lambda: self.gallery_pane.suspects.confirm_selected()))
        tag_menu.addSeparator()
        tag_menu.addAction(self._action("next_image", "&Next image", lambda: self.gallery_pane.step_image(+1)))
        tag_menu.addAction(self._action("previous_image", "&Previous image", lambda: self.gallery_pane.step_image(-1)))

        review_menu = menu.addMenu("&Review")
        review_menu.addAction(self._action("accept_mask", "&Accept mask", lambda: self.review_panel.accept_current()))
        review_menu.addAction(self._action("reject_mask", "&Reject mask", lambda: self.review_panel.reject_current()))
        review_menu.addAction(self._action("reject_rest", "Reject the &rest…", lambda: self.review_panel.reject_rest()))
        review_menu.addAction(self._action("rank_queue", "Order the queue edit-&first", lambda: self.review_panel.rank_queue()))
        review_menu.addAction(self._action("queue_order", "Switch the queue &order", lambda: self.review_panel.toggle_queue_order()))
        review_menu.addSeparator()
        review_menu.addAction(self._action("brush", "&Brush", lambda: self.review_panel.choose_tool("brush")))
        review_menu.addAction(self._action("eraser", "&Eraser", lambda: self.review_panel.choose_tool("eraser")))
        review_menu.addAction(self._action("assist", "A&ssist (grow from a stroke)", lambda: self.review_panel.choose_tool("assist")))
        review_menu.addAction(self._action("pan_tool", "&Pan / zoom", lambda: self.review_panel.choose_tool("")))
        review_menu.addAction(self._action("brush_smaller", "Smaller brush", lambda: self.editor.set_brush_size(self.editor.brush_size - max(1, self.editor.brush_size // 6))))
        review_menu.addAction(self._action("brush_larger", "Larger brush", lambda: self.editor.set_brush_size(self.editor.brush_size + max(1, self.editor.brush_size // 6))))
        review_menu.addAction(self._action("fill_holes", "&Fill holes", lambda: self.review_panel.fill_holes()))

        view_menu = menu.addMenu("&View")
        view_menu.addAction(self._action("fit_view", "&Fit image", self.viewer.fit))
        view_menu.addAction(self._action("toggle_overlay", "Show &overlays", self.toggle_overlays))
        view_menu.addSeparator()
        view_menu.addAction(self.gallery_dock.toggleViewAction())
        view_menu.addAction(self.stage_dock.toggleViewAction())

        help_menu = menu.addMenu("&Help")
        help_menu.addAction(self._action("shortcut_sheet", "&Keyboard shortcuts", self.show_shortcut_sheet))
        help_menu.addAction(self._action("show_log", "Where is the &log file?", self._show_log_location))
        help_menu.addAction(self._action("about", "&About defect-studio", self._show_about))

    # ================================================================= window state
    def _restore_window_state(self) -> None:
        geometry = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self.resize(1480, 900)
            self.resizeDocks([self.gallery_dock, self.stage_dock], [self._initial_dock_width, 420], Qt.Orientation.Horizontal)
        if isinstance(state, QByteArray) and not state.isEmpty():
            self.restoreState(state)
        tab = self.settings.value("window/stageTab", 0, type=int)
        self.stage_tabs.setCurrentIndex(int(tab))

    def _save_window_state(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.setValue("window/stageTab", self.stage_tabs.currentIndex())
        if self.project is not None:
            self.settings.setValue("project/last", str(self.project.path))
        self.settings.sync()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        self._save_window_state()
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop and join every thread, save the last edit, close the project. Safe to call twice."""
        self.project_flow.close_project()
        # With no project open too: the demo project's making, decodes ahead, thumbnails.
        self.session.shutdown_jobs()
        self.cam_panel.shutdown()
        self.image_display.shutdown()
        self.gallery_pane.shutdown()

    # ================================================================= the session, as the window's API
    @property
    def project(self) -> Project | None:
        return self.session.project

    @property
    def current_image_id(self) -> int | None:
        return self.session.image_id

    @property
    def current_pixels(self) -> np.ndarray | None:
        return self.session.pixels

    @property
    def current_round(self) -> int | None:
        return self.session.round

    def make_runner(self, title: str) -> JobRunner:
        """A JobRunner whose progress shows in the status bar; joined when the window closes."""
        return self.session.make_runner(title)

    def busy_runners(self) -> list[JobRunner]:
        return self.session.busy_runners()

    def notify_masks_changed(self) -> None:
        """Rounds or mask records changed (new proposals, a new round): refresh everything."""
        self.session.notify_masks_changed()

    # ================================================================= projects (the project flow, as the window's API)
    def open_path(self, folder: Path) -> bool:
        """Open the project at `folder`, or make one of the images there and import them."""
        return self.project_flow.open_path(folder)

    def create_project(self, image_dir: Path, project_dir: Path | None = None, labels_csv: Path | None = None) -> bool:
        """Make a project of the images in `image_dir` and import them in the background."""
        return self.project_flow.create_project(image_dir, project_dir, labels_csv)

    def set_project(self, project: Project | None) -> None:
        """Show `project` (the window closes it), or no project: None closes the open one."""
        self.project_flow.set_project(project)

    def _wire_project_flow(self) -> None:
        flow = self.project_flow
        flow.closing.connect(self._let_go_of_project)
        flow.closed.connect(self.gallery_pane.refresh)  # it lists nothing now
        flow.opening.connect(self._prepare_for_project)
        flow.opened.connect(self._show_project)
        flow.images_imported.connect(self.gallery_pane.refresh)
        flow.message.connect(self._show_message)
        self.session.rescan_requested.connect(flow.rescan)
        # The demo is made in the import's runner: its action waits, disabled, while an import runs.
        flow.import_runner.started.connect(lambda _: self._update_demo_action())
        flow.import_runner.finished.connect(lambda _: self._update_demo_action())

    def _update_demo_action(self) -> None:
        self.action("open_demo").setEnabled(not self.project_flow.import_runner.busy)

    def _let_go_of_project(self) -> None:
        """The project closes next (its jobs have stopped): save its last edit and drop all that reads it."""
        try:
            self.editor.flush()
        except DefectStudioError as error:
            log.warning("could not save the last edit: %s", error)
        self.editor.set_project(None)
        self.cam_panel.shutdown()
        self.image_display.shutdown()
        self.gallery_pane.set_project(None)
        self.viewer.set_image(None)

    def _prepare_for_project(self, project: Project) -> None:
        """`project` becomes the session's next: the parts that keep per-project state start on it."""
        self.gallery_pane.set_project(project)
        self.editor.set_project(project)

    def _on_project_changed(self) -> None:
        self._update_title()
        self.center_stack.setCurrentWidget(self.viewer if self.project is not None else self.empty_hint)

    def _show_project(self, project: Project) -> None:
        """After the panels heard of `project`: list its images and show the first."""
        self.gallery_pane.refresh()
        if self.gallery_pane.gallery_model.rowCount() > 0:
            self.gallery_pane.select_row(0)

    def _update_title(self) -> None:
        if self.project is None:
            self.setWindowTitle("defect-studio")
        else:
            self.setWindowTitle(f"{self.project.image_root.name} — defect-studio  [{self.project.path}]")

    def _show_message(self, text: str, timeout_ms: int) -> None:
        self.statusBar().showMessage(text, timeout_ms)

    # ================================================================= tagging
    def tag_selected(self, tag: str) -> None:
        # In the Tag stage a single image tagged moves the selection on: tag, next, tag, next...
        self.gallery_pane.tag_selected(tag, advance=self.stage_tabs.currentWidget() is self.tag_panel)

    # ================================================================= undo / redo
    def _undo_target(self) -> QUndoStack | None:
        """In the Review tab undo goes to the image's mask strokes; elsewhere to the tag changes."""
        if self.stage_tabs.currentWidget() is self.review_panel and self.editor.undo_stack is not None:
            return self.editor.undo_stack
        return self.gallery_pane.tag_stack

    def undo(self) -> None:
        stack = self._undo_target()
        if stack is not None and stack.canUndo():
            stack.undo()

    def redo(self) -> None:
        stack = self._undo_target()
        if stack is not None and stack.canRedo():
            stack.redo()

    # ================================================================= view and stages
    def toggle_overlays(self) -> None:
        visible = not self.viewer.mask_layer.isVisible()
        for item in (self.viewer.mask_layer, self.viewer.heat_item, self.viewer.outline_item):
            item.setVisible(visible if item is not self.viewer.heat_item else visible and self.viewer.heatmap is not None)

    def _on_stage_changed(self, index: int) -> None:
        widget = self.stage_tabs.widget(index)
        for stage, panel in self.panel_of_stage.items():
            if panel is widget:
                self.session.set_stage(stage)  # each panel shows or hides its overlays itself

    def _show_stage(self, stage: str) -> None:
        self.stage_tabs.setCurrentWidget(self.panel_of_stage[Stage(stage)])

    def _show_in_centre(self, widget: QWidget | None) -> None:
        """A panel's view in the centre (the CAM comparison), or None: the image viewer again."""
        if widget is None:
            if self.project is not None:
                self.center_stack.setCurrentWidget(self.viewer)
            return
        if self.center_stack.indexOf(widget) < 0:
            self.center_stack.addWidget(widget)
        self.center_stack.setCurrentWidget(widget)

    def _show_counts(self, counts: dict[str, int]) -> None:
        text = (f"{counts['images']} images · {counts.get('good', 0)} good · {counts.get('defect', 0)} defect · "
                f"{counts.get('untagged', 0)} untagged")
        round_index = self.current_round if self.project is not None else None
        if round_index is not None:
            text += f" · round {round_index}: {counts['to_review']} to review"
        self.counts_label.setText(text)

    # ================================================================= help
    def show_shortcut_sheet(self) -> None:
        dialog = QDialog(self)
        dialog.setObjectName("shortcutSheet")
        dialog.setWindowTitle("Keyboard shortcuts")
        layout = QVBoxLayout(dialog)
        text = QTextBrowser(dialog)
        text.setHtml(html_sheet())
        text.setMinimumSize(560, 560)
        layout.addWidget(text)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, dialog)
        buttons.rejected.connect(dialog.close)
        layout.addWidget(buttons)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        self.shortcut_dialog = dialog

    def _show_log_location(self) -> None:
        box = QMessageBox(QMessageBox.Icon.Information, "Log file", f"Details of errors are written to\n{log_file()}", parent=self)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()

    def _show_about(self) -> None:
        from defect_studio import __version__

        box = QMessageBox(QMessageBox.Icon.Information, "About defect-studio",
                          f"defect-studio {__version__}\nFrom images tagged good/defect to a pixel-level defect segmenter.",
                          parent=self)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()


def _device_text() -> str:
    # Loads torch (seconds) on the GUI thread, under the start-up splash (app.TRAINING_ENGINE_MODULES
    # says why not in a worker thread).
    try:
        from defect_studio.ml.device import describe_device

        return f"Device: {describe_device()}"
    except Exception as error:  # torch missing or broken: the app still tags and reviews
        log.warning("no device description: %s", error)
        return "Device: unavailable"

