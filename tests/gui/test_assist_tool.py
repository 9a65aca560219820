"""The assist tool in the real window: W selects it, a loose stroke over a defect grows the mask as one
undo step (of the grown window only), Shift+drag removes, undo/redo and autosave work as for strokes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import QEvent, QPointF, Qt
from PySide6.QtGui import QMouseEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from defect_studio.imageio import read_mask


def drag(viewer, points: list[tuple[float, float]], modifiers=Qt.KeyboardModifier.NoModifier) -> None:  # type: ignore[no-untyped-def]
    viewport = viewer.viewport()
    widget_points = [viewer.scene_to_widget(x, y) for x, y in points]
    QTest.mousePress(viewport, Qt.MouseButton.LeftButton, modifiers, widget_points[0].toPoint())
    for point in widget_points[1:]:
        event = QMouseEvent(QEvent.Type.MouseMove, QPointF(point), viewport.mapToGlobal(QPointF(point)),
                            Qt.MouseButton.NoButton, Qt.MouseButton.LeftButton, modifiers)
        QApplication.sendEvent(viewport, event)
    QTest.mouseRelease(viewport, Qt.MouseButton.LeftButton, modifiers, widget_points[-1].toPoint())


def synthetic_defect(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright textured surface with a dark elliptic pit in it: (gray uint8 image, the pit)."""
    rng = np.random.default_rng(3)
    image = rng.normal(170, 8, (height, width))
    yy, xx = np.mgrid[:height, :width]
    pit = ((yy - height * 0.55) / 11.0) ** 2 + ((xx - width * 0.45) / 15.0) ** 2 <= 1.0
    image[pit] = rng.normal(70, 8, int(pit.sum()))
    return image.clip(0, 255).astype(np.uint8), pit


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_assist_stroke_grows_the_defect_undo_redo_subtract_and_autosave(qtbot, make_window, review_project: Path) -> None:
    window = make_window()
    assert window.open_path(review_project)
    window.stage_tabs.setCurrentWidget(window.review_panel)
    image_id = window.review_panel.queue.item(0).data(Qt.ItemDataRole.UserRole)
    window.gallery_pane.select_image(image_id)
    editor = window.editor
    qtbot.waitUntil(lambda: editor.session is not None and editor.session.image_id == image_id)
    project = window.project
    image = project.image(image_id)
    # The hint is the round's proposal, read once per image.
    np.testing.assert_array_equal(editor._prior(editor.session), project.load_proposal(image_id, 0))
    # A synthetic defect in place of the demo image, and no proposal hint: the growth comes from the pixels.
    pixels, pit = synthetic_defect(image.height, image.width)
    window.viewer.set_image(pixels, fit=True)
    editor.session.prior = None
    editor.clear()
    editor.undo_stack.clear()
    QApplication.processEvents()

    qtbot.keyClick(window, Qt.Key.Key_W)
    assert editor.tool == "assist"
    assert window.review_panel.tool_buttons["assist"].isChecked()
    editor.set_brush_size(3)
    cy, cx = image.height * 0.55, image.width * 0.45
    drag(window.viewer, [(cx - 8, cy), (cx - 2, cy + 1), (cx + 7, cy)])  # a loose stroke inside the pit
    grown = editor.current_mask().copy()
    stroke_only = 3 * 19  # about what the stroke itself covers
    assert grown.sum() > 3 * stroke_only, "the region grew beyond the stroke"
    assert iou(grown, pit) > 0.7
    assert editor.undo_stack.count() == 1  # one undo step per assist stroke
    assert 0 < editor.undo_bytes() < grown.size  # it holds the grown window, not the whole mask

    qtbot.keyClick(window, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert not editor.current_mask().any()
    qtbot.keyClick(window, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    np.testing.assert_array_equal(editor.current_mask(), grown)

    # Autosave writes the grown mask as the user's edit.
    qtbot.waitUntil(lambda: project.mask_record(image_id, 0).state == "edited", timeout=5000)
    np.testing.assert_array_equal(read_mask(project.mask_record(image_id, 0).path, (image.height, image.width)), grown)

    # Shift+drag over the pit removes the grown region again, as one more undo step.
    drag(window.viewer, [(cx - 4, cy), (cx + 4, cy)], Qt.KeyboardModifier.ShiftModifier)
    assert editor.current_mask().sum() < 0.2 * grown.sum()
    assert editor.undo_stack.count() == 2
    window.undo()
    np.testing.assert_array_equal(editor.current_mask(), grown)

    # A stroke on what is already in the mask changes nothing: no undo step, a message instead.
    messages: list[str] = []
    editor.message.connect(messages.append)
    drag(window.viewer, [(cx - 3, cy), (cx + 3, cy)])
    assert editor.undo_stack.count() == 2 and messages and "already" in messages[-1]

    qtbot.keyClick(window, Qt.Key.Key_Escape)
    assert editor.tool == ""
