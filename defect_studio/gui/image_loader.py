"""Decoded images by id for the viewer: a small LRU cache, filled on the GUI thread or by one
background thread (large images)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

from defect_studio.imageio import decode_image


class _ImageTask(QRunnable):
    def __init__(self, loader: "ImageLoader", image_id: int, path: Path) -> None:
        super().__init__()
        self._loader, self._image_id, self._path = loader, image_id, path

    def run(self) -> None:
        try:
            pixels, _ = decode_image(self._path)
        except Exception as error:  # reported in the status bar, never a crash
            self._loader.failed.emit(self._image_id, str(error))
        else:
            self._loader._ready.emit(self._image_id, pixels)


class ImageLoader(QObject):
    """Decoded images by id: a small LRU cache, filled on the GUI thread or by one background thread."""

    loaded = Signal(int, object)
    failed = Signal(int, str)
    _ready = Signal(int, object)

    def __init__(self, parent: QObject | None = None, capacity: int = 6) -> None:
        super().__init__(parent)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pending: set[int] = set()
        self._capacity = capacity
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._ready.connect(self._store)

    def cached(self, image_id: int) -> np.ndarray | None:
        pixels = self._cache.get(image_id)
        if pixels is not None:
            self._cache.move_to_end(image_id)
        return pixels

    def load_now(self, image_id: int, path: Path) -> np.ndarray:
        pixels, _ = decode_image(path)
        self._remember(image_id, pixels)
        return pixels

    def request(self, image_id: int, path: Path) -> None:
        if image_id in self._cache or image_id in self._pending:
            return
        self._pending.add(image_id)
        self._pool.start(_ImageTask(self, image_id, path))

    def clear(self) -> None:
        self._pool.clear()
        self._pool.waitForDone()
        self._cache.clear()
        self._pending.clear()

    def shutdown(self) -> None:
        self.clear()

    def _remember(self, image_id: int, pixels: np.ndarray) -> None:
        self._cache[image_id] = pixels
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)

    def _store(self, image_id: int, pixels: object) -> None:
        self._pending.discard(image_id)
        assert isinstance(pixels, np.ndarray)
        self._remember(image_id, pixels)
        self.loaded.emit(image_id, pixels)
