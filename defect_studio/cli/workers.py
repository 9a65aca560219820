"""Commands on several processes (torch.distributed): `--nproc N` relaunches the same command under torchrun,
and each torchrun worker runs its rank of it.

The segmentation commands (`refine`, `next-round`) follow one rule: rank 0 opens the project and runs the
command's job as one process would; whenever the job trains a segmenter the other ranks train with it
(ml/segmenter.py `follow_segmenter_training`); they never open the project, and they end when rank 0 says
the command ended.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
from typing import Any, Callable, Sequence

from defect_studio.errors import DefectStudioError
from defect_studio.jobs import CancelToken, Job, JobCancelled, run_job


def launch_workers(nproc: int, module_arguments: Sequence[str]) -> int:
    """`python -m defect_studio <module_arguments>` under torchrun with `nproc` workers on this machine;
    the exit code is torchrun's, or the cancel code after a Ctrl+C."""
    from defect_studio.cli import EXIT_CANCELLED
    from defect_studio.ml.distributed import torchrun_command

    # Ctrl+C reaches the workers directly (the terminal signals the whole process group) and they cancel
    # cleanly; this launcher waits for them instead of leaving first. (A Python handler, unlike SIG_IGN,
    # is not inherited by the children.)
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        code = subprocess.run(torchrun_command(nproc, module_arguments), check=False).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    # torchrun exits with 1 whatever ended its workers; a Ctrl+C ends the command as a cancel does.
    return EXIT_CANCELLED if interrupted and code != 0 else code


def without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line `argv` without its `--nproc N` (what each torchrun worker runs)."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept


def run_quietly(job: Job[Any], cancel: CancelToken) -> Any:
    """A rank other than 0: no progress display (rank 0 shows the run); Ctrl+C cancels like on rank 0."""

    def on_interrupt(signum: int, frame: object) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()

    signal.signal(signal.SIGINT, on_interrupt)
    return run_job(job)


def run_segmenter_ranks(args: argparse.Namespace, run_on_rank0: Callable[[Any, CancelToken], Any]) -> Any:
    """This process's rank of a distributed segmentation command. `run_on_rank0(ranks, cancel)` opens the
    project and drives the command's job (passing `ranks` down to its segmenter training); its result is
    returned on rank 0. The other ranks follow the trainings and return None (rank 0 reports)."""
    from defect_studio.cli import EXIT_CANCELLED
    from defect_studio.ml.distributed import process_group
    from defect_studio.ml.segmenter import follow_segmenter_training

    cancel = CancelToken()
    with process_group(args.device or "auto") as (ranks, _):
        if not ranks.is_writer:
            ended_with = run_quietly(follow_segmenter_training(ranks, cancel), cancel)
            if isinstance(ended_with, JobCancelled):
                raise SystemExit(EXIT_CANCELLED)
            if isinstance(ended_with, DefectStudioError):
                raise SystemExit(ended_with.exit_code)  # rank 0 says why
            return None
        try:
            result = run_on_rank0(ranks, cancel)
        except (DefectStudioError, JobCancelled) as error:
            # The other ranks wait for the next training or the end (a cancel stops every rank together).
            ranks.from_rank0(error)
            raise
        ranks.from_rank0(None)
        return result
