"""The gallery's "Suspect tags" filter: ranks the tags in the background when the models changed,
lists the open suspects most suspect first with their reasons; C confirms (undoable), G / D flip."""

from __future__ import annotations

import json
from pathlib import Path

from defect_studio.project.mislabels import load_queue, queue_path


def test_suspect_filter_ranks_lists_confirms_and_undoes(qtbot, make_window, project_copy: Path) -> None:
    window = make_window()
    assert window.open_path(project_copy)
    project = window.project
    assert load_queue(project) is None
    window.gallery_pane.set_filter("suspect")
    runner = window.gallery_pane.suspects.runner
    qtbot.waitUntil(lambda: not runner.busy, timeout=120_000)
    queue = load_queue(project)
    assert queue is not None and queue["classifier_sha256"] == project.latest_run("classifier").checkpoint_sha256
    assert len(queue["ranked"]) == len([i for i in project.images() if i.tag != "untagged"])
    shown = [window.gallery_pane.gallery_model.item(row).image_id for row in range(window.gallery_pane.gallery_model.rowCount())]
    expected = [e["image_id"] for e in queue["ranked"] if e["suspicion"] >= 0.5]
    assert shown == expected

    # A queue of our own (same classifier: not stale) to drive the rest exactly.
    images = project.images()
    good = [i for i in images if i.tag == "good"][:2]
    defect = [i for i in images if i.tag == "defect"][:1]
    entries = [(good[0], 0.9), (defect[0], 0.8), (good[1], 0.3)]
    queue["ranked"] = [{"image_id": image.id, "stem": image.stem, "tag": image.tag, "suspicion": suspicion,
                        "suggested_tag": "defect" if image.tag == "good" else "good",
                        "reason": f"tagged {image.tag}, but test reason {n}", "evidence": {}}
                       for n, (image, suspicion) in enumerate(entries)]
    queue_path(project).write_text(json.dumps(queue))
    window.gallery_pane.set_filter("all")
    window.gallery_pane.set_filter("suspect")
    assert not runner.busy  # up to date: nothing to compute
    model = window.gallery_pane.gallery_model
    assert [model.item(row).image_id for row in range(model.rowCount())] == [good[0].id, defect[0].id]
    assert "suspect tag #1: tagged good, but test reason 0" in model.data(model.index(0), 3)  # the tooltip
    assert window.current_image_id == good[0].id
    assert "test reason 0" in window.statusBar().currentMessage()

    window.action("confirm_tag").trigger()  # C: keep the tag; the next suspect follows
    assert project.settled_tags() == {good[0].id: "good"} and window.current_image_id == defect[0].id
    window.tag_selected("good")  # G on a defect-tagged suspect: the flip
    assert project.image(defect[0].id).tag == "good"
    window.gallery_pane.set_filter("all")
    window.gallery_pane.set_filter("suspect")
    assert model.rowCount() == 0  # both settled
    window.undo()  # the flip
    window.undo()  # the confirmation
    assert project.image(defect[0].id).tag == "defect" and project.settled_tags() == {}
    window.gallery_pane.set_filter("all")
    window.gallery_pane.set_filter("suspect")
    assert [model.item(row).image_id for row in range(model.rowCount())] == [good[0].id, defect[0].id]
    window.gallery_pane.set_filter("all")


def test_suspect_filter_without_a_classifier_says_so(qtbot, make_window, review_project: Path) -> None:
    window = make_window()
    assert window.open_path(review_project)
    window.gallery_pane.set_filter("suspect")
    assert not window.gallery_pane.suspects.runner.busy and window.gallery_pane.gallery_model.rowCount() == 0
    assert "need a trained classifier" in window.statusBar().currentMessage()
    window.gallery_pane.set_filter("all")
