from __future__ import annotations

import json

import pytest

from defect_studio.jobs import CancelToken, EtaClock, JobCancelled, Progress, run_job


def counting_job(steps: int, cancel: CancelToken, committed: list[int]):
    clock = EtaClock(steps)
    for step in range(1, steps + 1):
        cancel.raise_if_cancelled()
        committed.append(step)
        yield clock.progress("count", step, f"step {step}", {"value": float(step)})
    return sum(committed)


def test_a_job_runs_to_its_result_with_progress_events():
    events: list[Progress] = []
    assert run_job(counting_job(4, CancelToken(), []), events.append) == 10
    assert [e.step for e in events] == [1, 2, 3, 4] and events[-1].fraction == 1.0
    assert events[-1].eta_s == 0.0 and json.loads(events[0].to_json())["metrics"] == {"value": 1.0}


def test_cancel_stops_at_the_next_step_and_keeps_what_was_committed():
    cancel, committed = CancelToken(), []

    def on_progress(event: Progress) -> None:
        if event.step == 2:
            cancel.cancel()

    with pytest.raises(JobCancelled):
        run_job(counting_job(10, cancel, committed), on_progress)
    assert committed == [1, 2]


def test_eta_uses_the_mean_time_per_step():
    now = [100.0]
    clock = EtaClock(10, clock=lambda: now[0])
    now[0] = 104.0
    assert clock.eta(2) == pytest.approx(16.0)
    assert EtaClock(None).eta(3) is None
