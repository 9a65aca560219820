"""Screenshots of every stage on the demo project, for the README and for checking by eye.

    xvfb-run -s "-screen 0 1600x1000x24" python -m defect_studio.gui.screenshots --out docs/screenshots

Runs the real window on the X server of DISPLAY (Xvfb above: the README's screenshots are taken
so, at 1600×1000), or offscreen without one: opens a fresh demo project, tags, trains a small
classifier, shows CAMs (single and side by side), makes proposals, paints an edit, runs a
refinement round and opens the export dialog, taking a picture of the window at each step (from
the X server's screen when there is one).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from defect_studio.project import Project


def wait_for(app: Any, predicate: Callable[[], bool], timeout_s: float = 600.0) -> bool:
    from PySide6.QtCore import QEventLoop

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 30)
        if predicate():
            return True
        time.sleep(0.005)
    return False


def settle(app: Any, seconds: float = 0.4) -> None:
    wait_for(app, lambda: False, seconds)


def grab(widget: Any, path: Path) -> Path:
    """The widget as the screen shows it: read back from the X server under xcb, else rendered."""
    from PySide6.QtWidgets import QApplication

    path.parent.mkdir(parents=True, exist_ok=True)
    if QApplication.platformName() == "xcb":
        picture = widget.screen().grabWindow(widget.winId())
    else:
        picture = widget.grab()
    if not picture.save(str(path)):
        raise OSError(f"could not write {path}")
    print(f"wrote {path}")
    return path


def paint_stroke(app: Any, viewer: Any, points: list[tuple[float, float]]) -> None:
    from PySide6.QtCore import QEvent, QPointF, Qt
    from PySide6.QtGui import QMouseEvent
    from PySide6.QtTest import QTest

    viewport = viewer.viewport()
    widget_points = [viewer.scene_to_widget(x, y) for x, y in points]
    QTest.mousePress(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, widget_points[0].toPoint())
    for point in widget_points[1:]:
        event = QMouseEvent(QEvent.Type.MouseMove, QPointF(point), viewport.mapToGlobal(QPointF(point)),
                            Qt.MouseButton.NoButton, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
        app.sendEvent(viewport, event)
    QTest.mouseRelease(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, widget_points[-1].toPoint())


def _shoot_tagging(app: Any, window: Any, project: Project, defect_id: int, out_dir: Path) -> list[Path]:
    # A few untagged images make the tagging screenshot honest: not every image comes tagged.
    untagged = [image.id for image in project.images()][5:9]
    project.set_tags(untagged, "untagged")
    window.gallery_pane.refresh()
    wait_for(app, lambda: window.gallery_pane.thumbnails is not None and window.gallery_pane.thumbnails.is_idle() and bool(
        window.gallery_pane.gallery_model.rowCount()), 60)
    settle(app, 1.0)
    window.stage_tabs.setCurrentWidget(window.tag_panel)
    window.gallery_pane.select_image(defect_id)
    settle(app)
    return [grab(window, out_dir / "01-tag.png")]


def _shoot_training(app: Any, window: Any, out_dir: Path) -> list[Path]:
    panel = window.train_panel
    window.stage_tabs.setCurrentWidget(panel)
    panel.form.set_values({"epochs": 8, "min_epochs": 8, "input_size": 128, "batch_size": 16, "patience": 8})
    panel.start_training()
    wait_for(app, lambda: panel.point_count("loss") >= 3, 600)
    settle(app)
    shots = [grab(window, out_dir / "02-train-running.png")]
    wait_for(app, lambda: not panel.runner.busy, 1800)
    settle(app)
    shots.append(grab(window, out_dir / "03-train-done.png"))
    return shots


def _shoot_cams(app: Any, window: Any, defect_id: int, out_dir: Path) -> list[Path]:
    """One image's CAM, then every method side by side."""
    cams = window.cam_panel
    window.stage_tabs.setCurrentWidget(cams)
    window.gallery_pane.select_image(defect_id)
    if "region-aware" in cams.methods:
        cams.set_method("region-aware")
    wait_for(app, lambda: window.viewer.heatmap is not None, 300)
    settle(app)
    cams.threshold_slider.setValue(45)
    settle(app)
    shots = [grab(window, out_dir / "04-cams.png")]
    cams.compare_check.setChecked(True)
    wait_for(app, lambda: cams.compare_view is not None and all(
        v.heatmap is not None for v in cams.compare_view.viewers.values()), 600)
    settle(app)
    shots.append(grab(window, out_dir / "05-cams-compare.png"))
    cams.compare_check.setChecked(False)
    return shots


def _shoot_review(app: Any, window: Any, project: Project, out_dir: Path) -> list[Path]:
    """Proposals with a brush edit in progress; then a few accepted and one rejected, for the round."""
    from PySide6.QtCore import Qt

    review = window.review_panel
    window.stage_tabs.setCurrentWidget(review)
    review.method_combo.setCurrentIndex(max(0, review.method_combo.findData("region-aware")))
    review.make_proposals()
    wait_for(app, lambda: not review.runner.busy, 1200)
    settle(app)
    if review.queue.count():
        window.gallery_pane.select_image(review.queue.item(0).data(Qt.ItemDataRole.UserRole))
    settle(app)
    review.choose_tool("brush")
    window.editor.set_brush_size(7)
    image = project.image(window.current_image_id) if window.current_image_id is not None else None
    if image is not None:
        w, h = image.width, image.height
        paint_stroke(app, window.viewer, [(w * 0.2, h * 0.7), (w * 0.35, h * 0.6), (w * 0.5, h * 0.65)])
        # Leave the brush cursor in view, as a user would see it.
        window.editor._hovered((w * 0.55, h * 0.62))
    settle(app)
    shots = [grab(window, out_dir / "06-review-edit.png")]
    for _ in range(3):
        review.accept_current()
        settle(app, 0.2)
    if review.queue.count():
        review.reject_current()
    return shots


def _shoot_rounds_and_export(app: Any, window: Any, work_dir: Path, out_dir: Path) -> list[Path]:
    """A small refinement round, then the export dialog after exporting into `work_dir`."""
    rounds = window.rounds_panel
    window.stage_tabs.setCurrentWidget(rounds)
    if rounds.form is not None:
        rounds.form.set_values({"epochs": 2, "steps_per_epoch": 8, "crop_size": 64, "batch_size": 8})
    if rounds.run_round():
        wait_for(app, lambda: not rounds.runner.busy, 1800)
    settle(app)
    shots = [grab(window, out_dir / "07-rounds.png")]

    rounds.open_export_dialog()
    dialog = getattr(rounds, "export_dialog", None)
    if dialog is not None:
        if dialog.export_button.isEnabled():
            dialog.folder_edit.setText(str(work_dir / "export"))
            dialog.start_export()
            wait_for(app, lambda: not dialog.runner.busy, 600)
        settle(app)
        shots.append(grab(dialog, out_dir / "08-export.png"))
        dialog.close()
    return shots


def _shoot_shortcut_sheet(app: Any, window: Any, out_dir: Path) -> list[Path]:
    window.show_shortcut_sheet()
    settle(app)
    shot = grab(window.shortcut_dialog, out_dir / "09-shortcuts.png")
    window.shortcut_dialog.close()
    return [shot]


def capture(out_dir: Path, images: int, work_dir: Path, size: tuple[int, int]) -> list[Path]:
    """Open a fresh demo project of `images` images under `work_dir` in a `size` window and take
    every stage's picture into `out_dir`, in the order a user meets them; the pictures' paths."""
    import numpy as np
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from defect_studio.gui.app import configure_application
    from defect_studio.gui.main_window import MainWindow
    from defect_studio.project.demo_project import make_demo_project

    app = QApplication.instance() or QApplication(sys.argv[:1])
    configure_application(app)  # type: ignore[arg-type]
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(work_dir / "settings"))
    project_dir = make_demo_project(work_dir / "demo", count=images)
    window = MainWindow(QSettings())
    window.setGeometry(0, 0, *size)
    window.show()
    shots: list[Path] = []
    try:
        window.open_path(project_dir)
        project = window.project
        assert project is not None
        defect_ids = [image.id for image in project.images("defect")]
        shots += _shoot_tagging(app, window, project, defect_ids[0], out_dir)
        shots += _shoot_training(app, window, out_dir)
        shots += _shoot_cams(app, window, defect_ids[1], out_dir)
        shots += _shoot_review(app, window, project, out_dir)
        shots += _shoot_rounds_and_export(app, window, work_dir, out_dir)
        shots += _shoot_shortcut_sheet(app, window, out_dir)
        np.random.seed(0)
    finally:
        window.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Capture screenshots of each stage on the demo project.")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--images", type=int, default=60, help="demo images (fewer is faster)")
    parser.add_argument("--size", default="1600x1000", help="window size, WIDTHxHEIGHT (default 1600x1000)")
    args = parser.parse_args(argv)
    try:
        width, height = (int(part) for part in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size wants WIDTHxHEIGHT, such as 1600x1000, not {args.size!r}")
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    # Error dialogs are logged, not shown: nobody is there to click them.
    os.environ.setdefault("DEFECT_STUDIO_NO_DIALOGS", "1")
    with tempfile.TemporaryDirectory(prefix="ds-screenshots-") as temp:
        shots = capture(args.out, args.images, Path(temp), (width, height))
    print(f"{len(shots)} screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
