"""The edit-first order in the Review tab: Ctrl+K ranks the queue in the background, the queue lists the
masks in that order with their place, each one's reason shows beside it, A/R go on in the queue's order,
Ctrl+Shift+K switches to image order and back."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt


def _queue(panel) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    return [(panel.queue.item(row).data(Qt.ItemDataRole.UserRole), panel.queue.item(row).text())
            for row in range(panel.queue.count())]


def press(window, name: str, keys: str) -> None:  # type: ignore[no-untyped-def]
    """The window's action `name` carries the shortcut `keys`; trigger it as the key would (key events reach
    the window's shortcuts only while it is the active window, which the offscreen platform does not promise)."""
    from PySide6.QtGui import QKeySequence

    action = window.action(name)
    assert QKeySequence(keys) in action.shortcuts() and action.isEnabled()
    action.trigger()


def test_rank_the_queue_from_the_keyboard_and_review_in_that_order(qtbot, make_window, project_copy: Path) -> None:
    window = make_window()
    assert window.open_path(project_copy)
    panel = window.review_panel
    window.stage_tabs.setCurrentWidget(panel)
    project = window.project
    assert panel.queue.count() == len(project.images("defect"))
    first = panel.queue.item(0).data(Qt.ItemDataRole.UserRole)
    window.gallery_pane.select_image(first)
    qtbot.waitUntil(lambda: window.editor.session is not None and window.editor.session.image_id == first)
    assert "no edit-first order yet" in panel.reason_label.text()
    press(window, "rank_queue", "Ctrl+K")
    qtbot.waitUntil(lambda: bool(project.review_order(0)) and not panel.order_runner.busy, timeout=60_000)
    qtbot.waitUntil(lambda: panel.queue.count() > 0 and panel.queue.item(0).text().lstrip().startswith("1."))
    order = [entry.image_id for entry in project.review_order(0)]
    assert [image_id for image_id, _ in _queue(panel)] == order
    assert panel.queue.item(0).toolTip() == project.review_order(0)[0].reason
    window.gallery_pane.select_image(order[0])
    qtbot.waitUntil(lambda: panel.queue.currentRow() == 0)
    assert panel.reason_label.text().startswith("<b>Why here:</b>") and "group" in panel.reason_label.text()

    # A accepts and goes on to the next mask of the edit-first order, not the next image id.
    press(window, "accept_mask", "A")
    qtbot.waitUntil(lambda: window.session.image_id == order[1])
    assert project.mask_record(order[0], 0).state == "accepted"
    assert [image_id for image_id, _ in _queue(panel)] == order[1:]

    # Image order (Ctrl+Shift+K, or the combo): by image, without places; Ctrl+Shift+K again: edit first.
    press(window, "queue_order", "Ctrl+Shift+K")
    assert panel.order_combo.currentData() == "image"
    ids = [image_id for image_id, _ in _queue(panel)]
    assert ids == sorted(order[1:])
    assert not any(text.lstrip()[:1].isdigit() for _, text in _queue(panel))
    assert "image order" in panel.reason_label.text()
    press(window, "queue_order", "Ctrl+Shift+K")
    assert [image_id for image_id, _ in _queue(panel)] == order[1:]
