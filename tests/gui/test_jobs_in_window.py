"""Jobs from the window: classifier training with live curves, cancel, and error reporting."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtWidgets import QMessageBox

from defect_studio.errors import DataError
from defect_studio.gui.workers import JobRunner
from defect_studio.jobs import Progress

TINY = {"epochs": 2, "min_epochs": 1, "input_size": 64, "batch_size": 8, "width": 8, "patience": 5, "augment": False}


def test_train_classifier_updates_curves_and_records_a_run(qtbot, make_window, review_project: Path) -> None:
    window = make_window()
    assert window.open_path(review_project)
    panel = window.train_panel
    window.stage_tabs.setCurrentWidget(panel)
    assert panel.train_button.isEnabled()
    panel.form.set_values(TINY)
    seen: list[Progress] = []
    panel.runner.progress.connect(seen.append)
    with qtbot.waitSignal(panel.runner.finished, timeout=90_000) as finished:
        panel.train_button.click()
        assert not panel.train_button.isEnabled()  # one training at a time
    assert finished.args == ["succeeded"]
    assert panel.point_count("loss") == 2 and panel.point_count("val_auroc") == 2
    xs, ys = panel.curves["loss"].getData()
    assert list(xs) == [1.0, 2.0] and all(y > 0 for y in ys)
    assert any(event.eta_s is not None for event in seen)
    run = window.project.latest_run("classifier")
    assert run is not None and run.config["epochs"] == 2
    assert "Latest classifier" in panel.result_label.text()
    assert panel.train_button.isEnabled()
    # The settings are remembered in the project.
    from defect_studio.workflow_settings import load_workflow_settings

    assert load_workflow_settings(window.project).classifier["epochs"] == 2


def test_cancel_training_keeps_the_previous_state(qtbot, make_window, review_project: Path) -> None:
    window = make_window()
    assert window.open_path(review_project)
    panel = window.train_panel
    panel.form.set_values({**TINY, "epochs": 200, "min_epochs": 200})
    with qtbot.waitSignal(panel.runner.progress, timeout=60_000):
        panel.start_training()
    with qtbot.waitSignal(panel.runner.finished, timeout=60_000) as finished:
        panel.job_row.cancel_button.click()
    assert finished.args == ["cancelled"]
    assert window.project.latest_run("classifier") is None
    assert not list(window.project.models_dir.glob("*.pt"))
    assert "cancelled" in window.job_label.text()


def _failing_job(cancel, error):  # type: ignore[no-untyped-def]
    yield Progress("work", 1, 2, "half way")
    raise error


@pytest.mark.parametrize("error, unexpected", [(DataError("only one class is tagged"), False), (ZeroDivisionError("boom"), True)])
def test_job_errors_show_a_dialog_and_unexpected_ones_are_logged(qtbot, make_window, tmp_path: Path, error, unexpected) -> None:
    from defect_studio.gui.dialogs import install_log_file, log_file

    install_log_file()
    window = make_window()
    runner = window.make_runner("Test job")
    with qtbot.waitSignal(runner.finished, timeout=10_000) as finished:
        runner.start(lambda cancel: _failing_job(cancel, error))
    assert finished.args == ["failed"]
    boxes = [box for box in window.findChildren(QMessageBox) if box.objectName() == "errorDialog" and box.isVisible()]
    assert len(boxes) == 1
    text = boxes[0].text()
    assert "Traceback" not in text
    if unexpected:
        assert str(log_file()) in text
        assert "ZeroDivisionError" in log_file().read_text(encoding="utf-8")
        assert "Traceback" in log_file().read_text(encoding="utf-8")
    else:
        assert text == "only one class is tagged"
    boxes[0].close()


def test_runner_joins_its_thread_on_shutdown(qtbot) -> None:
    import threading

    from defect_studio.gui.workers import running_job_threads

    release = threading.Event()

    def slow_job(cancel):  # type: ignore[no-untyped-def]
        while not release.wait(0.01):
            cancel.raise_if_cancelled()
            yield Progress("wait", 0)
        return "never"

    runner = JobRunner("slow")
    outcomes: list[str] = []
    runner.finished.connect(outcomes.append)
    assert runner.start(slow_job)
    assert not runner.start(slow_job)  # one job at a time per runner
    runner.shutdown()
    assert outcomes == ["cancelled"]
    assert not runner.busy and not running_job_threads()
