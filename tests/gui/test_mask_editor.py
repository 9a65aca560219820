"""The mask editor in the real window: strokes from synthetic mouse events, undo/redo per stroke,
accept, autosave, and the PNG on disk matching what the editor shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QPoint, QPointF, Qt
from PySide6.QtGui import QMouseEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from defect_studio.imageio import read_mask


def _send_move(widget, point: QPointF) -> None:  # type: ignore[no-untyped-def]
    event = QMouseEvent(QEvent.Type.MouseMove, point, widget.mapToGlobal(point), Qt.MouseButton.NoButton,
                        Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, event)


def paint_stroke(viewer, points: list[tuple[float, float]]) -> None:  # type: ignore[no-untyped-def]
    """Press at the first image point, drag through the others, release at the last."""
    viewport = viewer.viewport()
    widget_points = [viewer.scene_to_widget(x, y) for x, y in points]
    QTest.mousePress(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, widget_points[0].toPoint())
    for point in widget_points[1:]:
        _send_move(viewport, point)
    QTest.mouseRelease(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, widget_points[-1].toPoint())


def open_review(qtbot, make_window, project: Path):  # type: ignore[no-untyped-def]
    window = make_window()
    assert window.open_path(project)
    window.stage_tabs.setCurrentWidget(window.review_panel)
    assert window.review_panel.queue.count() > 0
    first_id = window.review_panel.queue.item(0).data(Qt.ItemDataRole.UserRole)
    window.gallery_pane.select_image(first_id)
    qtbot.waitUntil(lambda: window.editor.session is not None and window.editor.session.image_id == first_id)
    window.viewer.fit()
    QApplication.processEvents()
    return window, first_id


def test_stroke_undo_redo_accept_writes_the_png(qtbot, make_window, review_project: Path) -> None:
    window, image_id = open_review(qtbot, make_window, review_project)
    editor = window.editor
    project = window.project
    image = project.image(image_id)
    original = editor.current_mask().copy()

    qtbot.keyClick(window, Qt.Key.Key_E)
    assert editor.tool == "eraser"
    qtbot.keyClick(window, Qt.Key.Key_B)
    assert editor.tool == "brush"
    editor.set_brush_size(5)
    qtbot.keyClick(window, Qt.Key.Key_BracketRight)
    assert editor.brush_size > 5
    editor.set_brush_size(5)

    # A diagonal stroke across the image, with only three mouse events: the line between is filled.
    w, h = image.width, image.height
    paint_stroke(window.viewer, [(2.5, 2.5), (w / 2, h / 2), (w - 3.5, h - 3.5)])
    painted = editor.current_mask().copy()
    diagonal = [(int(t * (w - 6)) + 3, int(t * (h - 6)) + 3) for t in np.linspace(0, 1, 25)]
    assert all(painted[y, x] for x, y in diagonal), "the stroke is continuous between mouse events"
    assert painted.sum() > original.sum()
    assert editor.undo_stack.count() == 1  # one undo step per stroke
    # The undo step holds the stroke's bounding box only, not the whole mask.
    assert editor.undo_bytes() <= painted.size

    qtbot.keyClick(window, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    np.testing.assert_array_equal(editor.current_mask(), original)
    qtbot.keyClick(window, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    np.testing.assert_array_equal(editor.current_mask(), painted)

    # Autosave: the edit is on disk after the debounce, as an 'edited' mask.
    qtbot.waitUntil(lambda: project.mask_record(image_id, 0).state == "edited", timeout=5000)
    qtbot.keyClick(window, Qt.Key.Key_A)
    record = project.mask_record(image_id, 0)
    assert record.state == "edited"  # accepting an edit keeps it as the user's label
    np.testing.assert_array_equal(read_mask(record.path, (image.height, image.width)), painted)
    assert window.current_image_id != image_id  # accept moves on
    # The gallery badge follows.
    assert window.gallery_pane.gallery_model.item_by_id(image_id).mask_state == "edited"


def test_eraser_fill_clear_revert_and_leaving_keeps_the_edit(qtbot, make_window, review_project: Path) -> None:
    window, image_id = open_review(qtbot, make_window, review_project)
    editor = window.editor
    project = window.project
    image = project.image(image_id)
    original = editor.current_mask().copy()
    assert original.any()

    window.review_panel.choose_tool("eraser")
    editor.set_brush_size(400)  # clamped to the maximum
    assert editor.brush_size == 256
    editor.set_brush_size(3)
    ys, xs = np.nonzero(original)
    on_mask = (float(xs[len(xs) // 2]) + 0.5, float(ys[len(ys) // 2]) + 0.5)
    paint_stroke(window.viewer, [on_mask, on_mask])
    erased = editor.current_mask().copy()
    assert 0 < erased.sum() < original.sum()

    # Leave the image at once (before the autosave timer): the edit is saved on leaving.
    window.gallery_pane.step_image(+1)
    assert window.current_image_id != image_id
    record = project.mask_record(image_id, 0)
    assert record.state == "edited"
    np.testing.assert_array_equal(read_mask(record.path, (image.height, image.width)), erased)

    # Back to it: the undo history is still there.
    window.gallery_pane.select_image(image_id)
    assert editor.undo_stack.canUndo()
    editor.clear()
    assert not editor.current_mask().any()
    window.undo()
    np.testing.assert_array_equal(editor.current_mask(), erased)

    # Fill holes: a ring becomes a disc.
    ring = np.zeros_like(original)
    yy, xx = np.mgrid[: image.height, : image.width]
    distance = np.hypot(yy - image.height / 2, xx - image.width / 2)
    ring[(distance > 8) & (distance < 14)] = True
    editor.replace_with(ring, "test ring")
    assert editor.fill_holes()
    assert editor.current_mask()[image.height // 2, image.width // 2]

    # Revert to the proposal: the round's mask is the proposal again, state 'proposed'.
    window.review_panel.revert_current()
    assert project.mask_record(image_id, 0).state == "proposed"
    np.testing.assert_array_equal(editor.current_mask(), original)


def test_reject_and_ctrl_wheel_brush_size(qtbot, make_window, review_project: Path) -> None:
    from PySide6.QtGui import QWheelEvent

    window, image_id = open_review(qtbot, make_window, review_project)
    window.review_panel.choose_tool("brush")
    size = window.editor.brush_size
    viewport = window.viewer.viewport()
    centre = QPointF(viewport.width() / 2, viewport.height() / 2)
    wheel = QWheelEvent(centre, viewport.mapToGlobal(centre), QPoint(0, 0), QPoint(0, 120), Qt.MouseButton.NoButton,
                        Qt.KeyboardModifier.ControlModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(viewport, wheel)
    assert window.editor.brush_size > size
    qtbot.keyClick(window, Qt.Key.Key_R)
    assert window.project.mask_record(image_id, 0).state == "rejected"
    assert window.gallery_pane.gallery_model.item_by_id(image_id).mask_state == "rejected"
    window.gallery_pane.set_filter("to_review")
    assert window.gallery_pane.gallery_model.row_of(image_id) is None


def test_a_stroke_still_unsaved_when_proposals_arrive_is_kept(qtbot, make_window, review_project: Path) -> None:
    """A round's job can end while the user paints: the window then drops its undo histories (the
    masks on disk are the truth now), but it saves the stroke first instead of losing it."""
    window, image_id = open_review(qtbot, make_window, review_project)
    image = window.project.image(image_id)
    window.review_panel.choose_tool("brush")
    window.editor.set_brush_size(5)
    paint_stroke(window.viewer, [(2.5, 2.5), (image.width - 3.5, image.height - 3.5)])
    painted = window.editor.current_mask().copy()
    assert window.project.mask_record(image_id, 0).state == "proposed"  # the autosave has not run yet

    window.notify_masks_changed()  # what the review and rounds panels do when their job ends

    record = window.project.mask_record(image_id, 0)
    assert record.state == "edited"
    np.testing.assert_array_equal(read_mask(record.path, (image.height, image.width)), painted)
    assert window.editor.undo_stack is not None and window.editor.undo_stack.count() == 0  # a fresh history
    np.testing.assert_array_equal(window.editor.current_mask(), painted)


def test_shift_r_rejects_the_rest_after_asking(qtbot, make_window, review_project: Path, monkeypatch) -> None:
    """Edit one mask, then Shift+R: the edit stays, every other defect proposal is rejected, the queue
    empties; answering No changes nothing."""
    from PySide6.QtWidgets import QMessageBox

    window, image_id = open_review(qtbot, make_window, review_project)
    image = window.project.image(image_id)
    window.review_panel.choose_tool("brush")
    paint_stroke(window.viewer, [(2.5, 2.5), (image.width - 3.5, image.height - 3.5)])
    window.editor.flush()
    queue = window.review_panel.queue
    to_review = queue.count()
    assert to_review > 1 and window.review_panel.reject_rest_button.isEnabled()

    answers = iter([QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes])
    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kwargs: next(answers))
    qtbot.keyClick(window, Qt.Key.Key_R, Qt.KeyboardModifier.ShiftModifier)
    assert queue.count() == to_review  # "No": nothing changed
    qtbot.keyClick(window, Qt.Key.Key_R, Qt.KeyboardModifier.ShiftModifier)

    assert queue.count() == 0 and not window.review_panel.reject_rest_button.isEnabled()
    states = {r.image_id: r.state for r in window.project.mask_records(0, tag="defect")}
    assert states.pop(image_id) == "edited"
    assert set(states.values()) == {"rejected"}
    assert window.gallery_pane.gallery_model.item_by_id(next(iter(states))).mask_state == "rejected"
    assert window.editor.undo_stack is not None and window.editor.undo_stack.count() == 1  # the stroke stays undoable


def test_fill_holes_fills_enclosed_background_only() -> None:
    from defect_studio.gui.mask_editor import fill_holes

    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    np.testing.assert_array_equal(fill_holes(ring), np.pad(np.ones((5, 5), bool), 2))
    # Background open to the edge is not a hole, even through a one-pixel gap.
    cup = ring.copy()
    cup[2, 4] = False
    np.testing.assert_array_equal(fill_holes(cup), cup)
    # Joined to the outside only diagonally: a hole (4-connected background, as in scipy).
    corner = np.zeros((5, 5), bool)
    corner[1, 1:4] = corner[3, 1:4] = corner[1:4, 1] = corner[1:4, 3] = True
    corner[1, 3] = False
    assert fill_holes(corner)[2, 2]
    assert not fill_holes(np.zeros((4, 6), bool)).any()
    assert fill_holes(np.ones((1, 1), bool)).all()


def test_fill_holes_agrees_with_scipy_on_random_masks() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")  # the reference only; the app does not use scipy
    from defect_studio.gui.mask_editor import fill_holes

    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = rng.integers(1, 48, 2)
        mask = rng.random((height, width)) < rng.uniform(0.2, 0.8)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
