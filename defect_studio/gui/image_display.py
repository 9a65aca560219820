"""The image on show: the gallery's current image, in the viewer and in the `Session`.

Small images are decoded at once on the GUI thread (keyboard flow stays exact), large ones in the
background (the viewer shows them when they are ready), and the gallery's next image is decoded
ahead so that J / → shows it at once. Leaving an image saves its mask edit first.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QWidget

from defect_studio.errors import DefectStudioError
from defect_studio.gui.dialogs import report_error
from defect_studio.gui.gallery import GalleryItem
from defect_studio.gui.image_loader import ImageLoader
from defect_studio.gui.mask_editor import MaskEditor
from defect_studio.gui.session import Session
from defect_studio.gui.viewer import ImageViewer

SYNC_DECODE_PIXELS = 2_000_000  # larger images are decoded off the GUI thread


class ImageDisplay(QObject):
    message = Signal(str, int)  # status-bar text and how long to show it (ms)

    def __init__(self, session: Session, viewer: ImageViewer, editor: MaskEditor,
                 next_item: Callable[[], GalleryItem | None], parent: QWidget) -> None:
        """`next_item`: the gallery's image after the current one (decoded ahead), or None."""
        super().__init__(parent)
        self.session = session
        self.viewer = viewer
        self.editor = editor
        self._next_item = next_item
        self._dialog_parent = parent
        self.loader = ImageLoader(self)
        self.loader.loaded.connect(self._show_decoded)
        self.loader.failed.connect(self._decode_failed)
        session.tags_changed.connect(self.update_title)

    def show_image(self, image_id: int | None) -> None:
        if image_id == self.session.image_id:
            return
        try:
            self.editor.flush()  # leaving an image never loses its edit
        except DefectStudioError as error:
            report_error(self._dialog_parent, "Cannot save the mask", error)
        project = self.session.project
        pixels = None
        if image_id is None or project is None:
            self.viewer.set_image(None)
        else:
            image = project.image(image_id)
            pixels = self.loader.cached(image_id)
            if pixels is None and image.width * image.height <= SYNC_DECODE_PIXELS:
                # Small images decode in a few milliseconds: show them at once (and keep keyboard flow exact).
                try:
                    pixels = self.loader.load_now(image_id, image.path)
                except DefectStudioError as error:
                    self.message.emit(str(error), 8000)
            elif pixels is None:  # a large image decodes in the background; the viewer shows it when it is ready
                self.loader.request(image_id, image.path)
            if pixels is None:
                self.viewer.set_image(None)
            else:
                self.viewer.set_image(pixels, fit=False)
            self._decode_next()
        self.session.set_image(image_id, pixels)
        self.update_title()

    def update_title(self) -> None:
        """The viewer's title: the image's name, size and tag."""
        project, image_id = self.session.project, self.session.image_id
        if project is not None and image_id is not None:
            image = project.image(image_id)
            self.viewer.set_title(f" {image.stem} · {image.width}×{image.height} · {image.tag} ")

    def shutdown(self) -> None:
        """Stop decoding and forget the decoded images (before the project closes)."""
        self.loader.shutdown()

    def _show_decoded(self, image_id: int, pixels: np.ndarray) -> None:
        if image_id != self.session.image_id:
            return  # the user has moved on
        self.viewer.set_image(pixels, fit=False)
        self.session.set_pixels(image_id, pixels)

    def _decode_failed(self, image_id: int, message: str) -> None:
        if image_id == self.session.image_id:
            self.viewer.set_image(None)
            self.message.emit(message, 8000)

    def _decode_next(self) -> None:
        """Decode the next image in the gallery in the background, so J / → shows it at once."""
        item = self._next_item()
        if self.session.project is not None and item is not None:
            self.loader.request(item.image_id, item.path)
