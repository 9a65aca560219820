"""Review operations on a round's proposals: accept, reject, replace with edited masks (no torch, no Qt).

The GUI's review panel and `defect-studio review` both call these. Each change goes through the
store, which records an event per change (`project.mask_history`), and never overwrites a mask
the user accepted or edited in an earlier round (those are carried forward by the store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from defect_studio.errors import BadImageError, DataError, ProjectError
from defect_studio.imageio import IMAGE_EXTENSIONS, read_mask
from defect_studio.project.store import ImageRecord, MaskRecord, Project


@dataclass
class ReviewResult:
    round_index: int
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def summary(self, verb: str) -> str:
        text = f"round {self.round_index}: {len(self.changed)} mask(s) {verb}"
        if self.unchanged:
            text += f", {len(self.unchanged)} left as they were"
        return text + "."


def latest_round(project: Project) -> int:
    rounds = project.rounds()
    if not rounds:
        raise ProjectError("this project has no rounds yet; make proposals first (defect-studio pseudo).")
    return rounds[-1].index


def _resolve_round(project: Project, round_index: int | None) -> int:
    if round_index is None:
        return latest_round(project)
    project.round(round_index)  # a clear ProjectError for an unknown round
    return round_index


def accept_all(project: Project, round_index: int | None = None) -> ReviewResult:
    """Accept every proposed mask of the round (rejected and edited ones keep their state)."""
    index = _resolve_round(project, round_index)
    result = ReviewResult(index)
    stems = {image.id: image.stem for image in project.images()}  # one query, not one per mask
    for record in project.mask_records(round_index=index):
        stem = stems[record.image_id]
        if record.state == "proposed":
            project.review_mask(record.image_id, index, "accepted")
            result.changed.append(stem)
        else:
            result.unchanged.append(stem)
    return result


def reject_rest(project: Project, round_index: int | None = None) -> ReviewResult:
    """Reject every defect image's mask still proposed in the round: those images sit this round out,
    and only the masks the user accepted or edited (and the good images) train the segmenter. On MT,
    30 edits a round with the rest rejected trained a segmenter 3x better than the same edits with the
    rest used as proposed (docs/benchmarks/editing-mt.md)."""
    index = _resolve_round(project, round_index)
    result = ReviewResult(index)
    stems = {image.id: image.stem for image in project.images("defect")}
    for record in project.mask_records(round_index=index, state="proposed", tag="defect"):
        project.review_mask(record.image_id, index, "rejected")
        result.changed.append(stems[record.image_id])
    return result


def _decided(project: Project, record: MaskRecord, state: str) -> MaskRecord:
    """The review rule of one mask: accepting an edited mask keeps it 'edited' (the edit already is
    the user's label, and the round counts it as an edit); deciding what a mask already is changes nothing."""
    if record.state == state or (state == "accepted" and record.state == "edited"):
        return record
    return project.review_mask(record.image_id, record.round_index, state)


def decide(project: Project, image_id: int, state: str, round_index: int | None = None) -> MaskRecord:
    """Accept or reject the round's mask of one image (the window's A and R keys), by the same rule
    as `accept` and `reject`; returns the mask's record."""
    if state not in ("accepted", "rejected"):
        raise ValueError(f"a review decision is 'accepted' or 'rejected', got {state!r}")
    index = _resolve_round(project, round_index)
    record = project.mask_record(image_id, index)
    if record is None:
        raise ProjectError(f"{project.image(image_id).stem} has no mask in round {index} to review.")
    return _decided(project, record, state)


def _set_state(project: Project, names: Iterable[str], state: str, round_index: int | None) -> ReviewResult:
    index = _resolve_round(project, round_index)
    result = ReviewResult(index)
    images = project.find_images(list(names))
    masks = {image.id: project.mask_record(image.id, index) for image in images}
    missing = [image.stem for image in images if masks[image.id] is None]
    if missing:
        raise ProjectError(f"no mask in round {index} for: {', '.join(missing[:10])}")
    for image in images:
        current = masks[image.id]
        assert current is not None
        if _decided(project, current, state) is current:
            result.unchanged.append(image.stem)
        else:
            result.changed.append(image.stem)
    return result


def accept(project: Project, names: Iterable[str], round_index: int | None = None) -> ReviewResult:
    """Accept the round's masks of these images (ids, stems or relative paths); edited masks stay edited."""
    return _set_state(project, names, "accepted", round_index)


def reject(project: Project, names: Iterable[str], round_index: int | None = None) -> ReviewResult:
    """Reject them: those images are left out of this round's segmenter training."""
    return _set_state(project, names, "rejected", round_index)


def save_edit(project: Project, image_id: int, mask: np.ndarray, round_index: int | None = None) -> MaskRecord:
    """Replace the round's mask of one image by the user's edit (state 'edited', final)."""
    return project.save_edited_mask(image_id, _resolve_round(project, round_index), mask)


def import_masks(project: Project, folder: str | Path, round_index: int | None = None) -> ReviewResult:
    """Masks `<stem>.png` from a folder become edited masks of the round.

    Everything is checked before anything is written: masks with no matching image, unreadable
    masks and masks whose size differs from their image are all listed in one clear error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of masks.")
    index = _resolve_round(project, round_index)
    by_stem = {image.stem: image for image in project.images()}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{folder}: no mask images found.")
    unknown, wrong_size, unreadable = [], [], []
    loaded: list[tuple[ImageRecord, np.ndarray]] = []
    for path in files:
        image = by_stem.get(path.stem)
        if image is None:
            unknown.append(path.name)
            continue
        try:
            mask = read_mask(path)
        except BadImageError as error:
            unreadable.append(f"{path.name} ({error})")
            continue
        if mask.shape != (image.height, image.width):
            wrong_size.append(f"{path.name} is {mask.shape[1]}×{mask.shape[0]}, its image {image.width}×{image.height}")
            continue
        loaded.append((image, mask))
    problems = []
    if wrong_size:
        problems.append(f"{len(wrong_size)} mask(s) of the wrong size: " + "; ".join(wrong_size[:20]))
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable mask(s): " + "; ".join(unreadable[:10]))
    if unknown:
        problems.append(f"{len(unknown)} mask(s) match no image of the project: " + ", ".join(unknown[:10]))
    if problems:
        raise DataError(f"{folder}: nothing imported. " + " | ".join(problems))
    result = ReviewResult(index)
    for image, mask in loaded:
        project.save_edited_mask(image.id, index, mask)
        result.changed.append(image.stem)
    return result
