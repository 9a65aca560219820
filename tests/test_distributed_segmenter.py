"""The segmenter trains on several processes with torch.distributed, for real: torchrun starts 2 CPU workers
(gloo) for `defect-studio refine`, and what they train must be what one process trains.

Why the two runs can agree closely: every rank draws the same global batches of crops and trains on its part
of each (positions rank, rank + 2, ...); the loss is built from sums over the whole global batch (BCE over
its valid pixels, Dice over its pixels), BatchNorm uses the global batch's statistics (GlobalBatchNorm2d),
and DistributedDataParallel averages the gradients, so the update is one process's. Each rank encodes half the
training images and receives the other half's features from the other rank (`Ranks.share_tensor_lists`). What still differs is
the order of floating-point sums. Measured on this data (2 epochs of 4 steps): the per-epoch losses agree
to 3e-8, the validation IoU and threshold exactly; the tolerances below leave room for other CPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defect_studio.project import Project

LOSS_TOLERANCE = 1e-3
IOU_TOLERANCE = 0.01
TINY = ["--rounds", "1", "--epochs", "2", "--steps-per-epoch", "4", "--seed", "3", "--device", "cpu", "--json"]


@pytest.fixture()
def round_of_true_masks(demo_project: Path, demo_dataset: Path) -> Path:
    """Round 0 whose proposals are the demo's true masks (no classifier needed to train a segmenter)."""
    from defect_studio.imageio import read_mask

    with Project.open(demo_project) as project:
        project.create_round({})
        for image in project.images():
            if image.tag == "untagged":
                continue
            mask_path = demo_dataset / "masks" / f"{image.stem}.png"
            mask = read_mask(mask_path) if mask_path.is_file() else np.zeros((image.height, image.width), bool)
            project.save_mask_proposal(image.id, 0, mask, "test", {})
    return demo_project


def _segmenter_runs(project_dir: Path) -> list:
    with Project.open(project_dir) as project:
        return project.training_runs("segmenter")


def test_two_processes_train_the_segmenter_one_process_trains(round_of_true_masks: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from defect_studio.cli import main
    from defect_studio.ml.segmenter import load_segmenter

    twin = tmp_path / "twin"
    shutil.copytree(round_of_true_masks, twin)
    assert main(["refine", str(round_of_true_masks), *TINY]) == 0
    capsys.readouterr()
    (single,) = _segmenter_runs(round_of_true_masks)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "defect_studio", "refine", str(twin), *TINY]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count('"rounds"') == 1, "rank 0 alone reports the summary"
    summary = json.loads(completed.stdout[completed.stdout.index('{\n  "rounds"'):])  # after the progress lines
    encoding = [json.loads(line) for line in completed.stdout.splitlines()
                if line.startswith("{") and '"encode images"' in line]
    # the training images' last event (the held-out images are fewer)
    training = max(encoding, key=lambda event: (event["total"], event["step"]))
    assert training["step"] == training["total"]
    assert int(training["message"].split()[0]) == (training["total"] + 1) // 2, "rank 0 encodes its half alone"
    assert summary["rounds"][0]["segmenter"]["processes"] == 2

    (distributed,) = _segmenter_runs(twin)
    assert [p.name for p in (twin / "models").iterdir()] == [distributed.checkpoint_path.name], "one checkpoint, by rank 0"
    assert load_segmenter(distributed.checkpoint_path, "cpu").meta["processes"] == 2
    pairs = list(zip(single.metrics["history"], distributed.metrics["history"], strict=True))
    for one, two in pairs:
        assert abs(one["loss"] - two["loss"]) <= LOSS_TOLERANCE, pairs
        assert abs(one["val_defect_iou"] - two["val_defect_iou"]) <= IOU_TOLERANCE, pairs
    assert single.metrics["best_epoch"] == distributed.metrics["best_epoch"]
    assert abs(single.metrics["threshold"] - distributed.metrics["threshold"]) <= 0.05 + 1e-9  # one step of the sweep


def test_a_failure_on_rank_0_ends_every_rank_with_its_message(demo_project: Path, tmp_path: Path) -> None:
    """No round to train on: rank 0 says so and the other rank, waiting for a plan, leaves with the same code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "defect_studio", "next-round", str(demo_project), "--device", "cpu"]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode != 0
    assert completed.stderr.count("no round yet") == 1, completed.stderr[-3000:]
    assert "/defect_studio/" not in completed.stderr, "no traceback of ours (torchrun prints its own report)"
    assert not (demo_project / "models").exists() or not list((demo_project / "models").iterdir())


def test_nproc_runs_the_same_command_under_torchrun(demo_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from defect_studio.cli import main

    launched: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        launched.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert main(["next-round", str(demo_project), "--nproc=2", "--round", "0"]) == 0
    assert main(["refine", str(demo_project), "--nproc", "4", "--rounds", "2"]) == 0
    next_round, refine = launched
    assert "--nproc-per-node=2" in next_round and "--nproc-per-node=4" in refine
    assert next_round[next_round.index("defect_studio") + 1 :] == ["next-round", str(demo_project), "--round", "0"]
    assert refine[refine.index("defect_studio") + 1 :] == ["refine", str(demo_project), "--rounds", "2"]


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_any_exchange(tmp_path: Path) -> None:
    from defect_studio.errors import DataError
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.ml.distributed import Ranks
    from defect_studio.ml.segmenter import SegmentationSample, SegmenterConfig, make_target, train_segmenter_job

    mask = np.zeros((32, 32), bool)
    mask[4:8, 4:8] = True
    samples = [SegmentationSample("a", np.random.rand(32, 32, 1).astype(np.float32), make_target(mask))]
    with pytest.raises(DataError, match="multiple of 3"):
        run_job(train_segmenter_job(samples, SegmenterConfig(batch_size=16), tmp_path / "s.pt", CancelToken(),
                                    ranks=Ranks(rank=0, world_size=3)))
    assert not (tmp_path / "s.pt").exists()
