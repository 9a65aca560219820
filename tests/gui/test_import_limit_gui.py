"""The import limit in the Tag stage: an image over it is skipped and listed; raising it brings the image in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defect_studio.project import Project
from defect_studio.project.importer import import_pixel_limit
from tests.image_files import write_cv2


def test_raising_the_limit_in_the_tag_stage_imports_the_skipped_image(qtbot, make_window, tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_cv2(images / "small.png", np.full((40, 50), 90, np.uint8))
    window = make_window()
    project_dir = tmp_path / "project"
    assert window.create_project(images, project_dir)
    qtbot.waitUntil(lambda: not window.busy_runners(), timeout=60_000)
    window.stage_tabs.setCurrentWidget(window.tag_panel)
    spin = window.tag_panel.import_limit
    assert spin.isEnabled() and spin.value() == 300.0  # the project's default

    spin.setValue(0.1)  # 400 × 300 = 0.12 MP is now over the limit
    assert import_pixel_limit(window.project) == 100_000
    write_cv2(images / "big.png", np.full((300, 400), 120, np.uint8))
    window.tag_panel.rescan_button.click()
    qtbot.waitUntil(lambda: not window.busy_runners(), timeout=60_000)
    assert [i.stem for i in window.project.images()] == ["small"]
    assert "1 skipped" in window.statusBar().currentMessage()

    spin.setValue(0.2)
    window.tag_panel.rescan_button.click()
    qtbot.waitUntil(lambda: not window.busy_runners(), timeout=60_000)
    assert sorted(i.stem for i in window.project.images()) == ["big", "small"]
    assert window.gallery_pane.gallery_model.rowCount() == 2
    window.close()

    with Project.open(project_dir) as project:  # remembered by the project, as the CLI's --max-megapixels is
        assert import_pixel_limit(project) == 200_000
