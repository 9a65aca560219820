"""Progress events say what they are in `kind` (code matches on it, never on the stage's wording),
and the training jobs mark their epochs and their closing result."""

from __future__ import annotations

import json
from pathlib import Path

from defect_studio.dataset_layout import load_dataset
from defect_studio.imageio import file_sha256, read_image
from defect_studio.jobs import CancelToken, EtaClock, Progress, ProgressKind, run_job


def test_an_event_is_a_step_unless_told_and_its_kind_reaches_the_json() -> None:
    assert Progress("scan", 0).kind is ProgressKind.STEP
    assert EtaClock(3).progress("count", 1).kind is ProgressKind.STEP
    epoch = EtaClock(3).progress("train", 1, "epoch 1/3", {"loss": 0.5}, kind=ProgressKind.EPOCH)
    line = json.loads(epoch.to_json())
    assert line["kind"] == "epoch" and line["stage"] == "train" and line["metrics"] == {"loss": 0.5}
    assert ProgressKind(line["kind"]) is ProgressKind.EPOCH  # a reader of the CLI's --json gets the kind back


def test_the_classifier_marks_each_epoch_and_its_result(demo_dataset: Path, tmp_path: Path) -> None:
    from defect_studio.ml.classifier import train_classifier_job
    from defect_studio.ml.models import ClassifierConfig

    samples = [(s.image_path, s.label, file_sha256(s.image_path)) for s in load_dataset(demo_dataset) if s.split == "train"]
    config = ClassifierConfig(arch="compact", width=8, input_size=64, epochs=2, min_epochs=2, batch_size=8, seed=0,
                              augment=False, threads=1)
    events: list[Progress] = []
    result = run_job(train_classifier_job(samples, config, tmp_path / "classifier.pt", CancelToken(), "cpu"), events.append)
    epochs = [e for e in events if e.kind is ProgressKind.EPOCH]
    assert [e.step for e in epochs] == list(range(1, result.epochs_run + 1))
    assert all("val_auroc" in e.metrics for e in epochs)
    assert [e.kind for e in events].count(ProgressKind.RESULT) == 1 and events[-1].kind is ProgressKind.RESULT


def test_the_segmenter_marks_each_epoch(demo_dataset: Path, tmp_path: Path) -> None:
    import numpy as np

    from defect_studio.imageio import read_mask
    from defect_studio.ml.segmenter import SegmentationSample, SegmenterConfig, make_target, train_segmenter_job

    samples = []
    for s in load_dataset(demo_dataset):
        if s.split == "train":
            image = read_image(s.image_path)
            mask = read_mask(s.mask_path) if s.mask_path else np.zeros(image.shape[:2], bool)
            samples.append(SegmentationSample(s.stem, image, make_target(mask)))
    config = SegmenterConfig(architecture="unet", channels=(8, 16, 32), crop_size=48, batch_size=8, epochs=2, steps_per_epoch=2, seed=0)
    events: list[Progress] = []
    run_job(train_segmenter_job(samples, config, tmp_path / "segmenter.pt", CancelToken()), events.append)
    epochs = [e for e in events if e.kind is ProgressKind.EPOCH]
    assert [e.step for e in epochs] == [1, 2] and all("val_defect_iou" in e.metrics for e in epochs)
    assert all(e.kind is ProgressKind.STEP for e in events if e not in epochs)
