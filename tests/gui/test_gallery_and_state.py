"""Gallery virtualisation, window state in QSettings, the first-run offer, closing keeps edits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import QApplication, QMessageBox, QPushButton

from defect_studio.gui.gallery import GalleryItem, GalleryModel, GalleryView, ThumbnailCache


def test_ten_thousand_images_only_visible_thumbnails_are_made(qtbot, tmp_path: Path) -> None:
    source = tmp_path / "one.png"
    import cv2

    cv2.imwrite(str(source), (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8))
    items = [GalleryItem(i, f"image_{i:05d}", source.parent, source.name, f"{i:064x}", "untagged") for i in range(10_000)]
    model = GalleryModel()
    cache = ThumbnailCache(tmp_path / "thumbs")
    view = GalleryView()
    qtbot.addWidget(view)
    view.setModel(model)
    view.resize(400, 600)
    model.set_items(items, cache)
    view.show()
    qtbot.waitExposed(view)
    qtbot.waitUntil(lambda: len(cache._images) > 0, timeout=20_000)
    qtbot.waitUntil(cache.is_idle, timeout=20_000)
    requested = len(cache._images) + len(cache._failed)
    assert 0 < requested < 100, f"{requested} thumbnails made for a view showing a few dozen"
    assert len(list((tmp_path / "thumbs").glob("*.png"))) == requested  # cached on disk
    # The layout is done in batches; keep scrolling to the end until the last row is shown.
    qtbot.waitUntil(lambda: (view.scrollToBottom(), cache._images.get(9_999))[1] is not None, timeout=30_000)
    cache.shutdown()
    view.close()


def test_window_state_is_restored_from_qsettings(qtbot, make_window, isolated_settings: Path) -> None:
    first = make_window()
    first.stage_tabs.setCurrentWidget(first.rounds_panel)
    first.resize(790, 640)
    first.close()
    assert (isolated_settings).exists()  # written into this test's own folder, not the user's
    second = make_window()
    assert second.stage_tabs.currentWidget() is second.rounds_panel
    assert (second.width(), second.height()) == (790, 640)


def test_first_run_offers_the_demo_project(qtbot, make_window, monkeypatch) -> None:
    import defect_studio.project.demo_project as demo_project
    from defect_studio.gui.app import offer_demo

    real = demo_project.demo_project_job  # the core's demo job, which the window runs in the background
    monkeypatch.setattr(demo_project, "demo_project_job", lambda out_dir, cancel, **_: real(out_dir, cancel, count=12))
    window = make_window()
    offer_demo(window)
    box = next(w for w in QApplication.topLevelWidgets() if isinstance(w, QMessageBox) and w.isVisible())
    demo_button = next(b for b in box.findChildren(QPushButton) if b.text() == "Create the demo project")
    demo_button.click()
    qtbot.waitUntil(lambda: window.project is not None and window.gallery_pane.gallery_model.rowCount() == 12, timeout=60_000)
    assert window.gallery_pane.gallery_model.counts()["defect"] > 0  # the demo comes tagged


def test_closing_the_window_mid_edit_keeps_the_edit(qtbot, make_window, review_project: Path) -> None:
    window = make_window()
    assert window.open_path(review_project)
    window.stage_tabs.setCurrentWidget(window.review_panel)
    image_id = window.review_panel.queue.item(0).data(Qt.ItemDataRole.UserRole)
    window.gallery_pane.select_image(image_id)
    window.editor.clear()  # an edit, not yet autosaved
    window.close()
    from defect_studio.project import Project

    with Project.open(review_project) as project:
        record = project.mask_record(image_id, 0)
        assert record.state == "edited"
        assert not project.load_mask(record).any()
    assert QSettings().value("project/last") == str(review_project)


def test_export_result_shows_parity_verdict_and_model_card(tmp_path: Path) -> None:
    import json

    from defect_studio.gui.panels.export_dialog import describe_export

    (tmp_path / "model-card.json").write_text(json.dumps({"name": "segmenter", "threshold": 0.4}), encoding="utf-8")
    passed = describe_export({"out_dir": str(tmp_path), "parity": {"passed": True, "onnx_max_abs_diff": 1e-6}}, tmp_path)
    assert "passed" in passed and "segmenter" in passed and "onnx max abs diff" in passed
    failed = describe_export({"out_dir": str(tmp_path), "parity": {"passed": False}}, tmp_path)
    assert "failed" in failed


def test_run_app_opens_the_given_project_and_returns_zero(qtbot, review_project: Path) -> None:
    from PySide6.QtCore import QTimer

    from defect_studio.gui.app import run_app
    from defect_studio.gui.dialogs import log_file
    from defect_studio.gui.main_window import MainWindow

    seen: dict[str, object] = {}

    def close_when_open() -> None:
        windows = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if windows and windows[0].project is not None:
            seen["images"] = windows[0].gallery_pane.gallery_model.rowCount()
            seen["splash visible"] = any(w.objectName() == "startupSplash" and w.isVisible()
                                         for w in QApplication.topLevelWidgets())
            windows[0].close()
        else:
            QTimer.singleShot(50, close_when_open)

    QTimer.singleShot(50, close_when_open)
    assert run_app(review_project) == 0
    from defect_studio.project import Project

    with Project.open(review_project) as project:
        assert seen["images"] == len(project.images()) > 0
    assert seen["splash visible"] is False  # the start-up splash closes once the window is up
    assert QSettings().value("project/last") == str(review_project)
    assert log_file().parent.exists()


def test_large_images_decode_in_the_background(qtbot, make_window, tmp_path: Path) -> None:
    import cv2

    from defect_studio.gui.image_display import SYNC_DECODE_PIXELS

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    cv2.imwrite(str(folder / "a_small.png"), (rng.random((64, 80)) * 255).astype(np.uint8))
    side = int(SYNC_DECODE_PIXELS ** 0.5) + 64
    cv2.imwrite(str(folder / "b_large.png"), (rng.random((side, side)) * 255).astype(np.uint8))
    window = make_window()
    assert window.create_project(folder, tmp_path / "project")
    qtbot.waitUntil(lambda: window.gallery_pane.gallery_model.rowCount() == 2, timeout=30_000)
    window.gallery_pane.select_row(0)
    assert window.current_pixels is not None and window.current_pixels.shape == (64, 80)  # small: at once
    window.gallery_pane.select_row(1)
    qtbot.waitUntil(lambda: window.current_pixels is not None, timeout=30_000)
    assert window.current_pixels.shape == (side, side)
    assert window.viewer.image_shape == (side, side)
