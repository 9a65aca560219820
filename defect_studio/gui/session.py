"""The session: what the window and its stage panels share, and the signals for its changes.

It holds the open `Project`, the current image (id and decoded pixels), the current round, the
stage last shown and every `JobRunner`. Panels read it and call the core; they tell each other
nothing directly. What a panel needs another part of the window to do (select an image, show a
stage, put a widget in the centre) it asks through a `request_*` method, whose signal the window
wires. Each piece of state has one writer: the project the `ProjectFlow`, the image the
`ImageDisplay`, the stage the window, the counts the gallery pane; anyone may announce that masks,
tags or the classifier changed.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, Signal

from defect_studio.gui.workers import JobRunner
from defect_studio.project import Project


class Stage(str, Enum):
    """The stage panels, in the order of their tabs."""

    TAG = "tag"
    TRAIN = "train"
    CAMS = "cams"
    REVIEW = "review"
    ROUNDS = "rounds"


class Session(QObject):
    project_changed = Signal()
    image_changed = Signal(object)  # the current image's id, or None
    image_loaded = Signal(int)  # the current image's pixels are decoded (`pixels`) and shown
    round_changed = Signal(object)  # the current round's index, or None
    stage_changed = Signal(str)  # the Stage just shown: its panel activates, the others deactivate
    tags_changed = Signal()
    masks_changed = Signal()  # rounds or mask records changed: the masks on disk are new
    mask_state_changed = Signal(int, int, str)  # image id, round, state: one mask was saved or reviewed
    mask_states_changed = Signal()  # many masks' review states changed (not their pixels)
    counts_changed = Signal(object)  # dict: the gallery's counts: images, good, defect, untagged, to_review
    classifier_changed = Signal()  # a classifier was trained
    job_started = Signal(object)  # JobRunner
    job_progress = Signal(object, object)  # JobRunner, Progress
    job_finished = Signal(object, str)  # JobRunner, outcome ("succeeded", "cancelled", "failed")
    job_failed = Signal(object, object, str)  # JobRunner, exception, traceback text
    # Requests to the window.
    image_requested = Signal(int)  # select this image in the gallery
    step_requested = Signal(int)  # select the gallery's next (+1) or previous (-1) image
    tag_requested = Signal(str)  # tag the selected images (undoable)
    rescan_requested = Signal()  # import the images added to the project's folder
    stage_requested = Signal(str)  # show this Stage's tab
    central_widget_requested = Signal(object)  # show this widget in the centre; None: the image viewer

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.project: Project | None = None
        self.image_id: int | None = None
        self.pixels: np.ndarray | None = None  # the current image's, once decoded
        self.current_stage: Stage | None = None  # the stage last shown; None until the user switches tabs
        self.counts: dict[str, int] = {}
        self.runners: list[JobRunner] = []
        self._shared_runners: dict[str, JobRunner] = {}
        self._last_round: int | None = None

    # --- state, each set by its one writer ----------------------------------------------------------
    def set_project(self, project: Project | None) -> None:
        self.project = project
        self.image_id = None
        self.pixels = None
        self.project_changed.emit()
        self._check_round()

    def set_image(self, image_id: int | None, pixels: np.ndarray | None = None) -> None:
        """`image_id` is shown (and its `pixels`, when already decoded)."""
        self.image_id = image_id
        self.pixels = None
        if image_id is not None and pixels is not None:
            self.set_pixels(image_id, pixels)
        self.image_changed.emit(image_id)

    def set_pixels(self, image_id: int, pixels: np.ndarray) -> bool:
        """The decoded pixels of `image_id` are shown; False (and ignored) if the user has moved on."""
        if image_id != self.image_id:
            return False
        self.pixels = pixels
        self.image_loaded.emit(image_id)
        return True

    def set_stage(self, stage: Stage) -> None:
        self.current_stage = Stage(stage)
        self.stage_changed.emit(self.current_stage.value)

    def set_counts(self, counts: dict[str, int]) -> None:
        self.counts = dict(counts)
        self.counts_changed.emit(self.counts)

    @property
    def round(self) -> int | None:
        """The current round: the project's latest (read from the project each time: jobs add rounds)."""
        if self.project is None:
            return None
        rounds = self.project.rounds()
        return rounds[-1].index if rounds else None

    # --- announcements -----------------------------------------------------------------------------
    def notify_masks_changed(self) -> None:
        """Rounds or mask records changed (new proposals, a new round)."""
        self.masks_changed.emit()
        self._check_round()

    def notify_mask_state(self, image_id: int, round_index: int, state: str) -> None:
        self.mask_state_changed.emit(image_id, round_index, state)

    def notify_mask_states_changed(self) -> None:
        self.mask_states_changed.emit()

    def notify_tags_changed(self) -> None:
        self.tags_changed.emit()

    def notify_classifier_changed(self) -> None:
        self.classifier_changed.emit()

    def _check_round(self) -> None:
        current = self.round
        if current != self._last_round:
            self._last_round = current
            self.round_changed.emit(current)

    # --- requests to the window --------------------------------------------------------------------
    def request_image(self, image_id: int) -> None:
        self.image_requested.emit(image_id)

    def request_step(self, step: int) -> None:
        self.step_requested.emit(step)

    def request_tag(self, tag: str) -> None:
        self.tag_requested.emit(tag)

    def request_rescan(self) -> None:
        self.rescan_requested.emit()

    def request_stage(self, stage: Stage) -> None:
        self.stage_requested.emit(Stage(stage).value)

    def request_central_widget(self, widget: Any) -> None:
        self.central_widget_requested.emit(widget)

    # --- jobs --------------------------------------------------------------------------------------
    def make_runner(self, title: str) -> JobRunner:
        """A JobRunner whose start, progress, end and failure the session reports (the window shows
        them in the status bar); every runner is joined by `shutdown_jobs`."""
        runner = JobRunner(title, self)
        runner.started.connect(lambda _title, r=runner: self.job_started.emit(r))
        runner.progress.connect(lambda event, r=runner: self.job_progress.emit(r, event))
        runner.finished.connect(lambda outcome, r=runner: self.job_finished.emit(r, outcome))
        runner.failed.connect(lambda error, details, r=runner: self.job_failed.emit(r, error, details))
        self.runners.append(runner)
        return runner

    def shared_runner(self, key: str, title: str) -> JobRunner:
        """The one runner for `key`, made on first use: e.g. one export at a time, whichever dialog starts it."""
        if key not in self._shared_runners:
            self._shared_runners[key] = self.make_runner(title)
        return self._shared_runners[key]

    def busy_runners(self) -> list[JobRunner]:
        return [runner for runner in self.runners if runner.busy]

    def cancel_jobs(self) -> None:
        for runner in self.busy_runners():
            runner.cancel()

    def shutdown_jobs(self) -> None:
        """Cancel every job and wait for its thread: no job outlives the project it writes to."""
        for runner in self.runners:
            runner.shutdown()
