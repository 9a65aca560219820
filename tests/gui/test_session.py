"""The session the panels share instead of the window: panels built on a bare session ask it for
what they need, job runners report through it, and in the window the requests and announcements
reach the gallery, the status bar and the other panels."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterator

import pytest
from PySide6.QtCore import QCoreApplication, QEvent, Qt

from defect_studio.gui.session import Session, Stage
from defect_studio.jobs import Progress, ProgressKind
from defect_studio.project import Project


@pytest.fixture
def opened(review_project: Path) -> Iterator[Project]:
    project = Project.open(review_project)
    yield project
    project.close()


@pytest.fixture
def session(qtbot) -> Iterator[Session]:  # type: ignore[no-untyped-def]
    """A session with no window. Deleted, and its Python cycles collected, here on the GUI thread: left
    to the garbage collector, a Qt object may be freed later from a job's worker thread (a crash)."""
    made = Session()
    yield made
    made.shutdown_jobs()
    made.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()


def test_the_tag_panel_asks_the_session_and_shows_its_counts(qtbot, session: Session, opened: Project) -> None:
    from defect_studio.gui.panels.tag_panel import TagPanel

    panel = TagPanel(session)
    qtbot.addWidget(panel)
    assert not panel.good_button.isEnabled()  # no project yet
    session.set_project(opened)
    session.set_counts({"images": 24, "good": 12, "defect": 11, "untagged": 1, "to_review": 11})
    assert "<b>24</b>" in panel.counts_label.text() and "Ready to train" in panel.counts_label.text()
    for button, signal, value in ((panel.good_button, session.tag_requested, "good"),
                                  (panel.untag_button, session.tag_requested, "untagged"),
                                  (panel.next_button, session.step_requested, 1),
                                  (panel.previous_button, session.step_requested, -1)):
        with qtbot.waitSignal(signal, timeout=1000) as asked:
            qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
        assert asked.args == [value]
    with qtbot.waitSignal(session.rescan_requested, timeout=1000):
        qtbot.mouseClick(panel.rescan_button, Qt.MouseButton.LeftButton)
    session.set_project(None)


def test_the_train_curves_take_epoch_events_only(qtbot, session: Session) -> None:
    from defect_studio.gui.panels.train_panel import TrainPanel

    panel = TrainPanel(session)
    qtbot.addWidget(panel)
    metrics = {"loss": 0.7, "val_loss": 0.6, "val_auroc": 0.8, "val_f1": 0.7}
    panel.runner.progress.emit(Progress("train", 1, 3, "epoch 1/3", dict(metrics), kind=ProgressKind.EPOCH))
    panel.runner.progress.emit(Progress("train", 2, 3, "epoch 2/3", {**metrics, "loss": 0.5}, kind=ProgressKind.EPOCH))
    # The closing result repeats the best epoch's metrics, and a step may carry metrics too: neither is a point.
    panel.runner.progress.emit(Progress("done", 2, 3, "saved", {**metrics, "epoch": 1.0}, kind=ProgressKind.RESULT))
    panel.runner.progress.emit(Progress("train", 3, 3, "", dict(metrics)))
    assert panel.point_count("loss") == 2 and panel.history["loss"][-1] == (2.0, 0.5)


def test_the_live_segmenter_curve_takes_epoch_events_only(qtbot, session: Session) -> None:
    from defect_studio.gui.mask_editor import MaskEditor
    from defect_studio.gui.panels.rounds_panel import RoundsPanel
    from defect_studio.gui.viewer import ImageViewer

    viewer = ImageViewer()
    qtbot.addWidget(viewer)
    panel = RoundsPanel(session, MaskEditor(viewer, viewer))
    qtbot.addWidget(panel)
    panel.runner.progress.emit(Progress("loading masks", 0, None, "round 0"))
    panel.runner.progress.emit(Progress("train segmenter", 1, 2, "epoch 1/2", {"loss": 0.4, "val_defect_iou": 0.2},
                                        kind=ProgressKind.EPOCH))
    panel.runner.progress.emit(Progress("pseudo-labels", 3, 9, "img", {"loss": 9.0, "flagged": 1.0}))
    assert panel.live_points == {"loss": [(1.0, 0.4)], "val_defect_iou": [(1.0, 0.2)]}


def test_runners_report_through_the_session_and_are_joined(qtbot, session: Session) -> None:
    runner = session.make_runner("Count")
    assert session.shared_runner("export", "Export") is session.shared_runner("export", "Export")
    started, progress, finished = [], [], []
    session.job_started.connect(started.append)
    session.job_progress.connect(lambda r, event: progress.append((r, event.step)))
    session.job_finished.connect(lambda r, outcome: finished.append((r, outcome)))

    def count(cancel):  # type: ignore[no-untyped-def]
        for step in range(1, 4):
            cancel.raise_if_cancelled()
            yield Progress("count", step, 3)
        return 3

    with qtbot.waitSignal(session.job_finished, timeout=10_000):
        runner.start(count)
    assert started == [runner] and progress[-1] == (runner, 3) and finished == [(runner, "succeeded")]

    def forever(cancel):  # type: ignore[no-untyped-def]
        while True:
            cancel.raise_if_cancelled()
            yield Progress("wait", 0)

    runner.start(forever)
    assert session.busy_runners() == [runner]
    with qtbot.waitSignal(session.job_finished, timeout=10_000):
        session.cancel_jobs()
    assert finished[-1] == (runner, "cancelled") and session.busy_runners() == []
    session.shutdown_jobs()


def test_the_round_and_the_image_as_the_session_tells_them(qtbot, session: Session, opened: Project) -> None:
    rounds: list[object] = []
    session.round_changed.connect(rounds.append)
    session.set_project(opened)
    assert session.round == 0 and rounds == [0]
    session.notify_masks_changed()  # the same round: no news
    opened.create_round({"source": "test"})
    session.notify_masks_changed()
    assert session.round == 1 and rounds == [0, 1]

    first, second = [image.id for image in opened.images()][:2]
    with qtbot.waitSignal(session.image_changed, timeout=1000) as changed:
        session.set_image(first)
    assert changed.args == [first] and session.pixels is None
    assert not session.set_pixels(second, object())  # decoded too late: the user has moved on
    assert session.pixels is None
    session.set_project(None)
    assert session.round is None and rounds[-1] is None and session.image_id is None


def test_in_the_window_the_cams_hide_the_mask_and_a_review_reaches_gallery_and_counts(qtbot, make_window,
                                                                                     review_project: Path) -> None:
    window = make_window()
    assert window.open_path(review_project)
    review, layer = window.review_panel, window.viewer.mask_layer
    window.stage_tabs.setCurrentWidget(review)
    assert window.session.current_stage is Stage.REVIEW
    to_review = window.gallery_pane.gallery_model.counts()["to_review"]
    first_id = review.queue.item(0).data(Qt.ItemDataRole.UserRole)
    qtbot.mouseClick(review.queue.viewport(), Qt.MouseButton.LeftButton,
                     pos=review.queue.visualItemRect(review.queue.item(0)).center())
    assert window.current_image_id == first_id  # the queue asked the session, the window selected it
    assert layer.isVisible()

    window.stage_tabs.setCurrentWidget(window.cam_panel)
    assert not layer.isVisible()
    window.gallery_pane.select_image(review.queue.item(1).data(Qt.ItemDataRole.UserRole))  # its mask opens, hidden
    assert window.editor.session is not None and not layer.isVisible()
    window.stage_tabs.setCurrentWidget(window.tag_panel)
    assert layer.isVisible()

    window.gallery_pane.select_image(first_id)
    window.stage_tabs.setCurrentWidget(review)
    qtbot.mouseClick(review.accept_button, Qt.MouseButton.LeftButton)
    assert window.gallery_pane.gallery_model.item_by_id(first_id).mask_state == "accepted"
    assert window.session.counts["to_review"] == to_review - 1
    assert f"{to_review - 1} to review" in window.counts_label.text()
    # B jumps to the review stage from anywhere (a request the window fulfils).
    window.stage_tabs.setCurrentWidget(window.train_panel)
    window.action("brush").trigger()
    assert window.stage_tabs.currentWidget() is review and window.editor.tool == "brush"
