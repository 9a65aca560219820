"""The ML stages from the window on a tiny trained project: CAM viewer, proposals, a refinement
round, export. (The project is made once per session by the `template_project` fixture.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import QRectF, Qt


def open_project(make_window, path: Path):  # type: ignore[no-untyped-def]
    window = make_window()
    assert window.open_path(path)
    return window


def test_cam_methods_change_the_overlay_and_compare_view_links_zoom(qtbot, make_window, project_copy: Path) -> None:
    window = open_project(make_window, project_copy)
    panel = window.cam_panel
    defect_id = window.project.images("defect")[0].id
    window.gallery_pane.select_image(defect_id)
    window.stage_tabs.setCurrentWidget(panel)
    panel.set_method("gradcam")
    qtbot.waitUntil(lambda: window.viewer.heatmap is not None, timeout=60_000)
    gradcam = window.viewer.heatmap.copy()
    image = window.project.image(defect_id)
    assert gradcam.shape == (image.height, image.width)
    assert window.viewer.heat_item.isVisible()

    # The threshold slider redraws the outline at once.
    panel.threshold_slider.setValue(100)
    high = window.viewer.outline_item.path().elementCount()
    panel.threshold_slider.setValue(5)
    low = window.viewer.outline_item.path().elementCount()
    assert low > 0 and low != high
    panel.opacity_slider.setValue(20)
    assert abs(window.viewer.heat_item.opacity() - 0.2) < 1e-6

    # A method setting (Grad-CAM on stage 3 instead of 4) gives another map, and is remembered.
    from PySide6.QtWidgets import QSpinBox

    stage = panel.settings_form.findChild(QSpinBox, "cam_stage")
    stage.setValue(3)
    stage.editingFinished.emit()
    assert panel.settings_for("gradcam") == {"stage": 3}
    qtbot.waitUntil(lambda: window.viewer.heatmap is not None and not np.array_equal(window.viewer.heatmap, gradcam),
                    timeout=60_000)
    stage.setValue(4)
    stage.editingFinished.emit()
    assert panel.settings_for("gradcam") == {}
    np.testing.assert_allclose(window.viewer.heatmap, gradcam, atol=1e-4)  # back to the cached default map

    panel.set_method("layercam")
    qtbot.waitUntil(lambda: window.viewer.heatmap is not None and not np.array_equal(window.viewer.heatmap, gradcam),
                    timeout=60_000)
    # Going back to Grad-CAM comes from the cache: no job is started.
    panel.set_method("gradcam")
    assert not panel.runner.busy
    np.testing.assert_allclose(window.viewer.heatmap, gradcam, atol=1e-4)

    panel.compare_check.setChecked(True)
    compare = panel.compare_view
    assert window.center_stack.currentWidget() is compare
    qtbot.waitUntil(lambda: all(v.heatmap is not None for v in compare.viewers.values()), timeout=120_000)
    viewers = list(compare.viewers.values())
    viewers[0].view_box.setRange(QRectF(5, 5, 20, 20), padding=0)
    qtbot.wait(50)
    first = viewers[0].view_box.viewRange()
    for other in viewers[1:]:
        # Linked: same centre, same zoom (up to the aspect lock of slightly different view sizes).
        assert abs(np.mean(other.view_box.viewRange()[0]) - np.mean(first[0])) < 0.1
        assert abs(np.mean(other.view_box.viewRange()[1]) - np.mean(first[1])) < 0.1
        assert abs(np.ptp(other.view_box.viewRange()[0]) - np.ptp(first[0])) < 1.0

    # The grid follows the pane's shape: a wide pane puts every map in one row, a tall one in one column.
    compare.resize(1500, 260)
    qtbot.waitUntil(lambda: compare.columns == len(compare.viewers))
    compare.resize(300, 1400)
    qtbot.waitUntil(lambda: compare.columns == 1)

    # Leaving the stage hides the heatmap and goes back to the single viewer.
    window.stage_tabs.setCurrentWidget(window.tag_panel)
    assert window.center_stack.currentWidget() is window.viewer
    assert not window.viewer.heat_item.isVisible()


def test_proposals_round_and_reopen(qtbot, make_window, project_copy: Path) -> None:
    window = open_project(make_window, project_copy)
    review = window.review_panel
    window.stage_tabs.setCurrentWidget(review)
    assert window.current_round == 0
    to_review = review.queue.count()
    assert to_review > 0
    # Make the proposals again from the window (same round; the job runs in the background).
    review.method_combo.setCurrentIndex(review.method_combo.findData("gradcam"))
    with qtbot.waitSignal(review.runner.finished, timeout=120_000) as finished:
        assert review.make_proposals()
    assert finished.args == ["succeeded"]
    assert review.queue.count() == to_review

    # Review: accept two, reject one.
    accepted = []
    for _ in range(2):
        window.gallery_pane.select_image(review.queue.item(0).data(Qt.ItemDataRole.UserRole))
        accepted.append(window.current_image_id)
        review.accept_current()
    window.gallery_pane.select_image(review.queue.item(0).data(Qt.ItemDataRole.UserRole))
    rejected = window.current_image_id
    review.reject_current()
    assert review.queue.count() == to_review - 3

    rounds = window.rounds_panel
    window.stage_tabs.setCurrentWidget(rounds)
    if rounds.form is not None:
        rounds.form.set_values({"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "crop_size": 32})
    with qtbot.waitSignal(rounds.runner.finished, timeout=120_000) as finished:
        assert rounds.run_round()
    assert finished.args == ["succeeded"]
    assert window.current_round == 1
    assert rounds.table.rowCount() == 2
    assert len(rounds.live_points["loss"]) == 1  # one segmenter epoch, plotted as it came
    assert window.project.latest_run("segmenter") is not None
    import os

    # trained with a core left for the GUI thread, as the classifier is
    assert window.project.latest_run("segmenter").config["threads"] == max(1, (os.cpu_count() or 2) - 1)
    assert rounds.table.item(0, 8).text() != "–"  # the segmenter's validation IoU of round 0
    # Accepted masks are carried into round 1 unchanged.
    for image_id in accepted:
        assert window.project.mask_record(image_id, 1).state == "accepted"

    # Export: the files, the parity verdict and the model card in the dialog.
    assert rounds.export_button.isEnabled()
    rounds.open_export_dialog()
    dialog = rounds.export_dialog
    out_dir = project_copy.parent / f"{project_copy.name}-export"
    dialog.folder_edit.setText(str(out_dir))
    with qtbot.waitSignal(dialog.runner.finished, timeout=120_000) as finished:
        assert dialog.start_export()
    assert finished.args == ["succeeded"]
    assert {p.name for p in out_dir.iterdir()} >= {"model.onnx", "model.torchscript.pt", "model-card.json"}
    assert dialog.last_result["parity"]["passed"] is True
    assert "Parity check passed" in dialog.result.toHtml() and "Model card" in dialog.result.toHtml()
    dialog.close()
    window.close()

    again = open_project(make_window, project_copy)
    assert again.current_round == 1
    assert again.project.mask_record(rejected, 0).state == "rejected"
    assert again.rounds_panel.table.rowCount() == 2


def test_compare_grid_columns_fit_the_image_shape() -> None:
    from defect_studio.gui.panels.cam_panel import best_columns

    assert best_columns(5, 1500, 260, 4, 3) == 5  # wide pane
    assert best_columns(5, 300, 1400, 4, 3) == 1  # tall pane
    assert best_columns(4, 800, 600, 4, 3) == 2  # 2 × 2 fills a 4:3 pane exactly
    assert best_columns(5, 600, 800, 4, 3) == 2  # the old fixed 3 columns left half the height empty


def test_cam_tab_opens_on_the_method_the_project_proposes_with(qtbot, make_window, gui_root: Path,
                                                                review_project: Path) -> None:
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.ml.cams import DEFAULT_CAM_METHOD
    from defect_studio.project import Project
    from defect_studio.project.importer import import_job
    from defect_studio.workflow_settings import update_workflow_settings

    # The latest round's method, as the refinement loop reads it.
    path = gui_root / "projects" / "layercam-round"
    with Project.create(path, gui_root / "dataset" / "images") as project:
        run_job(import_job(project, gui_root / "dataset" / "images", None, CancelToken()))
        project.create_round({"cam_method": "layercam"})
    window = open_project(make_window, path)
    assert window.cam_panel.method == "layercam"
    # The user's own choice stays until the project's method changes.
    window.cam_panel.set_method("gradcampp")
    window.notify_masks_changed()
    assert window.cam_panel.method == "gradcampp"
    window.close()

    # No method in the round: the one last chosen for proposals (Review tab, `pseudo --method`).
    with Project.open(review_project) as project:
        update_workflow_settings(project, cam_method="fgbp")
    window = open_project(make_window, review_project)
    assert window.cam_panel.method == "fgbp"
    window.close()

    # A project without rounds: the core's default.
    fresh = gui_root / "projects" / "no-rounds"
    with Project.create(fresh, gui_root / "dataset" / "images") as project:
        run_job(import_job(project, gui_root / "dataset" / "images", None, CancelToken()))
    window = open_project(make_window, fresh)
    assert window.cam_panel.method == DEFAULT_CAM_METHOD


def test_showing_maps_writes_nothing_and_a_bad_stages_list_is_a_message(qtbot, make_window, project_copy: Path,
                                                                         monkeypatch) -> None:
    from PySide6.QtWidgets import QLineEdit

    from defect_studio.ml.cams import default_settings

    window = open_project(make_window, project_copy)
    panel = window.cam_panel
    writes: list[str] = []
    real_set_setting = window.project.set_setting
    monkeypatch.setattr(window.project, "set_setting", lambda key, value: (writes.append(key), real_set_setting(key, value)))
    window.stage_tabs.setCurrentWidget(panel)
    for image in window.project.images("defect")[:3]:
        window.gallery_pane.select_image(image.id)
    panel.threshold_slider.setValue(30)
    panel.set_method("fgbp")
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=60_000)
    assert writes == []  # looking at maps is not a change to save

    stages = panel.settings_form.findChild(QLineEdit, "cam_stages")
    stages.setText("1, x")
    stages.editingFinished.emit()  # no exception: a message beside the form
    assert panel.settings_error.isVisible()
    assert "stages" in panel.settings_error.text() and "x" in panel.settings_error.text()
    for bad in ("1e400", "2.5"):  # an OverflowError, and a stage silently cut to 2, before
        stages.setText(bad)
        stages.editingFinished.emit()
        assert panel.settings_error.isVisible() and "whole stage numbers" in panel.settings_error.text()
    assert writes == [] and panel.settings_for("fgbp") == {}
    wanted = [1, 4] if default_settings("fgbp")["stages"] != [1, 4] else [2, 3]  # not the default
    stages.setText(f"{wanted[1]}, {wanted[0]}")  # the core sorts them
    stages.editingFinished.emit()
    assert not panel.settings_error.isVisible()
    assert writes == ["workflow"] and panel.settings_for("fgbp") == {"stages": wanted}
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=60_000)
