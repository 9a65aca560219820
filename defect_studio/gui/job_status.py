"""The status bar's view of the running jobs: what runs, how far it is, its ETA, and Cancel."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QProgressBar, QPushButton, QStatusBar, QWidget

from defect_studio.gui.panels.common import format_eta
from defect_studio.gui.session import Session
from defect_studio.gui.workers import JobRunner
from defect_studio.jobs import Progress

OUTCOME_WORDS = {"succeeded": "finished", "cancelled": "cancelled; previous results kept", "failed": "failed"}


class JobStatus:
    """Puts a label (stretching) and a progress bar with Cancel (permanent) into `bar`, following every job
    of the session; Cancel cancels them all."""

    def __init__(self, session: Session, bar: QStatusBar, parent: QWidget) -> None:
        self.session = session
        self.label = QLabel("", parent)
        self.label.setObjectName("jobLabel")
        self.progress = QProgressBar(parent)
        self.progress.setObjectName("jobProgress")
        self.progress.setMaximumWidth(180)
        self.progress.setMaximumHeight(14)
        self.progress.setTextVisible(False)
        self.progress.setVisible(False)
        self.cancel = QPushButton("Cancel", parent)
        self.cancel.setObjectName("statusCancel")
        self.cancel.setToolTip("Cancel the running job; the previous results stay as they were")
        self.cancel.setVisible(False)
        self.cancel.clicked.connect(session.cancel_jobs)
        bar.addWidget(self.label, 1)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.cancel)
        session.job_started.connect(self._started)
        session.job_progress.connect(self._progress)
        session.job_finished.connect(self._finished)

    def _started(self, runner: JobRunner) -> None:
        self.label.setText(f"{runner.title}…")
        self.progress.setRange(0, 0)
        self.progress.setVisible(True)
        self.cancel.setVisible(True)

    def _progress(self, runner: JobRunner, event: Progress) -> None:
        text = f"{runner.title}: {event.message or event.stage}"
        if event.total:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * (event.fraction or 0)))
            text += f"  ({event.step}/{event.total})"
        if event.eta_s is not None:
            text += f"  · {format_eta(event.eta_s)} left"
        self.label.setText(text)

    def _finished(self, runner: JobRunner, outcome: str) -> None:
        still_running = self.session.busy_runners()
        if still_running:
            self.label.setText(f"{still_running[0].title}…")
            return
        self.progress.setVisible(False)
        self.cancel.setVisible(False)
        self.label.setText(f"{runner.title} {OUTCOME_WORDS.get(outcome, outcome)}")
