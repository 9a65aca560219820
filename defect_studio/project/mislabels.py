"""The mislabel queue on the project side (no torch, no Qt): the saved ranking, what is still open in
it, and the user's decisions (confirm or flip a tag, undo).

The ranking is derived data (`ml.mislabels.mislabel_job` makes it): it lives in
`cache/mislabels.json`, written atomically, and may be deleted. The decisions are the user's work:
they are tag changes and `tag_reviews` rows in the database, one transaction per action.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from defect_studio.atomic import atomic_write_json
from defect_studio.errors import DataError
from defect_studio.project.store import Project, TagReview

QUEUE_FILE = "mislabels.json"
QUEUE_FORMAT = "defect-studio-mislabels/1"
SUSPECT_THRESHOLD = 0.5  # the models contradict the tag more than they support it


def queue_path(project: Project) -> Path:
    return Path(project.cache_dir) / QUEUE_FILE


def save_queue(project: Project, queue: dict[str, Any]) -> None:
    atomic_write_json(queue_path(project), queue)


def load_queue(project: Project) -> dict[str, Any] | None:
    """The saved ranking, or None when there is none (or it is unreadable: it is only a cache)."""
    try:
        queue = json.loads(queue_path(project).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(queue, dict) or queue.get("format") != QUEUE_FORMAT or not isinstance(queue.get("ranked"), list):
        return None
    return queue


def stale_reason(project: Project, queue: dict[str, Any] | None) -> str | None:
    """Why the saved ranking no longer describes the project's models (None: it still does)."""
    if queue is None:
        return "no mislabel queue has been computed yet"
    classifier = project.latest_run("classifier")
    if classifier is None:
        return "the project has no classifier"
    if classifier.checkpoint_sha256 != queue.get("classifier_sha256"):
        return "the classifier has been trained again since"
    if "segmenter" in queue.get("signals", []):
        segmenter = project.current_segmenter()
        if segmenter is None or segmenter.checkpoint_sha256 != queue.get("segmenter_sha256"):
            return "the current segmenter has changed since"
    elif queue.get("segmenter_wanted") and project.current_segmenter() is not None:
        return "a segmenter has been trained since"
    return None


def open_suspects(project: Project, queue: dict[str, Any] | None = None,
                  min_suspicion: float = SUSPECT_THRESHOLD) -> list[dict[str, Any]]:
    """The queue's entries still open, most suspect first: the image keeps the tag it was ranked
    with and the user has not settled it (confirmed, or flipped and back), suspicion >= `min_suspicion`."""
    queue = load_queue(project) if queue is None else queue
    if queue is None:
        return []
    tags = {image.id: image.tag for image in project.images()}
    settled = project.settled_tags()
    out = []
    for entry in queue["ranked"]:
        image_id = int(entry["image_id"])
        if tags.get(image_id) != entry["tag"] or settled.get(image_id) == entry["tag"]:
            continue
        if float(entry["suspicion"]) >= min_suspicion:
            out.append({**entry, "rank": len(out) + 1})
    return out


# ------------------------------------------------------------------------------------- decisions
@dataclass
class TagDecision:
    reviews: list[TagReview]
    messages: list[str] = field(default_factory=list)

    def summary(self) -> str:
        flipped = [r for r in self.reviews if r.decision == "flipped"]
        confirmed = [r for r in self.reviews if r.decision == "confirmed"]
        parts = []
        if flipped:
            parts.append(f"{len(flipped)} tag(s) flipped")
        if confirmed:
            parts.append(f"{len(confirmed)} tag(s) confirmed")
        return (", ".join(parts) or "nothing changed") + ". `defect-studio mislabels PROJECT --undo` takes it back."


def _edited_masks(project: Project, image_id: int) -> list[Any]:
    return [record for record in project.mask_records() if record.image_id == image_id and record.state == "edited"]


def flip_tags(project: Project, image_ids: Iterable[int], force: bool = False) -> TagDecision:
    """Flip the tags (good <-> defect) of images, as one undoable action. Masks are never touched.

    An image tagged defect whose mask the user edited with defect pixels contradicts a flip to good:
    unless `force`, the whole action is refused with a message that names the mask, and nothing
    changes. With `force` (or for other edited masks) the flip goes ahead and the message says that
    the edited mask was kept as it is."""
    image_ids = list(dict.fromkeys(int(i) for i in image_ids))
    messages, conflicts = [], []
    for image_id in image_ids:
        image = project.image(image_id)
        for record in _edited_masks(project, image_id):
            pixels = int(project.load_mask(record).sum())
            if image.tag == "defect" and pixels and not force:
                conflicts.append(f"{image.stem} has a mask you edited in round {record.round_index} with {pixels} defect "
                                 "pixel(s)")
            else:
                messages.append(f"{image.stem}: your edited mask of round {record.round_index} ({pixels} defect pixel(s)) "
                                "is kept as it is.")
    if conflicts:
        raise DataError(
            "; ".join(conflicts) + ": flipping to good would contradict it. Nothing was changed. Flip anyway with "
            "--force (the edited mask is kept as it is; reject it in the Review tab to leave it out of training), "
            "or confirm the tag instead."
        )
    return TagDecision(project.review_tags(image_ids, "flipped"), messages)


def confirm_tags(project: Project, image_ids: Iterable[int]) -> TagDecision:
    """Keep the images' tags: they leave the queue (one undoable action)."""
    return TagDecision(project.review_tags(image_ids, "confirmed"))


def undo_last(project: Project) -> TagDecision:
    """Take back the latest confirm or flip still in effect."""
    reviews = project.undo_tag_review()
    if not reviews:
        return TagDecision([], ["no confirm or flip to undo."])
    stems = {image.id: image.stem for image in project.images()}
    return TagDecision(reviews, [
        f"undone: {stems.get(r.image_id, r.image_id)} " + (f"back to {r.old_tag}" if r.decision == "flipped" else
                                                           f"no longer confirmed {r.new_tag}")
        for r in reviews
    ])
