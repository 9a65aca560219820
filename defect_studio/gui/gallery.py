"""The gallery: a virtualised list of thumbnails with tag and mask-state badges, and its filters.

`GalleryModel` holds only records (id, stem, tag, mask state); thumbnails are requested when a
row is first painted, made on a background thread pool and cached on disk under
`<project cache>/thumbs/<image sha256>.png`, so 10 000 images open and scroll without waiting.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
from PySide6.QtCore import (
    QAbstractListModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QRect,
    QRectF,
    QRunnable,
    QSize,
    Qt,
    QThreadPool,
    Signal,
)
from PySide6.QtGui import QColor, QFont, QFontMetrics, QImage, QPainter, QPen
from PySide6.QtWidgets import QAbstractItemView, QListView, QStyle, QStyledItemDelegate, QStyleOptionViewItem

from defect_studio.atomic import atomic_write_bytes
from defect_studio.gui.viewer import display_uint8
from defect_studio.imageio import decode_image

log = logging.getLogger(__name__)

THUMB_SIZE = 112
CELL = QSize(THUMB_SIZE + 16, THUMB_SIZE + 34)
IMAGE_ID_ROLE = Qt.ItemDataRole.UserRole + 1
TAG_ROLE = Qt.ItemDataRole.UserRole + 2
MASK_STATE_ROLE = Qt.ItemDataRole.UserRole + 3
FLAGGED_ROLE = Qt.ItemDataRole.UserRole + 4

FILTERS: dict[str, str] = {
    "all": "All images",
    "untagged": "Untagged",
    "good": "Good",
    "defect": "Defect",
    "to_review": "To review",
    "flagged": "Flagged",
    "suspect": "Suspect tags",  # the mislabel queue, most suspect first
}

TAG_COLOURS = {"good": QColor("#3fb950"), "defect": QColor("#f85149")}
MASK_STATE_COLOURS = {
    "proposed": QColor("#d29922"),
    "accepted": QColor("#3fb950"),
    "edited": QColor("#58a6ff"),
    "rejected": QColor("#8b949e"),
}
MASK_STATE_LABELS = {"proposed": "to review", "accepted": "accepted", "edited": "edited", "rejected": "rejected"}


@dataclass
class GalleryItem:
    image_id: int
    stem: str
    image_root: Path
    rel_path: str
    sha256: str
    tag: str
    mask_state: str | None = None
    flagged: bool = False
    suspect_rank: int | None = None  # place in the mislabel queue (1 = most suspect); None: not a suspect
    suspect_reason: str = ""

    @property
    def path(self) -> Path:
        """Built on use, like ImageRecord.path: a refresh of 10 000 rows builds no Path."""
        return self.image_root / self.rel_path


def thumbnail_array(path: Path, size: int = THUMB_SIZE) -> np.ndarray:
    """8-bit RGB thumbnail (longest side `size`) of any image the core can read."""
    pixels, _ = decode_image(path)
    image = display_uint8(pixels)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    height, width = image.shape[:2]
    scale = size / max(height, width)
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def rgb_qimage(image: np.ndarray) -> QImage:
    """A QImage that owns a copy of an 8-bit gray or RGB array."""
    image = np.ascontiguousarray(image)
    height, width = image.shape[:2]
    if image.ndim == 2:
        return QImage(image.data, width, height, image.strides[0], QImage.Format.Format_Grayscale8).copy()
    return QImage(image.data, width, height, image.strides[0], QImage.Format.Format_RGB888).copy()


class _ThumbnailSignals(QObject):
    ready = Signal(int, QImage)
    failed = Signal(int)


class _ThumbnailTask(QRunnable):
    def __init__(self, item: GalleryItem, cache_dir: Path, signals: _ThumbnailSignals) -> None:
        super().__init__()
        self._item = item
        self._cache_dir = cache_dir
        self._signals = signals

    def run(self) -> None:
        cached = self._cache_dir / f"{self._item.sha256}.png"
        try:
            image = QImage(str(cached)) if cached.exists() else QImage()
            if image.isNull():
                array = thumbnail_array(self._item.path)
                ok, encoded = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
                if ok:
                    atomic_write_bytes(cached, encoded.tobytes())
                image = rgb_qimage(array)
            self._signals.ready.emit(self._item.image_id, image)
        except Exception as error:  # an unreadable image gets a placeholder, not a crash
            log.warning("thumbnail of %s failed: %s", self._item.path, error)
            self._signals.failed.emit(self._item.image_id)


class ThumbnailCache(QObject):
    """Thumbnails by image id: memory LRU in front of the disk cache in front of a decoder thread."""

    updated = Signal(int)

    def __init__(self, cache_dir: Path, capacity: int = 3000, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.cache_dir = cache_dir
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._images: OrderedDict[int, QImage] = OrderedDict()
        self._pending: set[int] = set()
        self._failed: set[int] = set()
        self._capacity = capacity
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)  # decoding competes with training for few cores
        self._signals = _ThumbnailSignals(self)
        self._signals.ready.connect(self._on_ready)
        self._signals.failed.connect(self._on_failed)

    def get(self, item: GalleryItem) -> QImage | None:
        image = self._images.get(item.image_id)
        if image is not None:
            self._images.move_to_end(item.image_id)
            return image
        if item.image_id not in self._pending and item.image_id not in self._failed:
            self._pending.add(item.image_id)
            self._pool.start(_ThumbnailTask(item, self.cache_dir, self._signals))
        return None

    def is_idle(self) -> bool:
        return not self._pending

    def shutdown(self) -> None:
        self._pool.clear()
        self._pool.waitForDone()

    def _on_ready(self, image_id: int, image: QImage) -> None:
        self._pending.discard(image_id)
        self._images[image_id] = image
        while len(self._images) > self._capacity:
            self._images.popitem(last=False)
        self.updated.emit(image_id)

    def _on_failed(self, image_id: int) -> None:
        self._pending.discard(image_id)
        self._failed.add(image_id)
        self.updated.emit(image_id)


class GalleryModel(QAbstractListModel):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._all: list[GalleryItem] = []
        self._rows: list[GalleryItem] = []
        self._row_of: dict[int, int] = {}
        self._by_id: dict[int, GalleryItem] = {}
        self.filter_name = "all"
        self.thumbnails: ThumbnailCache | None = None

    # --- content -----------------------------------------------------------------------------
    def set_items(self, items: Iterable[GalleryItem], thumbnails: ThumbnailCache | None) -> None:
        self.beginResetModel()
        self._all = list(items)
        self._by_id = {item.image_id: item for item in self._all}
        if self.thumbnails is not None and self.thumbnails is not thumbnails:
            self.thumbnails.updated.disconnect(self._on_thumbnail)
        if thumbnails is not None and thumbnails is not self.thumbnails:
            thumbnails.updated.connect(self._on_thumbnail)
        self.thumbnails = thumbnails
        self._apply_filter()
        self.endResetModel()

    def set_filter(self, name: str) -> None:
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r}")
        self.beginResetModel()
        self.filter_name = name
        self._apply_filter()
        self.endResetModel()

    def _matches(self, item: GalleryItem) -> bool:
        name = self.filter_name
        if name == "all":
            return True
        if name in ("untagged", "good", "defect"):
            return item.tag == name
        if name == "to_review":
            return item.mask_state == "proposed"
        if name == "flagged":
            return item.flagged
        if name == "suspect":
            return item.suspect_rank is not None
        return True

    def _apply_filter(self) -> None:
        self._rows = [item for item in self._all if self._matches(item)]
        if self.filter_name == "suspect":
            self._rows.sort(key=lambda item: item.suspect_rank)  # type: ignore[arg-type, return-value]
        self._row_of = {item.image_id: row for row, item in enumerate(self._rows)}

    def update_tags(self, image_ids: Iterable[int], tag: str) -> None:
        """Change the badges in place; rows stay where they are until the filter is applied again."""
        for image_id in image_ids:
            item = self._by_id.get(image_id)
            if item is not None:
                item.tag = tag
                self._changed(image_id)

    def update_mask_state(self, image_id: int, state: str | None, flagged: bool | None = None) -> None:
        item = self._by_id.get(image_id)
        if item is None:
            return
        item.mask_state = state
        if flagged is not None:
            item.flagged = flagged
        self._changed(image_id)

    def _changed(self, image_id: int) -> None:
        row = self._row_of.get(image_id)
        if row is not None:
            index = self.index(row)
            self.dataChanged.emit(index, index)

    def _on_thumbnail(self, image_id: int) -> None:
        self._changed(image_id)

    # --- queries -----------------------------------------------------------------------------
    def item(self, row: int) -> GalleryItem:
        return self._rows[row]

    def all_items(self) -> list[GalleryItem]:
        """Every item, whatever the filter (the suspect-tags filter annotates them before filtering)."""
        return self._all

    def item_by_id(self, image_id: int) -> GalleryItem | None:
        return self._by_id.get(image_id)

    def row_of(self, image_id: int) -> int | None:
        return self._row_of.get(image_id)

    def counts(self) -> dict[str, int]:
        counts = {"images": len(self._all), "good": 0, "defect": 0, "untagged": 0, "to_review": 0}
        for item in self._all:
            counts[item.tag] = counts.get(item.tag, 0) + 1
            if item.mask_state == "proposed":
                counts["to_review"] += 1
        return counts

    # --- Qt model API ------------------------------------------------------------------------
    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._rows)

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self._rows):
            return None
        item = self._rows[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return item.stem
        if role == Qt.ItemDataRole.DecorationRole:
            return self.thumbnails.get(item) if self.thumbnails is not None else None
        if role == Qt.ItemDataRole.ToolTipRole:
            state = MASK_STATE_LABELS.get(item.mask_state or "", "no mask")
            suspect = f"\nsuspect tag #{item.suspect_rank}: {item.suspect_reason}" if item.suspect_rank else ""
            return f"{item.stem}\ntag: {item.tag}\nmask: {state}{' · flagged' if item.flagged else ''}{suspect}"
        if role == IMAGE_ID_ROLE:
            return item.image_id
        if role == TAG_ROLE:
            return item.tag
        if role == MASK_STATE_ROLE:
            return item.mask_state
        if role == FLAGGED_ROLE:
            return item.flagged
        return None


class GalleryDelegate(QStyledItemDelegate):
    """A card: thumbnail, file stem, a tag pill (top left), a mask-state pill (top right)."""

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex | QPersistentModelIndex) -> QSize:
        return CELL

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: QModelIndex | QPersistentModelIndex) -> None:
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = option.rect.adjusted(3, 3, -3, -3)
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        current = bool(option.state & QStyle.StateFlag.State_HasFocus)
        painter.setPen(QPen(QColor("#58a6ff") if selected else QColor("#30363d"), 2 if selected else 1))
        painter.setBrush(QColor("#1f2a37") if selected else QColor("#161b22"))
        painter.drawRoundedRect(QRectF(rect), 6, 6)
        if current and not selected:
            painter.setPen(QPen(QColor("#58a6ff"), 1, Qt.PenStyle.DashLine))
            painter.drawRoundedRect(QRectF(rect).adjusted(1, 1, -1, -1), 6, 6)

        thumb_box = QRect(rect.x() + 5, rect.y() + 5, rect.width() - 10, rect.width() - 10)
        image = index.data(Qt.ItemDataRole.DecorationRole)
        if isinstance(image, QImage) and not image.isNull():
            scaled = image.size().scaled(thumb_box.size(), Qt.AspectRatioMode.KeepAspectRatio)
            target = QRect(0, 0, scaled.width(), scaled.height())
            target.moveCenter(thumb_box.center())
            painter.drawImage(target, image)
        else:
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor("#0d1117"))
            painter.drawRect(thumb_box)

        stem = index.data(Qt.ItemDataRole.DisplayRole) or ""
        text_rect = QRect(rect.x() + 4, thumb_box.bottom() + 3, rect.width() - 8, rect.bottom() - thumb_box.bottom() - 3)
        painter.setPen(QColor("#c9d1d9"))
        metrics = QFontMetrics(painter.font())
        painter.drawText(text_rect, Qt.AlignmentFlag.AlignCenter, metrics.elidedText(stem, Qt.TextElideMode.ElideMiddle, text_rect.width()))

        font = QFont(painter.font())
        font.setPointSizeF(max(6.5, font.pointSizeF() * 0.78))
        font.setBold(True)
        painter.setFont(font)
        tag = index.data(TAG_ROLE)
        if tag in TAG_COLOURS:
            self._pill(painter, thumb_box.topLeft().x() + 3, thumb_box.top() + 3, tag.upper(), TAG_COLOURS[tag], left=True)
        state = index.data(MASK_STATE_ROLE)
        pill_height = QFontMetrics(painter.font()).height() + 2
        bottom = thumb_box.bottom() - pill_height - 2
        if state in MASK_STATE_COLOURS:
            self._pill(painter, thumb_box.left() + 3, bottom, MASK_STATE_LABELS[state], MASK_STATE_COLOURS[state], left=True)
        if index.data(FLAGGED_ROLE):
            self._pill(painter, thumb_box.right() - 3, bottom, "⚑", QColor("#db6d28"), left=False)
        painter.restore()

    @staticmethod
    def _pill(painter: QPainter, x: int, y: int, text: str, colour: QColor, left: bool) -> None:
        metrics = QFontMetrics(painter.font())
        width = metrics.horizontalAdvance(text) + 10
        height = metrics.height() + 2
        box = QRectF(x if left else x - width, y, width, height)
        painter.setPen(Qt.PenStyle.NoPen)
        fill = QColor(colour)
        fill.setAlpha(230)
        painter.setBrush(fill)
        painter.drawRoundedRect(box, height / 2, height / 2)
        painter.setPen(QColor("#0d1117"))
        painter.drawText(box, Qt.AlignmentFlag.AlignCenter, text)


class GalleryView(QListView):
    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.setObjectName("gallery")
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setMovement(QListView.Movement.Static)
        self.setUniformItemSizes(True)  # lets the view lay out 10 000 rows without asking each one
        self.setLayoutMode(QListView.LayoutMode.Batched)
        self.setBatchSize(200)
        self.setGridSize(CELL)
        self.setSpacing(0)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setItemDelegate(GalleryDelegate(self))
        self.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.setWordWrap(False)

    def keyboardSearch(self, search: str) -> None:  # noqa: N802 - Qt's name
        return  # letters are the window's shortcuts (G, D, U, J, K...), not a type-ahead search
