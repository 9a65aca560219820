"""The gallery pane: the image list with its filter, its counts and the (undoable) tagging of its selection.

It reads the project from the `Session`, announces the image the user moves to (`current_image_changed`)
and what it wants shown in the status bar (`message`); the window puts that image in the viewer. The
"Suspect tags" filter (`SuspectTags`) works on this pane.
"""

from __future__ import annotations

from PySide6.QtCore import QItemSelectionModel, QModelIndex, Signal
from PySide6.QtGui import QUndoCommand, QUndoStack
from PySide6.QtWidgets import QComboBox, QLabel, QVBoxLayout, QWidget

from defect_studio.errors import DefectStudioError
from defect_studio.gui.dialogs import report_error
from defect_studio.gui.gallery import FILTERS, IMAGE_ID_ROLE, GalleryItem, GalleryModel, GalleryView, ThumbnailCache
from defect_studio.gui.session import Session
from defect_studio.gui.suspects import SuspectTags
from defect_studio.project import Project


class TagCommand(QUndoCommand):
    """One tag change of one or more images; undo restores each image's previous tag."""

    def __init__(self, pane: "GalleryPane", image_ids: list[int], new_tag: str, old_tags: dict[int, str]) -> None:
        super().__init__(f"Tag {len(image_ids)} image(s) {new_tag}")
        self._pane = pane
        self._ids = image_ids
        self._new = new_tag
        self._old = old_tags

    def redo(self) -> None:
        self._pane.write_tags(self._ids, self._new)

    def undo(self) -> None:
        by_tag: dict[str, list[int]] = {}
        for image_id in self._ids:
            by_tag.setdefault(self._old[image_id], []).append(image_id)
        for tag, ids in by_tag.items():
            self._pane.write_tags(ids, tag)


class GalleryPane(QWidget):
    current_image_changed = Signal(object)  # the image the user moved to (id), or None
    message = Signal(str, int)  # status-bar text and how long to show it (ms; 0: until replaced)

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.thumbnails: ThumbnailCache | None = None
        self.tag_stack = QUndoStack(self)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        self.filter_combo = QComboBox(self)
        self.filter_combo.setObjectName("filterCombo")
        self.filter_combo.setToolTip("Show only some images: untagged, good, defect, masks to review, flagged masks, "
                                     "suspect tags (the tags the models contradict, most suspect first)")
        for key, label in FILTERS.items():
            self.filter_combo.addItem(label, key)
        self.filter_combo.currentIndexChanged.connect(lambda _: self.set_filter(self.filter_combo.currentData()))
        self.gallery_model = GalleryModel(self)
        self.gallery = GalleryView(self)
        self.gallery.setModel(self.gallery_model)
        self.gallery.selectionModel().currentChanged.connect(self._on_current)
        self.count_label = QLabel(self)
        self.count_label.setObjectName("galleryCount")
        layout.addWidget(self.filter_combo)
        layout.addWidget(self.gallery, 1)
        layout.addWidget(self.count_label)
        self.suspects = SuspectTags(self)  # the "Suspect tags" filter (the mislabel queue)
        session.masks_changed.connect(self.refresh)
        session.mask_states_changed.connect(self.refresh)
        session.mask_state_changed.connect(self._on_mask_state_changed)

    def show_message(self, text: str, timeout_ms: int = 0) -> None:
        self.message.emit(text, timeout_ms)

    # --- the project -----------------------------------------------------------------------------
    def set_project(self, project: Project | None) -> None:
        """Before the session's project changes: thumbnails of `project`'s images, no tag history."""
        self.tag_stack.clear()
        if self.thumbnails is not None:
            self.thumbnails.shutdown()
            self.thumbnails.deleteLater()
            self.thumbnails = None
        if project is not None:
            self.thumbnails = ThumbnailCache(project.cache_dir / "thumbs", parent=self)

    def shutdown(self) -> None:
        if self.thumbnails is not None:
            self.thumbnails.shutdown()

    # --- the list --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Reload records from the project (keeps the current image when it is still listed)."""
        keep = self.session.image_id
        project = self.session.project
        if project is None:
            self.gallery_model.set_items([], None)
            self.update_counts()
            return
        round_index = self.session.round
        states = project.mask_states(round_index) if round_index is not None else {}
        items = []
        for image in project.images():
            state, flagged = states.get(image.id, (None, False))
            if state == "proposed" and image.tag != "defect":
                state, flagged = None, False  # a good image's empty mask needs no review: no badge, not in "to review"
            items.append(GalleryItem(image.id, image.stem, image.image_root, image.rel_path, image.sha256, image.tag,
                                     state, flagged))
        self.suspects.annotate(items)
        self.gallery_model.set_items(items, self.thumbnails)
        self.update_counts()
        if keep is not None and self.gallery_model.row_of(keep) is not None:
            self.gallery.setCurrentIndex(self.gallery_model.index(self.gallery_model.row_of(keep)))

    def set_filter(self, name: str) -> None:
        if self.filter_combo.currentData() != name:
            self.filter_combo.setCurrentIndex(self.filter_combo.findData(name))
            return
        keep = self.session.image_id
        if "suspect" in (name, self.gallery_model.filter_name):  # only that filter reads (or leaves) the ranks
            self.suspects.annotate(self.gallery_model.all_items(), active=name == "suspect")
        self.gallery_model.set_filter(name)
        self.update_counts()
        row = self.gallery_model.row_of(keep) if keep is not None else None
        if row is not None:
            self.select_row(row)
        elif self.gallery_model.rowCount() > 0:
            self.select_row(0)
        if name == "suspect":
            self.suspects.activated()

    def select_row(self, row: int) -> None:
        index = self.gallery_model.index(row)
        self.gallery.selectionModel().setCurrentIndex(index, QItemSelectionModel.SelectionFlag.ClearAndSelect)
        self.gallery.scrollTo(index)

    def select_image(self, image_id: int) -> bool:
        """Select `image_id`, showing every image first when the filter hides it; False if it is not listed."""
        row = self.gallery_model.row_of(image_id)
        if row is None:
            self.set_filter("all")
            row = self.gallery_model.row_of(image_id)
        if row is None:
            return False
        self.select_row(row)
        return True

    def step_image(self, step: int) -> None:
        count = self.gallery_model.rowCount()
        if count == 0:
            return
        current = self.gallery.currentIndex().row()
        row = 0 if current < 0 else min(count - 1, max(0, current + step))
        self.select_row(row)

    def selected_image_ids(self) -> list[int]:
        rows = sorted(index.row() for index in self.gallery.selectionModel().selectedIndexes())
        ids = [self.gallery_model.item(row).image_id for row in rows]
        if not ids and self.session.image_id is not None:
            ids = [self.session.image_id]
        return ids

    def next_item(self) -> GalleryItem | None:
        """The item after the current one (the one to decode ahead), or None."""
        row = self.gallery.currentIndex().row()
        if row < 0 or row + 1 >= self.gallery_model.rowCount():
            return None
        return self.gallery_model.item(row + 1)

    def _on_current(self, current: QModelIndex, previous: QModelIndex) -> None:
        image_id = current.data(IMAGE_ID_ROLE) if current.isValid() else None
        self.current_image_changed.emit(image_id)
        if self.gallery_model.filter_name == "suspect" and self.suspects.status_for(image_id):
            self.show_message(self.suspects.status_for(image_id))

    def _on_mask_state_changed(self, image_id: int, round_index: int, state: str) -> None:
        if round_index == self.session.round:
            self.gallery_model.update_mask_state(image_id, state)
        self.update_counts()

    def update_counts(self) -> None:
        counts = self.gallery_model.counts()
        self.count_label.setText(f"{self.gallery_model.rowCount()} shown of {counts['images']}")
        self.session.set_counts(counts)

    # --- tagging ---------------------------------------------------------------------------------
    def tag_selected(self, tag: str, advance: bool = False) -> None:
        """Tag the selected images (undoable); `advance`: then move on to the next image when one was tagged
        (the keyboard flow of the Tag stage: tag, next, tag, next...)."""
        if self.session.project is None:
            return
        ids = self.selected_image_ids()
        if not ids:
            return
        old = {image_id: self.gallery_model.item_by_id(image_id).tag for image_id in ids}  # type: ignore[union-attr]
        if all(value == tag for value in old.values()):
            return
        self.tag_stack.push(TagCommand(self, ids, tag, old))
        if advance and len(ids) == 1:
            self.step_image(+1)

    def write_tags(self, ids: list[int], tag: str) -> None:
        assert self.session.project is not None
        try:
            self.session.project.set_tags(ids, tag, source="user")
        except DefectStudioError as error:
            report_error(self, "Cannot save the tags", error)
            return
        self.gallery_model.update_tags(ids, tag)
        self.update_counts()
        self.session.notify_tags_changed()
