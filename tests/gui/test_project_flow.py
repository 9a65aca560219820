"""Opening, creating, rescanning and closing projects as a user does, through the project flow; the
image on show (decoded ahead, or a clear message when it cannot be)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
from PySide6.QtCore import QCoreApplication, QEvent, QSettings
from PySide6.QtWidgets import QMessageBox, QWidget

from defect_studio.gui.project_flow import ProjectFlow
from defect_studio.gui.session import Session
from defect_studio.jobs import Progress
from defect_studio.project import Project
from defect_studio.project.location import PROJECT_SUBFOLDER
from tests.image_files import write_cv2


def wait_idle(qtbot, window, timeout=60_000) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: not window.busy_runners(), timeout=timeout)


def image_folder(folder: Path, count: int) -> Path:
    """`count` small gray images, each of its own content (none is a duplicate)."""
    for index in range(count):
        write_cv2(folder / f"part_{index}.png", np.full((30, 40), 40 + 50 * index, np.uint8))
    return folder


def endless_job(cancel):  # type: ignore[no-untyped-def]
    import time

    while True:
        cancel.raise_if_cancelled()
        time.sleep(0.01)
        yield Progress("wait", 0)


def error_texts(window: QWidget) -> list[str]:
    boxes = [box for box in window.findChildren(QMessageBox) if box.objectName() == "errorDialog" and box.isVisible()]
    texts = [box.text() for box in boxes]
    for box in boxes:
        box.close()
    return texts


def test_open_folder_makes_a_project_of_its_images_and_a_rescan_adds_new_ones(qtbot, make_window, tmp_path: Path,
                                                                             monkeypatch) -> None:
    import defect_studio.gui.project_flow as project_flow

    folder = image_folder(tmp_path / "line 3", 3)
    asked_from: list[str] = []

    def choose(parent, caption, start):  # type: ignore[no-untyped-def]
        asked_from.append(start)
        return str(folder)

    monkeypatch.setattr(project_flow, "QFileDialog", types.SimpleNamespace(getExistingDirectory=choose))
    window = make_window()
    window.action("open_project").trigger()
    wait_idle(qtbot, window)
    assert window.project is not None and window.project.path == folder / PROJECT_SUBFOLDER
    assert window.gallery_pane.gallery_model.rowCount() == 3
    assert "line 3 — defect-studio" in window.windowTitle()
    assert window.center_stack.currentWidget() is window.viewer
    assert window.statusBar().currentMessage().startswith("3 image files found: 3 added")
    settings = QSettings()
    assert settings.value("project/last") == str(folder / PROJECT_SUBFOLDER)
    assert settings.value("project/lastFolder") == str(folder)

    # Rescan (Tag stage) imports what was added to the folder since; the known images stay as they are.
    window.gallery_pane.select_row(0)
    window.action("tag_good").trigger()
    write_cv2(folder / "part_new.png", np.full((30, 40), 250, np.uint8))
    window.stage_tabs.setCurrentWidget(window.tag_panel)
    window.tag_panel.rescan_button.click()
    wait_idle(qtbot, window)
    assert window.gallery_pane.gallery_model.rowCount() == 4
    assert window.statusBar().currentMessage().startswith("4 image files found: 1 added, 3 already in the project")
    assert window.gallery_pane.gallery_model.counts()["good"] == 1

    # Open folder… again: the dialog starts at the folder chosen last; the project is open already, no error.
    window.action("open_project").trigger()
    assert asked_from[-1] == str(folder)
    assert error_texts(window) == [] and window.statusBar().currentMessage().endswith("is open already.")
    assert window.gallery_pane.gallery_model.rowCount() == 4 and not window.busy_runners()


def test_a_folder_that_cannot_be_opened_says_why_and_the_open_project_stays(qtbot, make_window, review_project: Path,
                                                                          tmp_path: Path) -> None:
    window = make_window()
    assert window.open_path(review_project)
    missing = tmp_path / "no such folder"
    assert not window.open_path(missing)
    [text] = error_texts(window)
    assert text == f"{missing}: no such image folder."

    damaged = tmp_path / "damaged" / PROJECT_SUBFOLDER
    damaged.mkdir(parents=True)
    (damaged / "project.sqlite").write_bytes(b"this is no database " * 200)
    assert not window.open_path(damaged.parent)
    [text] = error_texts(window)
    assert str(damaged) in text and "Traceback" not in text and "did not expect" not in text

    assert window.project is not None and window.project.path == review_project
    assert window.gallery_pane.gallery_model.rowCount() > 0


def test_opening_another_project_closes_the_first_its_jobs_and_its_tag_history(qtbot, make_window, review_project: Path,
                                                                               tmp_path: Path) -> None:
    window = make_window()
    assert window.open_path(review_project)
    window.stage_tabs.setCurrentWidget(window.tag_panel)
    window.gallery_pane.select_row(0)
    window.action("untag").trigger()  # the review project comes tagged
    assert window.gallery_pane.tag_stack.count() == 1
    runner = window.make_runner("Endless")
    outcomes: list[str] = []
    runner.finished.connect(outcomes.append)
    assert runner.start(endless_job)

    other = image_folder(tmp_path / "other", 2)
    assert window.open_path(other)
    assert outcomes == ["cancelled"]  # no job outlives the project it writes to
    assert window.gallery_pane.tag_stack.count() == 0  # no undo reaches into the closed project
    with Project.open(review_project):  # the window let go of it: its lock is free
        pass
    wait_idle(qtbot, window)
    assert window.gallery_pane.gallery_model.rowCount() == 2 and "other — defect-studio" in window.windowTitle()

    window.set_project(None)
    assert window.project is None and window.windowTitle() == "defect-studio"
    assert window.gallery_pane.gallery_model.rowCount() == 0 and window.counts_label.text().startswith("0 images")
    assert window.center_stack.currentWidget() is window.empty_hint
    with Project.open(other / PROJECT_SUBFOLDER):
        pass


def test_the_demo_project_is_made_once_and_then_opens_at_once(qtbot, make_window, review_project: Path, monkeypatch) -> None:
    import defect_studio.project.demo_project as demo_project

    real = demo_project.demo_project_job
    made: list[Path] = []

    def small_demo(out_dir, cancel, **_):  # type: ignore[no-untyped-def]
        made.append(out_dir)
        return real(out_dir, cancel, count=12)

    monkeypatch.setattr(demo_project, "demo_project_job", small_demo)
    window = make_window()
    window.action("open_demo").trigger()
    qtbot.waitUntil(lambda: window.project is not None and window.gallery_pane.gallery_model.rowCount() == 12, timeout=60_000)
    demo_dir = demo_project.default_demo_dir() / "project"
    assert window.project.path == demo_dir and window.gallery_pane.gallery_model.counts()["defect"] > 0
    window.action("open_demo").trigger()  # open already: it stays, without an error
    assert window.project.path == demo_dir and error_texts(window) == []

    assert window.open_path(review_project)
    window.action("open_demo").trigger()  # made already: opened without a job
    assert window.project.path == demo_dir and not window.busy_runners()
    assert len(made) == 1


def test_rescan_and_the_demo_wait_while_an_import_runs_and_say_why(qtbot, make_window, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Rescan and Open the demo project start jobs in the import's runner: while an import runs they are
    disabled, and a call that comes anyway (the command line's --demo, say) says in the status bar why
    nothing started, instead of nothing at all."""
    import threading
    import time

    import defect_studio.project.demo_project as demo_project
    import defect_studio.project.importer as importer
    from PySide6.QtCore import Qt

    real_import = importer.import_job
    release = threading.Event()

    def held_import(project, image_dir, labels_csv, cancel):  # type: ignore[no-untyped-def]
        while not release.is_set():
            cancel.raise_if_cancelled()
            time.sleep(0.01)
            yield Progress("wait", 0)
        return (yield from real_import(project, image_dir, labels_csv, cancel))

    demos_made: list[Path] = []
    monkeypatch.setattr(importer, "import_job", held_import)
    monkeypatch.setattr(demo_project, "demo_project_job", lambda out_dir, cancel, **_: demos_made.append(out_dir))
    folder = image_folder(tmp_path / "line 4", 2)
    window = make_window()
    assert window.open_path(folder)  # a new project: its first import runs, held
    window.stage_tabs.setCurrentWidget(window.tag_panel)
    rescan, demo = window.tag_panel.rescan_button, window.action("open_demo")
    assert window.project_flow.import_runner.busy
    assert not rescan.isEnabled() and not demo.isEnabled()
    window.tag_panel.refresh()  # as when the counts change meanwhile: it stays disabled
    assert not rescan.isEnabled()

    window.project_flow.rescan()
    assert window.statusBar().currentMessage() == (
        "“Import images” is still running: import the folder's new images when it has finished.")
    window.project_flow.open_demo()
    assert window.statusBar().currentMessage() == (
        "“Import images” is still running: open the demo project when it has finished.")
    assert demos_made == [] and window.project.path == folder / PROJECT_SUBFOLDER

    release.set()
    wait_idle(qtbot, window)
    assert rescan.isEnabled() and demo.isEnabled()
    assert window.gallery_pane.gallery_model.rowCount() == 2
    write_cv2(folder / "part_new.png", np.full((30, 40), 250, np.uint8))
    qtbot.mouseClick(rescan, Qt.MouseButton.LeftButton)  # enabled again, and it imports
    wait_idle(qtbot, window)
    assert window.gallery_pane.gallery_model.rowCount() == 3 and error_texts(window) == []


def test_the_flow_needs_only_a_session_and_keeps_its_order(qtbot, review_project: Path) -> None:
    """Without a window: the parts that hold the project hear `closing` with its jobs stopped and the project
    still open, `opening` before the session has the next one, `opened` and `closed` after the panels."""
    parent = QWidget()
    session = Session(parent)
    flow = ProjectFlow(session, QSettings(), parent)
    heard: list[str] = []
    flow.opening.connect(lambda project: heard.append(f"opening {project is session.project}"))
    session.project_changed.connect(lambda: heard.append(f"session has {session.project is not None}"))
    flow.opened.connect(lambda project: heard.append(f"opened {project is session.project}"))
    flow.closing.connect(lambda: heard.append(f"closing, jobs {len(session.busy_runners())}, "
                                              f"open {session.project is not None}"))
    flow.closed.connect(lambda: heard.append("closed"))

    assert flow.open_path(review_project)
    assert heard == ["opening False", "session has True", "opened True"]
    heard.clear()
    runner = session.make_runner("Endless")
    assert runner.start(endless_job)
    flow.close_project()
    assert heard == ["closing, jobs 0, open True", "session has False", "closed"]
    with Project.open(review_project):
        pass
    parent.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def test_the_next_image_is_decoded_ahead_and_an_unreadable_one_says_so(qtbot, make_window, tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images", 3)
    window = make_window()
    assert window.open_path(folder)
    wait_idle(qtbot, window)
    ids = [window.gallery_pane.gallery_model.item(row).image_id for row in range(3)]
    window.gallery_pane.select_row(0)
    assert window.current_pixels is not None
    qtbot.waitUntil(lambda: window.image_display.loader.cached(ids[1]) is not None, timeout=10_000)

    unreadable = window.project.image(ids[2]).path
    unreadable.write_bytes(b"no longer a picture")
    window.gallery_pane.select_row(2)
    assert window.current_image_id == ids[2] and window.current_pixels is None
    assert window.viewer.image_shape is None
    assert f"{unreadable.name}: not a readable image" in window.statusBar().currentMessage()
    assert error_texts(window) == []
