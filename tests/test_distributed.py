"""Training on several processes with torch.distributed, for real: torchrun starts 2 CPU workers (gloo)
on the demo project, and the checkpoint they write must be the one a single process writes.

Tolerance. The two runs see the same global batches in the same order, the same learning-rate plan and,
through GlobalBatchNorm2d, the same BatchNorm statistics (those of the global batch); what still differs
is the order of floating-point sums (the gradient all-reduce, BatchNorm sums split over two ranks), which
Adam amplifies a little on near-zero gradients. Measured on this data: |Δ validation loss| 2.4e-5 at the
saved epoch and at most 2.5e-4 over the epochs, |Δ train AUROC| 0.003; one process at 1 and at 2 threads
differs by as much. With per-rank BatchNorm statistics (plain DDP on the CPU) the gaps were 7.2e-3 and
0.08. So: every epoch's validation loss within 2e-3, the train AUROC within 0.02, the validation AUROC
and F1 within one swapped pair of images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from defect_studio.project import Project

TINY = ["--arch", "compact", "--output-stride", "8", "--epochs", "3", "--input-size", "64", "--batch-size", "8",
        "--width", "8", "--threads", "1", "--no-augment", "--max-minutes", "0", "--device", "cpu"]
VAL_LOSS_TOLERANCE = 2e-3
TRAIN_AUROC_TOLERANCE = 0.02
HELPER = Path(__file__).with_name("distributed_unshared_rank.py")


def _torchrun(arguments: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Two workers on this machine; `--standalone` lets the rendezvous pick a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *arguments]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _result_lines(stdout: str) -> list[dict]:
    return [json.loads(line)["result"] for line in stdout.splitlines() if line.startswith('{"result"')]


def _runs(project_dir: Path):  # type: ignore[no-untyped-def]
    with Project.open(project_dir) as project:
        return project.training_runs("classifier")


def _validation_pairs(project_dir: Path) -> int:
    from defect_studio.ml.classifier import plan_project_training
    from defect_studio.ml.models import ClassifierConfig

    with Project.open(project_dir) as project:
        plan = plan_project_training(project, ClassifierConfig(arch="compact"))
    labels = [label for _, label, sha in plan.samples if sha in plan.held_out]
    return labels.count("good") * labels.count("defect")


def test_two_processes_write_one_checkpoint_with_the_metrics_of_one_process(demo_project: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from defect_studio.cli import main
    from defect_studio.ml.classifier import load_classifier

    assert main(["train", str(demo_project), *TINY, "--json"]) == 0
    single = _result_lines(capsys.readouterr().out)[0]
    models = demo_project / "models"
    before = set(models.iterdir())

    completed = _torchrun(["-m", "defect_studio", "train", str(demo_project), *TINY, "--json"], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = _result_lines(completed.stdout)
    assert len(results) == 1, "rank 0 alone reports the result"
    distributed = results[0]
    assert distributed["device"].endswith("2 processes")

    written = set(models.iterdir()) - before
    assert [p.name for p in written] == [Path(distributed["checkpoint"]).name], "exactly one checkpoint, by rank 0"
    assert not list((demo_project / "cache").glob(".distributed-check-*")), "the shared-folder check cleans up"
    single_run, distributed_run = _runs(demo_project)
    assert distributed_run.checkpoint_path == Path(distributed["checkpoint"])
    assert distributed_run.dataset_hashes == single_run.dataset_hashes

    one, two = load_classifier(single["checkpoint"]), load_classifier(distributed["checkpoint"])
    one_pair = 1.0 / _validation_pairs(demo_project)  # one (good, defect) pair ranked the other way
    assert abs(one.metrics["val_loss"] - two.metrics["val_loss"]) <= VAL_LOSS_TOLERANCE
    assert abs(one.metrics["val_auroc"] - two.metrics["val_auroc"]) <= one_pair + 1e-9
    assert abs(one.metrics["train_auroc"] - two.metrics["train_auroc"]) <= TRAIN_AUROC_TOLERANCE
    history_one, history_two = single_run.metrics["history"], distributed_run.metrics["history"]
    assert [e["epoch"] for e in history_one] == [e["epoch"] for e in history_two] == [1, 2, 3]
    for epoch_one, epoch_two in zip(history_one, history_two):
        assert abs(epoch_one["val_loss"] - epoch_two["val_loss"]) <= VAL_LOSS_TOLERANCE, (epoch_one, epoch_two)
        assert epoch_one["lr"] == pytest.approx(epoch_two["lr"], rel=1e-9), "the same steps and schedule"
        assert abs(epoch_one["loss"] - epoch_two["loss"]) <= VAL_LOSS_TOLERANCE, "the training loss is the global batch's"
    assert one.good_prior is not None and two.good_prior is not None


def test_a_rank_that_does_not_see_the_project_folder_is_refused_before_anything_is_written(
    demo_project: Path, tmp_path: Path
) -> None:
    completed = _torchrun([str(HELPER), str(demo_project), "train", str(demo_project), *TINY], cwd=tmp_path)
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "refused before anything was written" in output
    assert "rank 1 on" in output and f"no project folder at {demo_project}" in output
    assert not list((demo_project / "models").glob("*.pt"))
    assert not list((demo_project / "cache").glob(".distributed-check-*"))
    assert _runs(demo_project) == []
    with Project.open(demo_project) as project:
        assert project.get_setting("classifier_validation_seed", None) is None, "not even the validation seed"


def test_nproc_runs_the_same_command_under_torchrun(demo_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from defect_studio.cli import main

    launched: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        launched.append(command)
        return subprocess.CompletedProcess(command, 7)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert main(["train", str(demo_project), "--nproc", "3", "--epochs", "2", "--no-augment", "--json"]) == 7
    (command,) = launched
    assert command[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=3" in command
    worker = command[command.index("defect_studio") + 1 :]
    assert worker[:2] == ["train", str(demo_project.absolute())]
    assert "--nproc" not in worker, "the workers must not launch again"
    assert worker[worker.index("--epochs") + 1] == "2" and "--no-augment" in worker and "--json" in worker


def test_a_global_batch_that_does_not_split_over_the_ranks_is_a_clear_error(demo_dataset: Path, tmp_path: Path) -> None:
    from defect_studio.errors import DataError
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.ml.classifier import train_classifier_job
    from defect_studio.ml.distributed import Ranks
    from defect_studio.ml.models import ClassifierConfig

    samples = [(demo_dataset / "images" / "a.png", "good", "a"), (demo_dataset / "images" / "b.png", "defect", "b")]
    config = ClassifierConfig(arch="compact", batch_size=8)
    with pytest.raises(DataError, match="multiple of 3"):
        run_job(train_classifier_job(samples, config, tmp_path / "c.pt", CancelToken(), "cpu", ranks=Ranks(rank=0, world_size=3)))
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [2, 9, 16, 90])
def test_the_ranks_parts_make_up_the_single_process_batches(world_size: int, length: int) -> None:
    import numpy as np

    from defect_studio.ml.classifier import _global_batches
    from defect_studio.ml.distributed import Ranks

    order = np.random.default_rng(length).permutation(length)
    batch_size = 4 * world_size
    single = [index for index, _, _ in _global_batches(order, batch_size, Ranks.single())]
    per_rank = [list(_global_batches(order, batch_size, Ranks(rank, world_size))) for rank in range(world_size)]
    assert all(len(steps) == len(single) for steps in per_rank), "every rank takes the same number of steps"
    for step, expected in enumerate(single):
        parts = [per_rank[rank][step][1] for rank in range(world_size)]
        global_index, _, distinct = per_rank[0][step]
        assert distinct == len(expected)
        assert (global_index[:distinct] == expected).all(), "the global batch is the single process's batch"
        assert len({len(part) for part in parts}) == 1, "equal parts: DDP's mean of means is the global mean"
        assert sorted(np.concatenate(parts)) == sorted(global_index)
        for rank, part in enumerate(parts):
            assert (part == global_index[rank::world_size]).all()


def test_every_rank_gathers_every_shard_in_order(tmp_path: Path) -> None:
    completed = _torchrun([str(Path(__file__).with_name("distributed_gather_check.py"))], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "rank 0: gathered in order" in completed.stdout and "rank 1: gathered in order" in completed.stdout
