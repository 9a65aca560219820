"""The viewer and the mask editor on a 100 MP image: a brush stroke keeps (in memory and in its undo
step) only the blocks it painted, never a copy of the whole mask; a repaint draws from a screen-sized
sample of the mask; fill/clear keep only the rectangle they changed; undo/redo restore exactly."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PySide6.QtWidgets import QApplication

from defect_studio.gui.mask_editor import STROKE_BLOCK, MaskEditor
from defect_studio.gui.viewer import ImageViewer
from tests.gui.test_mask_editor import paint_stroke

SIDE = 10_000  # 100 MP


@pytest.fixture
def large_editor(qtbot):  # type: ignore[no-untyped-def]
    ramp = (np.arange(SIDE) % 251).astype(np.uint8)
    image = np.add.outer(ramp, ramp)  # uint8, 100 MB, made without a wider temporary
    viewer = ImageViewer()
    qtbot.addWidget(viewer)
    viewer.resize(800, 600)
    viewer.show()
    qtbot.waitExposed(viewer)
    viewer.set_image(image)
    editor = MaskEditor(viewer)
    editor.open(-1, -1, np.zeros((SIDE, SIDE), bool), scratch=True)
    editor.set_tool("brush")
    editor.set_brush_size(24)
    QApplication.processEvents()
    return viewer, editor


def test_a_stroke_on_100_mp_keeps_only_what_it_painted(large_editor) -> None:  # type: ignore[no-untyped-def]
    viewer, editor = large_editor
    mask = editor.session.mask
    assert mask.shape == (SIDE, SIDE) and mask.dtype == np.uint8
    viewer.view_box.setRange(xRange=(4800, 6000), yRange=(4800, 5700), padding=0)  # zoomed in on the stroke
    QApplication.processEvents()

    tracemalloc.start()
    try:
        paint_stroke(viewer, [(5000.5, 5000.5), (5300.5, 5150.5), (5600.5, 5300.5)])
        QApplication.processEvents()  # the repaints
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    ys, xs = np.nonzero(mask[4900:5400, 4900:5700])
    assert ys.size > 0 and mask.sum() == ys.size  # painted there and nowhere else
    box_width, box_height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    # The undo step holds the painted blocks: within the stroke's box (grown to whole blocks), far
    # less than the box for a diagonal stroke, and nothing like the 100 MB mask.
    undo_bytes = editor.undo_bytes()
    assert editor.undo_stack.count() == 1
    assert 0 < undo_bytes <= (box_width + 2 * STROKE_BLOCK) * (box_height + 2 * STROKE_BLOCK)
    assert undo_bytes < mask.nbytes / 1000
    # No copy of the whole mask (100 MB) or a colour buffer of it (400 MB) while stroking and repainting.
    assert peak < 8_000_000

    painted = mask[4900:5400, 4900:5700].copy()
    editor.undo_stack.undo()
    assert not mask.any()
    editor.undo_stack.redo()
    np.testing.assert_array_equal(mask[4900:5400, 4900:5700], painted)
    assert mask.sum() == painted.sum()


def test_zoomed_out_repaints_and_whole_mask_operations_stay_small(large_editor) -> None:  # type: ignore[no-untyped-def]
    viewer, editor = large_editor
    mask = editor.session.mask
    viewer.fit()
    QApplication.processEvents()
    paint_stroke(viewer, [(2000.5, 3000.5), (2600.5, 3400.5)])  # at ~1/12 scale: a few screen pixels
    assert mask.any()

    repaints: list[int] = []
    viewer.mask_layer.after_paint = lambda: repaints.append(1)
    tracemalloc.start()
    try:
        viewer.mask_layer.update()  # a full repaint of the whole image's mask, zoomed out
        viewer.viewport().repaint()
        QApplication.processEvents()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        viewer.mask_layer.after_paint = None
    assert repaints
    assert peak < 16_000_000  # colours for the screen's pixels, not the image's 400 MB

    before = mask.copy()
    assert editor.clear()
    assert not mask.any()
    ys, xs = np.nonzero(before)
    changed_box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    assert editor.undo_bytes() - editor.undo_stack.command(0).stored_bytes == changed_box  # the cleared rectangle only
    editor.undo_stack.undo()
    np.testing.assert_array_equal(mask, before)

    # Opening another 100 MP mask costs its uint8 copy (and the comparison made on the way), not a
    # full-size colour buffer beside it (4 bytes a pixel).
    other = np.zeros((SIDE, SIDE), bool)
    tracemalloc.start()
    try:
        editor.open(-2, -2, other, scratch=True)
        QApplication.processEvents()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * SIDE * SIDE


def test_a_heatmap_is_shown_as_bytes_without_a_float32_copy(qtbot) -> None:  # type: ignore[no-untyped-def]
    """The CAM overlay of a large image: the float16 map the tiled CAMs make goes to the screen as one byte a
    pixel (its colormap has 256 entries), each the map's value rounded to 1/255; NaN shows as 0."""
    viewer = ImageViewer()
    qtbot.addWidget(viewer)
    viewer.set_image(np.zeros((600, 800), np.float32))
    heatmap = np.linspace(0, 1, 600 * 800, dtype=np.float32).reshape(600, 800).astype(np.float16)
    heatmap[0, 0] = np.nan
    viewer.set_heatmap(heatmap)
    shown = viewer.heat_item.image
    assert shown.dtype == np.uint8 and shown.shape == heatmap.shape and viewer.heat_item.isVisible()
    expected = np.clip(np.nan_to_num(heatmap.astype(np.float32)) * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(shown, expected)
    assert viewer.heatmap is heatmap  # the map itself is kept as given, for the outline and the compare view
