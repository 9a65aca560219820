"""The job protocol: long operations are generators of `Progress` events that honour a cancel token.

A job is `def job(..., cancel: CancelToken) -> Generator[Progress, None, Result]`. It checks
`cancel.raise_if_cancelled()` at every step; cancellation raises `JobCancelled` before anything
of the unfinished step is committed, so the previous results stay as they were. The CLI drives a
job with a progress bar, the GUI from a worker thread; neither knows what the job does.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable, Generator, TypeVar

Result = TypeVar("Result")
Job = Generator["Progress", None, Result]


class JobCancelled(Exception):
    """Raised inside a job at the first step after its cancel token was set."""


class CancelToken:
    """Thread-safe flag the user's Cancel button (or Ctrl+C) sets and the job polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise JobCancelled("cancelled by the user")


class ProgressKind(str, Enum):
    """What a progress event is, for code to match on (`stage` and `message` are text for people)."""

    STEP = "step"  # a step of a stage; the default
    EPOCH = "epoch"  # a finished training epoch; its metrics are that epoch's curves
    RESULT = "result"  # a job's closing summary; its metrics are the final ones

    def __str__(self) -> str:
        return self.value


@dataclass
class Progress:
    stage: str
    step: int
    total: int | None = None
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    eta_s: float | None = None
    kind: ProgressKind = ProgressKind.STEP

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.step / self.total)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=float)


class EtaClock:
    """Estimates the remaining time of a stage from the mean time per step so far."""

    def __init__(self, total: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def eta(self, done: int) -> float | None:
        if not self.total or done <= 0:
            return None
        return self.elapsed() / done * max(0, self.total - done)

    def progress(self, stage: str, done: int, message: str = "", metrics: dict[str, Any] | None = None,
                 kind: ProgressKind = ProgressKind.STEP) -> Progress:
        return Progress(stage, done, self.total, message, dict(metrics or {}), self.eta(done), kind)


def run_job(job: Job[Result], on_progress: Callable[[Progress], None] | None = None) -> Result:
    """Drive a job to its end and return its result (raises JobCancelled if it was cancelled)."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)
