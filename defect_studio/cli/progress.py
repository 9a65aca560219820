"""Driving a job from the terminal: a tqdm progress bar with ETA, or JSON lines with --json."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, TypeVar

from defect_studio.jobs import CancelToken, Job, Progress, run_job

Result = TypeVar("Result")


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print progress events as JSON lines (for scripts)")


class _TerminalProgress:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._bar: Any = None
        self._stage: str | None = None

    def __call__(self, event: Progress) -> None:
        if self.as_json:
            print(event.to_json(), flush=True)
            return
        from tqdm import tqdm

        if event.stage != self._stage or self._bar is None:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total, desc=event.stage, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)
        if event.total is not None and self._bar.total != event.total:
            self._bar.total = event.total
        self._bar.n = event.step
        postfix = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in event.metrics.items()}
        if event.message:
            postfix["info"] = event.message[:60]
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def drive(job: Job[Result], args: argparse.Namespace, cancel: CancelToken) -> Result:
    """Run `job` to its end; the first Ctrl+C cancels it cleanly, a second one interrupts at once."""
    display = _TerminalProgress(getattr(args, "json", False))
    previous_handler = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: Any) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        print("\nCancelling at the next step (Ctrl+C again to stop at once)...", file=sys.stderr)
        cancel.cancel()

    try:
        signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread
        previous_handler = None
    try:
        return run_job(job, display)
    finally:
        display.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
