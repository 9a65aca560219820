"""The gallery's "Suspect tags" filter: the mislabel queue in the gallery pane.

Choosing the filter shows the queue's open entries, most suspect first, each with its reason in the
tooltip and the status bar; when the models changed since the queue was ranked (or it never was),
the ranking runs in the background first. `G` / `D` flip a tag (the gallery's undoable tag change);
`C` confirms it (undoable too): either way the image leaves the queue the next time the filter is
applied, so the row stays put while you work down the list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from PySide6.QtGui import QUndoCommand, QUndoStack

from defect_studio.errors import DefectStudioError
from defect_studio.gui.dialogs import report_error
from defect_studio.project.mislabels import SUSPECT_THRESHOLD, confirm_tags, load_queue, stale_reason

if TYPE_CHECKING:
    from defect_studio.gui.gallery import GalleryItem, GalleryModel
    from defect_studio.gui.session import Session

FILTER = "suspect"


class Gallery(Protocol):
    """What the filter needs of the gallery it filters (the window's GalleryPane)."""

    session: "Session"  # the open project, the current image, the job runners
    gallery_model: "GalleryModel"
    tag_stack: QUndoStack

    def refresh(self) -> None: ...
    def selected_image_ids(self) -> list[int]: ...
    def step_image(self, step: int) -> None: ...
    def show_message(self, text: str, timeout_ms: int = 0) -> None: ...


class ConfirmTagsCommand(QUndoCommand):
    """Confirm the tags of images on the mislabel queue; undo forgets the confirmation."""

    def __init__(self, controller: "SuspectTags", image_ids: list[int]) -> None:
        super().__init__(f"Confirm {len(image_ids)} tag(s)")
        self._controller = controller
        self._ids = image_ids

    def redo(self) -> None:
        project = self._controller.gallery.session.project
        if project is not None:
            try:
                confirm_tags(project, self._ids)
            except DefectStudioError as error:
                report_error(self._controller.gallery, "Cannot confirm the tag", error)
                self.setObsolete(True)

    def undo(self) -> None:
        project = self._controller.gallery.session.project
        if project is not None:
            try:
                project.undo_tag_review()
            except DefectStudioError as error:
                report_error(self._controller.gallery, "Cannot undo the confirmation", error)


class SuspectTags:
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self.runner = gallery.session.make_runner("Suspect tags")
        self.runner.succeeded.connect(lambda _: self._ranked())
        self._cache: tuple[Any, float, dict[str, Any] | None] | None = None  # (project path, mtime, queue)

    # --- the queue ------------------------------------------------------------------------------
    def _queue(self) -> dict[str, Any] | None:
        project = self.gallery.session.project
        if project is None:
            return None
        from defect_studio.project.mislabels import queue_path

        path = queue_path(project)
        mtime = path.stat().st_mtime if path.is_file() else -1.0
        if self._cache is None or self._cache[0] != project.path or self._cache[1] != mtime:
            self._cache = (project.path, mtime, load_queue(project))
        return self._cache[2]

    def annotate(self, items: list["GalleryItem"], active: bool | None = None) -> None:
        """Mark the gallery's items with their place in the queue (only while the filter is on, or
        `active`: about to be)."""
        project = self.gallery.session.project
        if active is None:
            active = self.gallery.gallery_model.filter_name == FILTER
        queue = self._queue() if active else None
        ranks: dict[int, tuple[int, str]] = {}
        if queue is not None and project is not None:
            settled = project.settled_tags()
            tags = {item.image_id: item.tag for item in items}
            for entry in queue["ranked"]:
                image_id = int(entry["image_id"])
                if float(entry["suspicion"]) < SUSPECT_THRESHOLD or tags.get(image_id) != entry["tag"] or settled.get(image_id) == entry["tag"]:
                    continue
                ranks[image_id] = (len(ranks) + 1, str(entry["reason"]))
        for item in items:
            item.suspect_rank, item.suspect_reason = ranks.get(item.image_id, (None, ""))

    def activated(self) -> None:
        """The filter was chosen: rank the tags in the background when the models changed since."""
        project = self.gallery.session.project
        if project is None or self.runner.busy:
            return
        reason = stale_reason(project, self._queue())
        if reason is None:
            self._show_status()
            return
        if project.latest_run("classifier") is None:
            self.gallery.show_message("Suspect tags need a trained classifier (Train tab).", 8000)
            return
        from defect_studio.ml.mislabels import mislabel_job  # on use: loads torch

        self.gallery.show_message(f"Ranking the tags ({reason})…", 8000)
        self.runner.start(lambda cancel: mislabel_job(project, cancel), "Rank suspect tags")

    def _ranked(self) -> None:
        self._cache = None
        self.gallery.refresh()
        self._show_status()

    def _show_status(self) -> None:
        """The current suspect's reason, else how many suspects there are."""
        reason = self.status_for(self.gallery.session.image_id)
        count = sum(item.suspect_rank is not None for item in self.gallery.gallery_model.all_items())
        self.gallery.show_message(
            reason or (f"{count} suspect tag(s): G / D flips the tag, C confirms it (undo with Ctrl+Z)." if count else
                       "No suspect tag: the models agree with every open tag."))

    # --- decisions ------------------------------------------------------------------------------
    def confirm_selected(self) -> None:
        """C: keep the selected images' tags; they leave the queue (undoable), the next image follows."""
        gallery = self.gallery
        if gallery.session.project is None:
            return
        ids = [i for i in gallery.selected_image_ids()
               if (item := gallery.gallery_model.item_by_id(i)) is not None and item.tag in ("good", "defect")]
        if not ids:
            return
        gallery.tag_stack.push(ConfirmTagsCommand(self, ids))
        if len(ids) == 1:
            gallery.step_image(+1)

    def status_for(self, image_id: int | None) -> str:
        item = self.gallery.gallery_model.item_by_id(image_id) if image_id is not None else None
        if item is None or item.suspect_rank is None:
            return ""
        return f"Suspect tag #{item.suspect_rank}: {item.suspect_reason}"
