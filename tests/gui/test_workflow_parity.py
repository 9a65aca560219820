"""One workflow, two faces: the settings chosen in the window are the ones the commands use, and the
same actions through either give the same masks and states."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QLineEdit

from defect_studio.cli import main
from defect_studio.project import Project
from defect_studio.workflow_settings import load_workflow_settings


def _round_masks(project_dir: Path, round_index: int) -> dict[int, tuple[str, str, dict]]:
    with Project.open(project_dir) as project:
        return {r.image_id: (r.sha256, r.state, r.params) for r in project.mask_records(round_index=round_index)}


def test_cam_settings_chosen_in_the_app_make_the_same_masks_through_the_command_line(
        qtbot, make_window, project_copy: Path) -> None:
    before = _round_masks(project_copy, 0)  # the template's round 0: Grad-CAM proposals
    window = make_window()
    assert window.open_path(project_copy)
    cams, review = window.cam_panel, window.review_panel
    window.gallery_pane.select_image(window.project.images("defect")[0].id)

    # CAM tab: FGBP on stage 3 alone (not its default) ...
    window.stage_tabs.setCurrentWidget(cams)
    cams.set_method("fgbp")
    stages = cams.settings_form.findChild(QLineEdit, "cam_stages")
    stages.setText("3")
    stages.editingFinished.emit()
    assert not cams.settings_error.isVisible()
    qtbot.waitUntil(lambda: not cams.runner.busy, timeout=60_000)
    # ... Review tab: proposals from FGBP with other thresholds, made again for round 0.
    window.stage_tabs.setCurrentWidget(review)
    review.method_combo.setCurrentIndex(review.method_combo.findData("fgbp"))
    review.high_spin.setValue(0.6)
    review.low_spin.setValue(0.3)
    with qtbot.waitSignal(review.runner.finished, timeout=90_000) as finished:
        review.propose_button.click()
    assert finished.args == ["succeeded"]
    window.close()

    from_app = _round_masks(project_copy, 0)
    defect_params = [params for _, _, params in from_app.values() if params.get("cam_method")]
    assert defect_params and all(p["cam_method"] == "fgbp" and p["cam_settings"]["stages"] == [3]
                                 and p["settings"]["high"] == 0.6 for p in defect_params)
    assert any(from_app[i][0] != before[i][0] for i in before)  # the choices changed the masks

    # The command line, with no option, proposes round 0 again from the project's settings: the same masks.
    assert main(["pseudo", str(project_copy), "--round", "0"]) == 0
    from_cli = _round_masks(project_copy, 0)
    assert {i: (sha, state) for i, (sha, state, _) in from_cli.items()} == \
        {i: (sha, state) for i, (sha, state, _) in from_app.items()}
    assert all(from_cli[i][2].get("cam_settings") == from_app[i][2].get("cam_settings") for i in from_app)


def test_choices_made_on_the_command_line_show_in_the_app(qtbot, make_window, project_copy: Path) -> None:
    assert main(["cam", str(project_copy), "--method", "layercam", "--set", "stages=2,4"]) == 0
    assert main(["pseudo", str(project_copy), "--round", "0", "--method", "layercam", "--high", "0.7", "--low", "0.2"]) == 0
    with Project.open(project_copy) as project:
        record = load_workflow_settings(project)
        assert record.cam_method == "layercam" and record.cam_settings["layercam"] == {"stages": [2, 4]}
        assert record.pseudo["high"] == 0.7
    window = make_window()
    assert window.open_path(project_copy)
    assert window.review_panel.method_combo.currentData() == "layercam"
    assert window.review_panel.high_spin.value() == 0.7 and window.review_panel.low_spin.value() == 0.2
    window.cam_panel.set_method("layercam")  # (the tab opens on the latest round's method)
    stages = window.cam_panel.settings_form.findChild(QLineEdit, "cam_stages")
    assert stages.text() == "2, 4"
    window.close()
