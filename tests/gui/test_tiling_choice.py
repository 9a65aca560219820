"""The classifier's tiling, one setting for both faces: what `defect-studio train --tiling/--tile-size/--overlap`
keeps in the project shows in the Train tab, and the tab's training uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from defect_studio.project import Project
from defect_studio.workflow_settings import update_workflow_settings


def test_a_tiling_kept_by_the_command_line_is_the_one_the_train_tab_uses(
    qtbot, make_window, project_copy: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with Project.open(project_copy) as project:  # what `train --tiling tiles --tile-size 64 --overlap 16` keeps
        update_workflow_settings(project, classifier={"tiling": "tiles", "tile_size": 64, "tile_overlap": 16})
    configs = []

    def recording_job(project, config, cancel, device="auto"):  # type: ignore[no-untyped-def]
        configs.append(config)
        return None
        yield  # a generator, as the job is

    monkeypatch.setattr("defect_studio.ml.classifier.train_project_classifier_job", recording_job)
    window = make_window()
    assert window.open_path(project_copy)
    panel = window.train_panel
    panel.refresh()
    assert panel.form.combos["tiling"].currentText() == "tiles"
    assert panel.start_training()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=10_000)
    assert [(c.tiling, c.tile_size, c.tile_overlap) for c in configs] == [("tiles", 64, 16)]
