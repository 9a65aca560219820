"""The large viewer: a pyqtgraph ViewBox with the image, a CAM heatmap, the mask and its outline.

Layers, bottom to top: the image (`ImageItem`), the heatmap (`ImageItem` with a colormap and an
opacity), the mask (`MaskLayer`, of which only the dirty rectangle is repainted while painting), the
threshold outline (a path), the assist tool's stroke while it is drawn, the brush cursor.

Large images (100 MP): the image and heatmap items downsample themselves to the screen's resolution
(pyqtgraph's autoDownsample), and the mask layer colours only the exposed part of the mask, one mask
pixel in `step` per screen pixel when zoomed out; nothing as large as the image is made per repaint,
and the mask is shown from the editor's own array (no full-size colour buffer beside it).
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
from PySide6.QtCore import QPointF, QRect, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPainterPath, QPen, QWheelEvent
from PySide6.QtWidgets import (
    QGraphicsEllipseItem,
    QGraphicsItem,
    QGraphicsObject,
    QGraphicsPathItem,
    QGraphicsSceneHoverEvent,
    QGraphicsSceneMouseEvent,
    QStyleOptionGraphicsItem,
    QWidget,
)

from defect_studio.gui.plotting import pg
from defect_studio.imageio import to_float01
from defect_studio.ml.cam_cache import quantise_heatmap

HEATMAP_COLORMAPS = ("turbo", "inferno", "viridis", "plasma")
MASK_COLOUR = QColor(255, 64, 64)
MASK_ALPHA = 110


def display_uint8(pixels: np.ndarray) -> np.ndarray:
    """Native pixels (any depth) -> 8-bit gray H×W or RGB H×W×3 for display.

    16-bit and float images are stretched between their 0.5 and 99.5 percentiles, so a 12-bit camera
    image stored in 16 bits is not shown nearly black (display only; the data is untouched).
    """
    image = to_float01(pixels)
    if pixels.dtype != np.uint8:
        sample = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]
        low, high = np.percentile(sample, [0.5, 99.5])
        if high > low:
            image = (image - low) / (high - low)
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image[:, :, 0] if image.shape[2] == 1 else image


def _premultiplied_argb(colour: QColor, alpha: int) -> np.uint32:
    scale = alpha / 255.0
    red, green, blue = (round(c * scale) for c in (colour.red(), colour.green(), colour.blue()))
    return np.uint32((alpha << 24) | (red << 16) | (green << 8) | blue)


class MaskLayer(QGraphicsObject):
    """A boolean mask drawn as a translucent fill. `refresh(x0, y0, x1, y1)` repaints a rectangle only.

    When a tool is active it takes the left mouse button (so the ViewBox does not pan) and reports
    press/move/release in image pixel coordinates through the callbacks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemUsesExtendedStyleOption, True)
        self._mask: np.ndarray | None = None
        self._fill = _premultiplied_argb(MASK_COLOUR, MASK_ALPHA)
        self.painting_enabled = False
        self.on_press: Callable[[float, float], None] | None = None
        self.on_move: Callable[[float, float], None] | None = None
        self.on_release: Callable[[float, float], None] | None = None
        self.on_hover: Callable[[float, float] | None, None] | None = None
        self.after_paint: Callable[[], None] | None = None  # the responsiveness benchmark times repaints
        self.modifiers = Qt.KeyboardModifier.NoModifier  # of the last press (Shift: the assist tool subtracts)
        self.setAcceptHoverEvents(True)
        self.setAcceptedMouseButtons(Qt.MouseButton.NoButton)

    def set_mask(self, mask: np.ndarray | None) -> None:
        """Show `mask` (kept by reference: the editor changes it in place and calls refresh)."""
        self.prepareGeometryChange()
        self._mask = mask
        self.update()

    @property
    def mask(self) -> np.ndarray | None:
        return self._mask

    def refresh(self, x0: int, y0: int, x1: int, y1: int) -> None:
        """Repaint the rectangle [x0, x1) × [y0, y1) of the mask (after the editor changed it)."""
        if self._mask is None:
            return
        height, width = self._mask.shape
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            return
        self.update(QRectF(x0, y0, x1 - x0, y1 - y0))

    def set_tool_active(self, active: bool) -> None:
        self.painting_enabled = active
        self.setAcceptedMouseButtons(Qt.MouseButton.LeftButton if active else Qt.MouseButton.NoButton)

    # --- QGraphicsItem ---------------------------------------------------------------------
    def boundingRect(self) -> QRectF:  # noqa: N802
        if self._mask is None:
            return QRectF()
        height, width = self._mask.shape
        return QRectF(0, 0, width, height)

    def shape(self) -> QPainterPath:
        path = QPainterPath()
        path.addRect(self.boundingRect())
        return path

    def paint(self, painter: QPainter, option: QStyleOptionGraphicsItem, widget: QWidget | None = None) -> None:
        if self._mask is None:
            return
        height, width = self._mask.shape
        exposed = option.exposedRect.toAlignedRect().intersected(QRect(0, 0, width, height))
        if exposed.isEmpty():
            return
        # Zoomed out, one mask pixel in `step` (a power of two) per screen pixel is drawn, as Qt's
        # unsmoothed scaling would pick anyway: the work follows the screen, not the image.
        screen_per_pixel = QStyleOptionGraphicsItem.levelOfDetailFromTransform(painter.worldTransform())
        step = 1 << max(0, int(np.floor(np.log2(1.0 / screen_per_pixel)))) if 0 < screen_per_pixel < 1 else 1
        x0, y0 = exposed.left() // step * step, exposed.top() // step * step
        x1, y1 = exposed.right() + 1, exposed.bottom() + 1
        colours = np.multiply(self._mask[y0:y1:step, x0:x1:step], self._fill, dtype=np.uint32)
        rows, columns = colours.shape
        image = QImage(colours.data, columns, rows, columns * 4, QImage.Format.Format_ARGB32_Premultiplied)
        painter.setClipRect(QRectF(0, 0, width, height), Qt.ClipOperation.IntersectClip)  # a last sample's overhang
        painter.drawImage(QRectF(x0, y0, columns * step, rows * step), image)
        if self.after_paint is not None:
            self.after_paint()

    def mousePressEvent(self, event: QGraphicsSceneMouseEvent) -> None:  # noqa: N802
        if self.painting_enabled and event.button() == Qt.MouseButton.LeftButton and self.on_press is not None:
            event.accept()
            self.modifiers = event.modifiers()
            self.on_press(event.pos().x(), event.pos().y())
        else:
            event.ignore()

    def mouseMoveEvent(self, event: QGraphicsSceneMouseEvent) -> None:  # noqa: N802
        if self.on_hover is not None:
            self.on_hover((event.pos().x(), event.pos().y()))
        if self.painting_enabled and self.on_move is not None:
            event.accept()
            self.on_move(event.pos().x(), event.pos().y())

    def mouseReleaseEvent(self, event: QGraphicsSceneMouseEvent) -> None:  # noqa: N802
        if self.painting_enabled and self.on_release is not None:
            event.accept()
            self.on_release(event.pos().x(), event.pos().y())

    def hoverMoveEvent(self, event: QGraphicsSceneHoverEvent) -> None:  # noqa: N802
        if self.on_hover is not None:
            self.on_hover((event.pos().x(), event.pos().y()))

    def hoverLeaveEvent(self, event: QGraphicsSceneHoverEvent) -> None:  # noqa: N802
        if self.on_hover is not None:
            self.on_hover(None)


class ImageViewer(pg.GraphicsView):
    """Image + overlays with zoom (wheel) and pan (drag). Ctrl+wheel is reported, not zoomed."""

    ctrl_wheel = Signal(int)  # +1 / -1 steps

    def __init__(self, parent: QWidget | None = None, title: str = "") -> None:
        super().__init__(parent, background=pg.mkColor("#0d1117"))
        self.setObjectName("imageViewer")
        self.view_box = pg.ViewBox(lockAspect=True, invertY=True, enableMenu=False)
        self.view_box.setBackgroundColor(pg.mkColor("#0d1117"))
        self.setCentralItem(self.view_box)
        # autoDownsample: pyqtgraph's level of detail, so a 100 MP image is drawn from a screen-sized copy.
        self.image_item = pg.ImageItem(axisOrder="row-major", autoDownsample=True)
        self.heat_item = pg.ImageItem(axisOrder="row-major", autoDownsample=True)
        self.heat_item.setZValue(1)
        self.heat_item.setOpacity(0.5)
        self.heat_item.setVisible(False)
        self.mask_layer = MaskLayer()
        self.mask_layer.setZValue(2)
        self.outline_item = QGraphicsPathItem()
        outline_pen = QPen(QColor("#39d353"), 2)
        outline_pen.setCosmetic(True)
        self.outline_item.setPen(outline_pen)
        self.outline_item.setZValue(3)
        self.stroke_item = QGraphicsPathItem()  # the assist stroke being drawn, as wide as the brush
        self.stroke_item.setZValue(3.5)
        self.stroke_item.setVisible(False)
        self.cursor_item = QGraphicsEllipseItem()
        cursor_pen = QPen(QColor(255, 255, 255, 220), 1.5)
        cursor_pen.setCosmetic(True)
        self.cursor_item.setPen(cursor_pen)
        self.cursor_item.setZValue(4)
        self.cursor_item.setVisible(False)
        for item in (self.image_item, self.heat_item, self.mask_layer, self.outline_item, self.stroke_item, self.cursor_item):
            self.view_box.addItem(item)
        self.title_item: pg.TextItem | None = None
        if title:
            self.set_title(title)
        self.image_shape: tuple[int, int] | None = None
        self.pixels: np.ndarray | None = None  # the image's native pixels, as given (the assist tool reads them)
        self.heatmap: np.ndarray | None = None
        self.set_colormap("turbo")

    # --- content ---------------------------------------------------------------------------
    def set_title(self, text: str) -> None:
        if self.title_item is None:
            self.title_item = pg.TextItem(color="#e6edf3", fill=pg.mkBrush(13, 17, 23, 190), anchor=(0, 0))
            self.title_item.setZValue(10)
            self.view_box.addItem(self.title_item, ignoreBounds=True)
        self.title_item.setText(text)

    def set_image(self, pixels: np.ndarray | None, fit: bool = True) -> None:
        self.pixels = pixels
        if pixels is None:
            self.image_item.clear()
            self.image_shape = None
            self.set_heatmap(None)
            self.mask_layer.set_mask(None)
            self.set_outline(None)
            return
        image = display_uint8(pixels) if pixels.dtype != np.uint8 or pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
        shape = image.shape[:2]
        self.image_item.setImage(image, levels=(0, 255), autoLevels=False)
        changed = shape != self.image_shape
        self.image_shape = shape
        if fit or changed:
            self.fit()

    def fit(self, padding: float = 0.02) -> None:
        """Show the whole image; `padding` is the margin around it, as a fraction of its size."""
        if self.image_shape is not None:
            height, width = self.image_shape
            self.view_box.setRange(QRectF(0, 0, width, height), padding=padding)

    def set_colormap(self, name: str) -> None:
        colormap = pg.colormap.get(name)
        self.heat_item.setLookupTable(colormap.getLookupTable(0.0, 1.0, 256))

    def set_heatmap(self, heatmap: np.ndarray | None) -> None:
        self.heatmap = heatmap
        if heatmap is None:
            self.heat_item.setVisible(False)
            self.heat_item.clear()
            return
        # Shown as bytes (the colormap has 256 entries anyway): a float32 copy of a 100 MP map would be 400 MB.
        self.heat_item.setImage(quantise_heatmap(heatmap, np.uint8), levels=(0, 255), autoLevels=False)
        self.heat_item.setVisible(True)

    def set_heat_opacity(self, opacity: float) -> None:
        self.heat_item.setOpacity(opacity)

    def set_outline(self, mask: np.ndarray | None) -> None:
        """Draw the outline of a binary mask (e.g. the CAM thresholded at the slider's value)."""
        path = QPainterPath()
        if mask is not None and mask.any():
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
            for contour in contours:
                points = contour[:, 0, :]
                path.moveTo(QPointF(points[0][0] + 0.5, points[0][1] + 0.5))
                for x, y in points[1:]:
                    path.lineTo(QPointF(x + 0.5, y + 0.5))
                path.closeSubpath()
        self.outline_item.setPath(path)

    def show_cursor(self, position: tuple[float, float] | None, diameter: float) -> None:
        if position is None:
            self.cursor_item.setVisible(False)
            return
        x, y = position
        self.cursor_item.setRect(QRectF(x - diameter / 2, y - diameter / 2, diameter, diameter))
        self.cursor_item.setVisible(True)

    def show_stroke(self, points: list[tuple[int, int]] | None, width: float = 1.0, subtract: bool = False) -> None:
        """Draw the assist tool's stroke through pixel centres, `width` image pixels wide (None hides it)."""
        if not points:
            self.stroke_item.setVisible(False)
            return
        path = QPainterPath(QPointF(points[0][0] + 0.5, points[0][1] + 0.5))
        for x, y in points[1:]:
            path.lineTo(QPointF(x + 0.5, y + 0.5))
        if len(points) == 1:  # a click: a dot
            path.lineTo(QPointF(points[0][0] + 0.51, points[0][1] + 0.5))
        colour = QColor(80, 160, 255, 170) if subtract else QColor(255, 220, 60, 170)
        pen = QPen(colour, max(1.0, float(width)))
        pen.setCapStyle(Qt.PenCapStyle.RoundCap)
        pen.setJoinStyle(Qt.PenJoinStyle.RoundJoin)
        self.stroke_item.setPen(pen)
        self.stroke_item.setPath(path)
        self.stroke_item.setVisible(True)

    def link_to(self, other: "ImageViewer") -> None:
        """Zoom and pan follow `other`'s."""
        self.view_box.setXLink(other.view_box)
        self.view_box.setYLink(other.view_box)

    # --- input -----------------------------------------------------------------------------
    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            steps = 1 if event.angleDelta().y() > 0 else -1
            self.ctrl_wheel.emit(steps)
            event.accept()
            return
        super().wheelEvent(event)

    def scene_to_widget(self, x: float, y: float) -> QPointF:
        """Widget (viewport) coordinates of image pixel (x, y); used by tests and benchmarks."""
        scene_point = self.view_box.mapViewToScene(QPointF(x, y))
        return QPointF(self.mapFromScene(scene_point))
