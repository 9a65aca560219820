"""The real window, offscreen: create a project from a folder, tag by keys, undo, filters, reopen."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QMessageBox, QTextBrowser


def wait_idle(qtbot, window, timeout=60_000) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: not window.busy_runners(), timeout=timeout)


def test_create_from_folder_tag_by_keys_undo_and_reopen(qtbot, make_window, gui_root: Path, tmp_path: Path) -> None:
    window = make_window()
    images = gui_root / "dataset" / "images"
    project_dir = gui_root / "projects" / f"tagging-{tmp_path.name}"
    assert window.create_project(images, project_dir)
    wait_idle(qtbot, window)
    image_count = len(list(images.iterdir()))
    assert window.gallery_pane.gallery_model.rowCount() == image_count
    assert window.gallery_pane.gallery_model.counts()["untagged"] == image_count  # the demo images have no tag folders

    window.stage_tabs.setCurrentWidget(window.tag_panel)
    window.gallery_pane.gallery.setFocus()
    window.gallery_pane.select_row(0)
    first = window.current_image_id
    qtbot.keyClick(window.gallery_pane.gallery, Qt.Key.Key_G)
    assert window.project.image(first).tag == "good"
    second = window.current_image_id
    assert second != first  # tagging moves on to the next image
    qtbot.keyClick(window.gallery_pane.gallery, Qt.Key.Key_D)
    assert window.project.image(second).tag == "defect"
    qtbot.keyClick(window.gallery_pane.gallery, Qt.Key.Key_K)  # back to the second image
    assert window.current_image_id == second
    qtbot.keyClick(window.gallery_pane.gallery, Qt.Key.Key_J)
    third = window.current_image_id
    assert third not in (first, second)
    qtbot.keyClick(window.gallery_pane.gallery, Qt.Key.Key_Left)
    assert window.current_image_id == second
    qtbot.keyClick(window.gallery_pane.gallery, Qt.Key.Key_Right)
    assert window.current_image_id == third

    # Undo / redo of tag changes go to the database at once.
    qtbot.keyClick(window.gallery_pane.gallery, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert window.project.image(second).tag == "untagged"
    qtbot.keyClick(window.gallery_pane.gallery, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert window.project.image(second).tag == "defect"

    # Bulk tagging of a multi-selection.
    selection = window.gallery_pane.gallery.selectionModel()
    from PySide6.QtCore import QItemSelection, QItemSelectionModel

    rows = QItemSelection(window.gallery_pane.gallery_model.index(4), window.gallery_pane.gallery_model.index(7))
    selection.select(rows, QItemSelectionModel.SelectionFlag.ClearAndSelect)
    bulk_ids = window.gallery_pane.selected_image_ids()
    assert len(bulk_ids) == 4
    window.action("tag_defect").trigger()
    assert all(window.project.image(i).tag == "defect" for i in bulk_ids)
    window.undo()
    assert all(window.project.image(i).tag == "untagged" for i in bulk_ids)
    window.redo()

    window.gallery_pane.set_filter("good")
    assert window.gallery_pane.gallery_model.rowCount() == 1
    window.gallery_pane.set_filter("defect")
    assert window.gallery_pane.gallery_model.rowCount() == 5
    window.gallery_pane.set_filter("all")
    assert "1 good" in window.counts_label.text()

    # Thumbnails land in the project's cache.
    qtbot.waitUntil(lambda: any((window.project.cache_dir / "thumbs").glob("*.png")), timeout=20_000)
    window.close()

    # Reopen: tags, filter and the project are as left; QSettings remembers the project.
    assert QSettings().value("project/last") == str(project_dir)
    again = make_window()
    assert again.open_path(project_dir)
    assert again.gallery_pane.gallery_model.counts()["defect"] == 5
    assert again.gallery_pane.gallery_model.counts()["good"] == 1


def test_shortcut_sheet_lists_every_shortcut(qtbot, make_window) -> None:
    from defect_studio.gui.shortcuts import SHORTCUTS, markdown_table

    window = make_window()
    window.action("shortcut_sheet").trigger()
    dialog = window.shortcut_dialog
    html = dialog.findChildren(QTextBrowser)[0].toPlainText()
    table = markdown_table()
    for entry in SHORTCUTS:
        assert entry.description in html
        assert entry.description in table
        for key in entry.keys:
            assert QKeySequence(key) in window.action(entry.action).shortcuts()
    dialog.close()


def test_second_window_on_the_same_project_gets_a_clear_message(qtbot, make_window, review_project: Path) -> None:
    first = make_window()
    assert first.open_path(review_project)
    second = make_window()
    assert not second.open_path(review_project)
    boxes = [w for w in second.findChildren(QMessageBox) if w.objectName() == "errorDialog"]
    assert boxes and "process" in boxes[0].text()
    for box in boxes:
        box.close()


def test_reopening_after_a_crash_says_the_stale_lock_was_taken_over(qtbot, make_window, review_project: Path) -> None:
    import subprocess
    import sys

    script = f"import os\nfrom defect_studio.project import Project\nProject.open({str(review_project)!r})\nos.kill(os.getpid(), 9)\n"
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    window = make_window()
    assert window.open_path(review_project)
    message = window.statusBar().currentMessage()
    assert "left locked by process" in message and "Everything it saved is here" in message
