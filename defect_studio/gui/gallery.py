"""The gallery: a virtualised list of thumbnails with tag and mask-state badges, and its filters.

`GalleryModel` holds only records (id, stem, tag, mask state); thumbnails are requested when a
row is first painted, made on a background thread pool and cached on disk under
`<project cache>/thumbs/<image sha256>.png`, so 10 000 images open and scroll without waiting.
"""

from __future__ import annotations

import logging
import threading
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

TAG_CODES = {"good": 0, "defect": 1, "untagged": 2}  # the model's array of tags
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


def _make_thumbnail(item: GalleryItem, cache_dir: Path) -> QImage:
    """The item's thumbnail from the disk cache, else decoded, scaled and saved there."""
    cached = cache_dir / f"{item.sha256}.png"
    image = QImage(str(cached)) if cached.exists() else QImage()
    if image.isNull():
        array = thumbnail_array(item.path)
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(cached, encoded.tobytes())
        image = rgb_qimage(array)
    return image


class _ThumbnailWorker(QRunnable):
    """Makes the newest requested thumbnail, then the next newest, until none is left waiting."""

    def __init__(self, cache: "ThumbnailCache") -> None:
        super().__init__()
        self._cache = cache

    def run(self) -> None:
        while (item := self._cache._take_newest()) is not None:
            try:
                image = _make_thumbnail(item, self._cache.cache_dir)
            except Exception as error:  # an unreadable image gets a placeholder, not a crash
                log.warning("thumbnail of %s failed: %s", item.path, error)
                self._cache._signals.failed.emit(item.image_id)
            else:
                self._cache._signals.ready.emit(item.image_id, image)


class ThumbnailCache(QObject):
    """Thumbnails by image id: memory LRU in front of the disk cache in front of a decoder thread.

    The decoder makes the newest request first and forgets requests beyond the newest `max_waiting`:
    scrolling through 100 000 images asks for every card it paints on the way, and the cards on screen
    when it stops must not wait behind the tens of thousands it passed (they are asked for again
    if they are painted again)."""

    updated = Signal(int)

    def __init__(self, cache_dir: Path, capacity: int = 3000, max_waiting: int = 256,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.cache_dir = cache_dir
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._images: OrderedDict[int, QImage] = OrderedDict()
        self._pending: set[int] = set()  # asked for and not made yet (GUI thread only)
        self._failed: set[int] = set()
        self._capacity = capacity
        self._max_waiting = max_waiting
        self._waiting: OrderedDict[int, GalleryItem] = OrderedDict()  # not started yet, newest last
        self._waiting_lock = threading.Lock()  # shared with the decoder thread
        self._worker_running = False
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
            self._request(item)
        return None

    def _request(self, item: GalleryItem) -> None:
        self._pending.add(item.image_id)
        with self._waiting_lock:
            self._waiting[item.image_id] = item
            while len(self._waiting) > self._max_waiting:
                forgotten, _ = self._waiting.popitem(last=False)
                self._pending.discard(forgotten)
            start = not self._worker_running
            self._worker_running = True
        if start:
            self._pool.start(_ThumbnailWorker(self))

    def _take_newest(self) -> GalleryItem | None:
        """The decoder thread's next item, or None (and the worker ends) when nothing waits."""
        with self._waiting_lock:
            if not self._waiting:
                self._worker_running = False
                return None
            return self._waiting.popitem(last=True)[1]

    def is_idle(self) -> bool:
        return not self._pending

    def shutdown(self) -> None:
        with self._waiting_lock:
            self._waiting.clear()
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
    """The gallery's items and the rows the filter shows.

    Each item's tag, "to review" and "flagged" also live in numpy arrays (by position in the item list),
    and the rows shown are an array of positions: a filter switch, a count or `row_of` over 100 000
    images costs a fraction of a millisecond, where a Python pass over the items costs tens (a stall)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._all: list[GalleryItem] = []
        self._position: dict[int, int] = {}  # image id -> index in _all
        self._tag_code = np.zeros(0, np.uint8)  # TAG_CODES of each item
        self._to_review = np.zeros(0, bool)
        self._flagged = np.zeros(0, bool)
        self._shown = np.zeros(0, np.intp)  # the rows: positions in _all, in row order
        self._row_count = 0
        self._suspect_row_of: dict[int, int] | None = None  # the suspect filter's rows go by rank, not position
        self.filter_name = "all"
        self.thumbnails: ThumbnailCache | None = None

    # --- content -----------------------------------------------------------------------------
    def set_items(self, items: Iterable[GalleryItem], thumbnails: ThumbnailCache | None) -> None:
        self.beginResetModel()
        self._all = list(items)
        self._position = {item.image_id: position for position, item in enumerate(self._all)}
        self._tag_code = np.fromiter((TAG_CODES[item.tag] for item in self._all), np.uint8, len(self._all))
        self._to_review = np.fromiter((item.mask_state == "proposed" for item in self._all), bool, len(self._all))
        self._flagged = np.fromiter((item.flagged for item in self._all), bool, len(self._all))
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

    def _apply_filter(self) -> None:
        name = self.filter_name
        self._suspect_row_of = None
        if name in TAG_CODES:
            shown = np.flatnonzero(self._tag_code == TAG_CODES[name])
        elif name == "to_review":
            shown = np.flatnonzero(self._to_review)
        elif name == "flagged":
            shown = np.flatnonzero(self._flagged)
        elif name == "suspect":  # most suspect first
            ranked = sorted((item.suspect_rank, position) for position, item in enumerate(self._all)
                            if item.suspect_rank is not None)
            shown = np.array([position for _, position in ranked], np.intp)
            self._suspect_row_of = {self._all[position].image_id: row for row, position in enumerate(shown.tolist())}
        else:
            shown = np.arange(len(self._all), dtype=np.intp)
        self._shown = shown
        self._row_count = len(shown)

    def update_tags(self, image_ids: Iterable[int], tag: str) -> None:
        """Change the badges in place; rows stay where they are until the filter is applied again."""
        for image_id in image_ids:
            position = self._position.get(image_id)
            if position is not None:
                self._all[position].tag = tag
                self._tag_code[position] = TAG_CODES[tag]
                self._changed(image_id)

    def update_mask_state(self, image_id: int, state: str | None, flagged: bool | None = None) -> None:
        position = self._position.get(image_id)
        if position is None:
            return
        item = self._all[position]
        item.mask_state = state
        self._to_review[position] = state == "proposed"
        if flagged is not None:
            item.flagged = flagged
            self._flagged[position] = flagged
        self._changed(image_id)

    def _changed(self, image_id: int) -> None:
        row = self.row_of(image_id)
        if row is not None:
            index = self.index(row)
            self.dataChanged.emit(index, index)

    def _on_thumbnail(self, image_id: int) -> None:
        self._changed(image_id)

    # --- queries -----------------------------------------------------------------------------
    def item(self, row: int) -> GalleryItem:
        if not 0 <= row < self._row_count:
            raise IndexError(f"row {row} of {self._row_count}")
        return self._all[self._shown[row]]

    def thumbnail(self, item: GalleryItem) -> QImage | None:
        """The item's thumbnail when it is made; else None, and it is asked for."""
        return self.thumbnails.get(item) if self.thumbnails is not None else None

    def all_items(self) -> list[GalleryItem]:
        """Every item, whatever the filter (the suspect-tags filter annotates them before filtering)."""
        return self._all

    def item_by_id(self, image_id: int) -> GalleryItem | None:
        position = self._position.get(image_id)
        return None if position is None else self._all[position]

    def row_of(self, image_id: int) -> int | None:
        if self._suspect_row_of is not None:
            return self._suspect_row_of.get(image_id)
        position = self._position.get(image_id)
        if position is None:
            return None
        row = int(np.searchsorted(self._shown, position))  # the rows are in position order
        return row if row < self._row_count and self._shown[row] == position else None

    def counts(self) -> dict[str, int]:
        """images, good, defect, untagged, to_review (masks proposed and not yet reviewed)."""
        per_tag = np.bincount(self._tag_code, minlength=len(TAG_CODES))
        return {"images": len(self._all), **{tag: int(per_tag[code]) for tag, code in TAG_CODES.items()},
                "to_review": int(np.count_nonzero(self._to_review))}

    # --- Qt model API ------------------------------------------------------------------------
    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else self._row_count

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= self._row_count:
            return None
        item = self._all[self._shown[index.row()]]
        if role == Qt.ItemDataRole.DisplayRole:
            return item.stem
        if role == Qt.ItemDataRole.DecorationRole:
            return self.thumbnail(item)
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
        # The item itself, not index.data(role): PySide6 6.12 drops a reference to None each time
        # QModelIndex.data() answers "no value" (an image without a thumbnail yet, or without a mask),
        # and a few thousand painted cards freed None and aborted the app (bench large-project).
        model = index.model()
        item: GalleryItem = model.item(index.row())  # type: ignore[attr-defined]
        image = model.thumbnail(item)  # type: ignore[attr-defined]
        if image is not None and not image.isNull():
            scaled = image.size().scaled(thumb_box.size(), Qt.AspectRatioMode.KeepAspectRatio)
            target = QRect(0, 0, scaled.width(), scaled.height())
            target.moveCenter(thumb_box.center())
            painter.drawImage(target, image)
        else:
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor("#0d1117"))
            painter.drawRect(thumb_box)

        stem = item.stem
        text_rect = QRect(rect.x() + 4, thumb_box.bottom() + 3, rect.width() - 8, rect.bottom() - thumb_box.bottom() - 3)
        painter.setPen(QColor("#c9d1d9"))
        metrics = QFontMetrics(painter.font())
        painter.drawText(text_rect, Qt.AlignmentFlag.AlignCenter, metrics.elidedText(stem, Qt.TextElideMode.ElideMiddle, text_rect.width()))

        font = QFont(painter.font())
        font.setPointSizeF(max(6.5, font.pointSizeF() * 0.78))
        font.setBold(True)
        painter.setFont(font)
        tag = item.tag
        if tag in TAG_COLOURS:
            self._pill(painter, thumb_box.topLeft().x() + 3, thumb_box.top() + 3, tag.upper(), TAG_COLOURS[tag], left=True)
        state = item.mask_state
        pill_height = QFontMetrics(painter.font()).height() + 2
        bottom = thumb_box.bottom() - pill_height - 2
        if state in MASK_STATE_COLOURS:
            self._pill(painter, thumb_box.left() + 3, bottom, MASK_STATE_LABELS[state], MASK_STATE_COLOURS[state], left=True)
        if item.flagged:
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
