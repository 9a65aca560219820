"""GUI test fixtures: offscreen Qt, QSettings and the log in a temporary folder per test, a tiny
demo dataset shared by the session, and checks that no window or thread outlives a test."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("pytestqt")  # a test extra; PySide6 is a dependency, imported plainly below

from PySide6.QtCore import QCoreApplication, QSettings, QThreadPool  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

DEMO_COUNT = 24
DEMO_SIZE = 64


@pytest.fixture(autouse=True, scope="session")
def training_engine_loaded() -> None:
    """As the app does under its splash: the jobs' modules imported on the GUI thread before any worker runs."""
    from defect_studio.gui.app import load_training_engine

    load_training_engine()


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from defect_studio.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "dataset", count=DEMO_COUNT, size=DEMO_SIZE, seed=0)


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qapp: QApplication) -> Iterator[Path]:
    """QSettings, the log file and the home folder (demo project) all under this test's tmp dir."""
    from defect_studio.gui.app import configure_application
    from defect_studio.gui.dialogs import remove_log_file_handler

    settings_dir = tmp_path / "qsettings"
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(settings_dir))
    monkeypatch.setenv("DEFECT_STUDIO_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    configure_application(qapp)
    QCoreApplication.setApplicationName("defect-studio-test")
    yield settings_dir
    remove_log_file_handler()


@pytest.fixture(autouse=True)
def no_leaks(qapp: QApplication) -> Iterator[None]:
    """Every window a test opens is closed, and every worker thread joined, by the end of it."""
    from defect_studio.gui.workers import running_job_threads

    before = {id(widget) for widget in qapp.topLevelWidgets() if widget.isVisible()}
    yield
    QCoreApplication.processEvents()
    leaked_windows = [w for w in qapp.topLevelWidgets() if w.isVisible() and id(w) not in before]
    for widget in leaked_windows:
        widget.close()
    assert not running_job_threads(), "a job thread is still running after the test"
    assert QThreadPool.globalInstance().activeThreadCount() == 0
    assert not leaked_windows, f"windows left open: {[w.objectName() or type(w).__name__ for w in leaked_windows]}"


# The compact network: the window's jobs load the template's classifier in worker threads many times over,
# and a tiny network keeps that fast (the Train-tab tests train the default EfficientNet themselves).
TINY_CLASSIFIER = {"arch": "compact", "output_stride": 8, "epochs": 2, "min_epochs": 1, "input_size": 64, "batch_size": 8,
                   "width": 8, "patience": 5, "augment": False, "threads": 1}


@pytest.fixture(scope="session")
def gui_root(tmp_path_factory: pytest.TempPathFactory, demo_dataset: Path) -> Path:
    """<root>/dataset (the demo images) and <root>/projects/<name>: copies of a project keep working
    because the image folder's path relative to every project folder is the same."""
    return demo_dataset.parent


@pytest.fixture(scope="session")
def template_project(gui_root: Path) -> Path:
    """A project of the demo images, tagged, with a tiny classifier and round-0 proposals (made once)."""
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.ml.models import ClassifierConfig
    from defect_studio.ml.pseudo import pseudo_job
    from defect_studio.project import Project
    from defect_studio.project.importer import import_job

    path = gui_root / "projects" / "template"
    dataset = gui_root / "dataset"
    with Project.create(path, dataset / "images") as project:
        run_job(import_job(project, dataset / "images", dataset / "labels.csv", CancelToken()))
        config = ClassifierConfig(**TINY_CLASSIFIER)
        run_job(train_project_classifier_job(project, config, CancelToken(), device="cpu"))
        project.create_round({"cam_method": "gradcam"})
        run_job(pseudo_job(project, 0, "gradcam", {"high": 0.5, "low": 0.25, "min_area": 4}, CancelToken()))
    return path


@pytest.fixture
def project_copy(template_project: Path, request: pytest.FixtureRequest) -> Path:
    """A private copy of the template project for one test."""
    import shutil
    import uuid

    target = template_project.parent / f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(template_project, target, ignore=shutil.ignore_patterns("project.lock"))
    return target


@pytest.fixture
def make_window(qtbot):  # type: ignore[no-untyped-def]
    """Factory of main windows; each is closed (threads joined, project released) at the end."""
    from defect_studio.gui.main_window import MainWindow

    windows = []

    def make() -> "MainWindow":
        window = MainWindow(QSettings())
        window.show()
        qtbot.waitExposed(window)
        window.activateWindow()
        windows.append(window)
        return window

    yield make
    from PySide6.QtCore import QEvent

    for window in windows:
        window.close()
        window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


@pytest.fixture
def review_project(gui_root: Path, tmp_path: Path) -> Path:
    """A tagged project with a round 0 whose proposals are the demo's own masks (no ML needed)."""
    import uuid

    from defect_studio.imageio import read_mask
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.project import Project
    from defect_studio.project.importer import import_job

    dataset = gui_root / "dataset"
    path = gui_root / "projects" / f"review-{uuid.uuid4().hex[:8]}"
    with Project.create(path, dataset / "images") as project:
        run_job(import_job(project, dataset / "images", dataset / "labels.csv", CancelToken()))
        project.create_round({"source": "test: demo masks"})
        for image in project.images("defect"):
            mask_file = dataset / "masks" / f"{image.stem}.png"
            mask = read_mask(mask_file, (image.height, image.width))
            project.save_mask_proposal(image.id, 0, mask, "test:demo-mask", {})
    return path
