"""The window fits common screens: at 1366×768, 1600×1000 and 1920×1080 every control of every
dock, in every stage tab, lies inside the areas that show it (or can be scrolled into view), and
the "Compare all methods" grid fills its pane."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import QPoint, QRect, Qt
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractScrollArea,
    QAbstractSpinBox,
    QApplication,
    QComboBox,
    QDockWidget,
    QLabel,
    QLineEdit,
    QScrollArea,
    QSlider,
    QTabBar,
    QWidget,
)

SCREEN_SIZES = [(1366, 768), (1600, 1000), (1920, 1080)]

# Widgets drawn as one control: their own children (a spin box's line edit, a list's viewport,
# a plot's items) are the widget's business, not the layout's.
COMPOSITE = (QAbstractSpinBox, QComboBox, QAbstractScrollArea, QTabBar)
# Controls whose text is cut when they get less than their minimum size hint.
SQUEEZABLE = (QAbstractButton, QComboBox, QAbstractSpinBox, QLineEdit, QSlider)


def _inside_composite(widget: QWidget, top: QWidget) -> bool:
    parent = widget.parentWidget()
    while parent is not None and parent is not top:
        if isinstance(parent, COMPOSITE) and not isinstance(parent, QScrollArea):
            return True
        parent = parent.parentWidget()
    return False


def _scroll_area_of_viewport(widget: QWidget) -> QScrollArea | None:
    parent = widget.parentWidget()
    return parent if isinstance(parent, QScrollArea) and parent.viewport() is widget else None


def clipping_problems(top: QWidget) -> list[str]:
    """Every visible control under `top` that sticks out of a visible ancestor (up to `top`), is
    squeezed below its minimum size, or lies in a scroll area that cannot scroll to it."""
    problems = []
    for widget in top.findChildren(QWidget):
        if not widget.isVisible() or _inside_composite(widget, top):
            continue
        name = widget.objectName() or getattr(widget, "text", lambda: "")() or type(widget).__name__
        if isinstance(widget, SQUEEZABLE) or (isinstance(widget, QLabel) and not widget.wordWrap()):
            hint = widget.minimumSizeHint()
            if widget.width() < hint.width() or widget.height() < hint.height():
                problems.append(f"{name!r} squeezed to {widget.width()}×{widget.height()} (needs {hint.width()}×{hint.height()})")
        ancestor = widget.parentWidget()
        while ancestor is not None:
            rect = QRect(widget.mapTo(ancestor, QPoint(0, 0)), widget.size())
            area = ancestor.rect()
            scroller = _scroll_area_of_viewport(ancestor)
            if scroller is not None:
                # Content may run past the viewport only where the scroll area scrolls to it.
                # Mapped through the scrolled content, `rect` is in viewport coordinates.
                offset_x, offset_y = scroller.horizontalScrollBar().value(), scroller.verticalScrollBar().value()
                content = QRect(rect.translated(offset_x, offset_y))
                if scroller.horizontalScrollBarPolicy() != Qt.ScrollBarPolicy.ScrollBarAlwaysOff:
                    area.setRight(area.right() + scroller.horizontalScrollBar().maximum())
                if scroller.verticalScrollBarPolicy() != Qt.ScrollBarPolicy.ScrollBarAlwaysOff:
                    area.setBottom(area.bottom() + scroller.verticalScrollBar().maximum())
                rect = content
            if not area.contains(rect):
                problems.append(f"{name!r} at {rect.getRect()} is cut off by {ancestor.objectName() or type(ancestor).__name__}"
                                f" {area.getRect()}")
                break
            if ancestor is top or scroller is not None:  # the viewport itself is checked as a widget
                break
            ancestor = ancestor.parentWidget()
    return problems


def settle_layouts(top: QWidget) -> None:
    """Process events until no widget under `top` moves any more (a scroll area follows its
    content's new size an event-loop turn after the content's layout changes)."""
    previous = None
    for _ in range(50):
        QApplication.processEvents()
        geometries = [widget.geometry().getRect() for widget in top.findChildren(QWidget)]
        if geometries == previous:
            return
        previous = geometries
    raise AssertionError("the layout did not settle")


def fit_problems(window) -> list[str]:  # type: ignore[no-untyped-def]
    """Clipping problems of every dock in every stage tab, each prefixed with where it was seen."""
    problems = []
    docks = [dock for dock in window.findChildren(QDockWidget) if dock.isVisible()]
    assert docks
    for index in range(window.stage_tabs.count()):
        window.stage_tabs.setCurrentIndex(index)
        settle_layouts(window)
        tab = window.stage_tabs.tabText(index)
        for dock in docks:
            if not window.rect().contains(QRect(dock.mapTo(window, QPoint(0, 0)), dock.size())):
                problems.append(f"{tab} tab: the {dock.windowTitle()} dock runs past the window")
            problems += [f"{tab} tab, {dock.windowTitle()} dock: {problem}" for problem in clipping_problems(dock)]
    return problems


def test_the_walker_finds_a_cut_off_button(qtbot) -> None:
    """The check itself: a button pushed past its parent's right edge, or below a scroll area that
    does not scroll, is reported; the same button in a scroll area that scrolls is not."""
    from PySide6.QtWidgets import QHBoxLayout, QPushButton, QVBoxLayout

    top = QWidget()
    top.setObjectName("top")
    qtbot.addWidget(top)
    row = QWidget(top)
    layout = QHBoxLayout(row)
    layout.addWidget(QPushButton("A long button that needs room", row))
    row.setGeometry(0, 0, 40, 30)  # narrower than the button
    top.resize(300, 200)
    top.show()
    qtbot.waitExposed(top)
    assert any("A long button" in problem for problem in clipping_problems(top))

    scroller = QScrollArea(top)
    scroller.setObjectName("scroller")
    scroller.setWidgetResizable(True)
    content = QWidget()
    column = QVBoxLayout(content)
    for number in range(12):
        column.addWidget(QPushButton(f"Button {number}", content))
    scroller.setWidget(content)
    row.hide()
    scroller.setGeometry(0, 0, 200, 120)
    scroller.show()
    QApplication.processEvents()
    assert clipping_problems(top) == []  # below the fold, but the scroll area scrolls there
    scroller.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    QApplication.processEvents()
    assert any("Button 11" in problem for problem in clipping_problems(top))


@pytest.mark.parametrize("size", SCREEN_SIZES, ids=[f"{w}x{h}" for w, h in SCREEN_SIZES])
def test_every_dock_control_is_reachable_at_common_screen_sizes(qtbot, make_window, review_project: Path,
                                                                size: tuple[int, int]) -> None:
    # A project with a round to review and no classifier: every control shows, no CAM job starts.
    window = make_window()
    assert window.open_path(review_project)
    window.resize(*size)
    qtbot.waitUntil(lambda: (window.width(), window.height()) == size)
    window.gallery_pane.select_image(window.project.images("defect")[0].id)  # the review queue, the mask tools
    settle_layouts(window)
    problems = fit_problems(window)

    cam = window.cam_panel
    window.stage_tabs.setCurrentWidget(cam)
    for method in cam.methods:  # each method's settings form has its own rows
        cam.set_method(method)
        settle_layouts(window)
        problems += [f"CAMs tab, {method}: {problem}" for problem in clipping_problems(window.stage_dock)]

    # As narrow as the user can drag the stage dock.
    window.resizeDocks([window.stage_dock], [1], Qt.Orientation.Horizontal)
    settle_layouts(window)
    problems += [f"narrowest stage dock, {problem}" for problem in fit_problems(window)]
    assert problems == [], "\n".join(problems)


def _image_rects(compare) -> list[QRect]:  # type: ignore[no-untyped-def]
    """Where each tile shows its image, in the compare view's coordinates."""
    rects = []
    for viewer in compare.viewers.values():
        height, width = viewer.image_shape
        top_left = viewer.scene_to_widget(0, 0).toPoint()
        bottom_right = viewer.scene_to_widget(width, height).toPoint()
        rects.append(QRect(viewer.mapTo(compare, top_left), viewer.mapTo(compare, bottom_right)))
    return rects


@pytest.mark.parametrize("image_shape", [(90, 120), (120, 90)], ids=["landscape", "portrait"])
def test_compare_tiles_fill_the_pane_without_gaps_between_rows(qtbot, image_shape: tuple[int, int]) -> None:
    """The images themselves (not just their viewers) fill the pane in its tight direction, rows and
    columns touch, and they grow with the pane (a pane made larger after the images came in)."""
    import numpy as np

    from defect_studio.gui.panels.cam_panel import CompareView

    compare = CompareView(["a", "b", "c", "d", "e"])
    qtbot.addWidget(compare)
    compare.resize(400, 300)
    compare.show()
    qtbot.waitExposed(compare)
    pixels = np.zeros(image_shape, np.uint8)
    for viewer in compare.viewers.values():
        viewer.set_image(pixels)
    compare.relayout()
    for pane in [(742, 945), (516, 650), (1200, 500)]:  # the centre pane at 1600×1000 and 1366×768, a wide one
        compare.resize(*pane)
        settle_layouts(compare)
        rects = _image_rects(compare)
        left, top = min(r.left() for r in rects), min(r.top() for r in rects)
        right, bottom = max(r.right() for r in rects), max(r.bottom() for r in rects)
        slack = compare.columns + 2  # whole pixels lost to rounding the tile size
        assert right - left >= pane[0] - slack or bottom - top >= pane[1] - slack, (pane, rects)
        row_tops = sorted({r.top() for r in rects})
        for upper, lower in zip(row_tops, row_tops[1:]):
            upper_bottom = max(r.bottom() for r in rects if r.top() == upper)
            assert lower - upper_bottom <= CompareView.SPACING + 2, (pane, "a gap between rows", rects)
        column_lefts = sorted({r.left() for r in rects})
        for before, after in zip(column_lefts, column_lefts[1:]):
            before_right = max(r.right() for r in rects if r.left() == before)
            assert after - before_right <= CompareView.SPACING + 2, (pane, "a gap between columns", rects)
