"""Rounds tab ▸ Models…: the trained models with their provenance; making an earlier round's segmenter
current from the window (and a missing checkpoint refused with a message, nothing changed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from defect_studio.project import Project, RunInput


def _record_segmenters(project_dir: Path) -> list[int]:
    """Two segmenter runs (rounds 0 and 1) with itemised inputs; the files are stand-ins: the dialog
    reads records and hashes, it does not load the networks."""
    ids = []
    with Project.open(project_dir) as project:
        project.create_round({})
        project.models_dir.mkdir(exist_ok=True)
        for round_index in (0, 1):
            path = project.models_dir / f"segmenter-round{round_index}-0.pt"
            path.write_bytes(f"weights {round_index}".encode())
            records = [r for r in project.mask_records(round_index=0)]
            inputs = [RunInput(r.image_id, round_index, "accepted", project.image(r.image_id).sha256, r.sha256)
                      for r in records]
            run = project.record_training_run("segmenter", {"epochs": 1, "seed": 0}, 0, {"best_val_defect_iou": 0.5},
                                              path, [], round_index, provenance={"round": round_index}, inputs=inputs)
            ids.append(run.id)
    return ids


def test_models_dialog_shows_provenance_and_rolls_back(qtbot, make_window, review_project: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFECT_STUDIO_NO_DIALOGS", "1")
    first, second = _record_segmenters(review_project)
    window = make_window()
    assert window.open_path(review_project)
    window.stage_tabs.setCurrentWidget(window.rounds_panel)
    window.rounds_panel.models_button.click()
    dialog = window.rounds_panel.models_dialog
    assert dialog.isVisible() and dialog.table.rowCount() == 2
    assert dialog.table.item(1, 0).text() == "★" and dialog.table.item(0, 0).text() == ""  # the newest is current
    masks = len(window.project.mask_records(round_index=0))
    assert dialog.table.item(0, 4).text().startswith(f"{masks} mask(s) ({masks} accepted)")

    dialog.table.setCurrentCell(0, 1)  # round 0's segmenter
    assert f"run {first}: segmenter, round 0" in dialog.details.toPlainText()
    assert dialog.use_button.isEnabled()
    assert dialog.make_current()
    assert window.project.current_segmenter().id == first and dialog.table.item(0, 0).text() == "★"
    assert window.project.training_run(second).checkpoint_path.is_file()  # later work kept

    # A checkpoint missing from disk: refused, and the current segmenter stays.
    window.project.training_run(second).checkpoint_path.unlink()
    dialog.refresh()
    dialog.table.setCurrentCell(1, 1)
    assert "(missing)" in dialog.table.item(1, 6).text() and not dialog.export_button.isEnabled()
    assert not dialog.make_current()
    assert window.project.current_segmenter().id == first
    dialog.use_newest()
    assert window.project.current_segmenter().id == second and window.project.chosen_segmenter() is None
    dialog.close()
