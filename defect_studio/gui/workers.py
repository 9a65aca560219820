"""One generic worker: runs any job generator in a QThread and reports back through signals.

Every panel uses `JobRunner`; none of them knows how the thread works. The job's generator is
created *inside* the worker thread (from a factory) so that nothing it builds lingers on the GUI
thread, progress events are forwarded as they come (coalesced when they come faster than the
screen can show them), and the thread is always joined: `JobRunner.shutdown()` cancels and waits.
"""

from __future__ import annotations

import logging
import time
import traceback
import weakref
from typing import Any, Callable, Generator

from PySide6.QtCore import QObject, QThread, Signal

from defect_studio.errors import DefectStudioError
from defect_studio.jobs import CancelToken, JobCancelled, Progress

log = logging.getLogger(__name__)

JobFactory = Callable[[CancelToken], Generator[Progress, None, Any]]

# Progress without metrics is forwarded at most this often; epoch events (with metrics) always are.
_PROGRESS_INTERVAL_S = 0.05


_LIVE_THREADS: "weakref.WeakSet[_JobThread]" = weakref.WeakSet()


def running_job_threads() -> list[QThread]:
    """Job threads still running (tests assert there are none after a window closes)."""
    running = []
    for thread in list(_LIVE_THREADS):
        try:
            if thread.isRunning():
                running.append(thread)
        except RuntimeError:  # the C++ object is gone, so is its thread
            _LIVE_THREADS.discard(thread)
    return running


class _JobThread(QThread):
    progress = Signal(object)  # Progress
    succeeded = Signal(object)  # the job's return value
    cancelled = Signal()
    failed = Signal(object, str)  # the exception, the formatted traceback

    def __init__(self, factory: JobFactory, cancel: CancelToken, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._factory = factory
        self._cancel = cancel
        _LIVE_THREADS.add(self)

    def run(self) -> None:  # noqa: D401 - Qt's name
        last_emit = 0.0
        try:
            job = self._factory(self._cancel)
            while True:
                try:
                    event = next(job)
                except StopIteration as stop:
                    result = stop.value
                    break
                now = time.monotonic()
                final_step = event.total is not None and event.step >= event.total
                if event.metrics or final_step or now - last_emit >= _PROGRESS_INTERVAL_S:
                    last_emit = now
                    self.progress.emit(event)
                # Give the GUI thread the GIL between steps, so a busy job never starves painting.
                self.yieldCurrentThread()
        except JobCancelled:
            self.cancelled.emit()
            return
        except Exception as error:  # reported to the user by the runner, never swallowed
            self.failed.emit(error, traceback.format_exc())
            return
        self.succeeded.emit(result)


class JobRunner(QObject):
    """Starts one job at a time; `busy` while it runs. Emits on the GUI thread.

    `finished(outcome)` comes last in every case: outcome is "succeeded", "cancelled" or "failed".
    """

    started = Signal(str)  # title
    progress = Signal(object)  # Progress
    succeeded = Signal(object)
    cancelled = Signal()
    failed = Signal(object, str)  # exception, traceback text
    finished = Signal(str)

    def __init__(self, title: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self._thread: _JobThread | None = None
        self._cancel: CancelToken | None = None
        self.last_progress: Progress | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, factory: JobFactory, title: str | None = None) -> bool:
        """Run `factory(cancel_token)`'s generator in a worker thread; False if a job is already running."""
        if self._thread is not None:
            return False
        if title:
            self.title = title
        self._cancel = CancelToken()
        self.last_progress = None
        thread = _JobThread(factory, self._cancel)
        thread.progress.connect(self._on_progress)
        thread.succeeded.connect(self._on_succeeded)
        thread.cancelled.connect(self._on_cancelled)
        thread.failed.connect(self._on_failed)
        thread.finished.connect(self._on_thread_finished)
        self._thread = thread
        self._outcome = "failed"
        thread.start()
        self.started.emit(self.title)
        return True

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    def wait(self, timeout_ms: int | None = None) -> bool:
        """Block until the thread ends (used at shutdown and in tests); True if it ended."""
        thread = self._thread
        if thread is None:
            return True
        return thread.wait() if timeout_ms is None else thread.wait(timeout_ms)

    def shutdown(self) -> None:
        """Cancel and join: called when the window closes, so no thread outlives it."""
        self.cancel()
        thread = self._thread
        if thread is not None:
            thread.wait()
            # Deliver the queued signals now so that every listener sees the job end.
            from PySide6.QtCore import QCoreApplication

            QCoreApplication.sendPostedEvents(self)
            QCoreApplication.sendPostedEvents(thread)
            if self._thread is thread:
                self._on_thread_finished()

    # --- slots, all on the GUI thread -------------------------------------------------------
    def _on_progress(self, event: Progress) -> None:
        self.last_progress = event
        self.progress.emit(event)

    def _on_succeeded(self, result: object) -> None:
        self._outcome = "succeeded"
        self.succeeded.emit(result)

    def _on_cancelled(self) -> None:
        self._outcome = "cancelled"
        self.cancelled.emit()

    def _on_failed(self, error: object, details: str) -> None:
        self._outcome = "failed"
        if not isinstance(error, DefectStudioError):
            log.error("job %r failed:\n%s", self.title, details)
        self.failed.emit(error, details)

    def _on_thread_finished(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        self._cancel = None
        thread.deleteLater()
        self.finished.emit(self._outcome)
