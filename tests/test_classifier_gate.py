"""The classifier gate: the project's classifier decides which images get a mask, in the app, in the export and
in `predict` (its checkpoint travels inside the segmenter's)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from defect_studio.cli import main as cli_main
from defect_studio.dataset_layout import load_dataset
from defect_studio.errors import ModelError
from defect_studio.imageio import file_sha256, read_image, read_mask
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.classifier import ClassifierConfig, train_classifier_job
from defect_studio.ml.export import export_segmenter
from defect_studio.ml.segmenter import SegmentationSample, SegmenterConfig, load_segmenter, make_target, train_segmenter_job
from defect_studio.predict import CARD_FILE, GATE_MODEL_FILE, GATE_TORCHSCRIPT_FILE, load_exported

CLASSIFIER = dict(arch="compact", width=8, input_size=64, epochs=4, min_epochs=4, batch_size=8, lr=5e-3, seed=0,
                  augment=False, threads=1, affinity_epochs=0)
SEGMENTER = dict(architecture="unet", channels=(8, 16, 32), crop_size=48, batch_size=8, epochs=2, steps_per_epoch=8,
                 learning_rate=1e-2, seed=1)


@pytest.fixture(scope="module")
def gated(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("gate")
    train = [s for s in load_dataset(demo_dataset) if s.split == "train"]
    classifier = folder / "classifier.pt"
    run_job(train_classifier_job([(s.image_path, s.label, file_sha256(s.image_path)) for s in train],
                                 ClassifierConfig(**CLASSIFIER), classifier, CancelToken(), "cpu"))
    samples = []
    for s in train:
        image = read_image(s.image_path)
        mask = read_mask(s.mask_path) if s.mask_path else np.zeros(image.shape[:2], bool)
        samples.append(SegmentationSample(s.stem, image, make_target(mask)))
    segmenter = folder / "segmenter.pt"
    run_job(train_segmenter_job(samples, SegmenterConfig(**SEGMENTER), segmenter, CancelToken(), classifier_path=classifier))
    tests = [s.image_path for s in load_dataset(demo_dataset) if s.split == "test"][:6]
    return classifier, segmenter, tests, samples


def test_the_segmenter_keeps_its_classifier_and_lets_it_decide(gated) -> None:
    classifier_path, segmenter_path, tests, _ = gated
    loaded = load_segmenter(segmenter_path, "cpu")
    assert loaded.gate_classifier is not None
    assert loaded.meta["classifier_gate"]["sha256"] == file_sha256(classifier_path)
    classifier_path.unlink()  # the copy inside the segmenter's checkpoint is enough
    loaded = load_segmenter(segmenter_path, "cpu")
    images = [read_image(p) for p in tests]
    assert loaded.gate_threshold == min(0.2, loaded.gate_classifier.decision_threshold)
    loaded.meta["classifier_gate"]["threshold"] = 1.0  # the classifier calls every image good
    assert not any(loaded.mask(image).any() for image in images)
    loaded.meta["classifier_gate"]["threshold"] = -1.0  # ... and every image defect: the pixels alone decide
    for image in images:
        np.testing.assert_array_equal(loaded.mask(image), loaded.probability(image) >= loaded.threshold)


def test_without_the_gate_the_segmenter_decides_alone(gated, tmp_path: Path) -> None:
    _, _, _, samples = gated
    path = tmp_path / "alone.pt"
    run_job(train_segmenter_job(samples[:8], SegmenterConfig(**{**SEGMENTER, "epochs": 1, "classifier_gate": False}), path,
                                CancelToken(), classifier_path=None))
    loaded = load_segmenter(path, "cpu")
    assert loaded.gate_classifier is None and loaded.meta["classifier_gate"] is None


def test_export_and_predict_apply_the_same_gate(gated, tmp_path: Path) -> None:
    _, segmenter_path, tests, _ = gated
    loaded = load_segmenter(segmenter_path, "cpu")
    images = [read_image(p) for p in tests]
    out, parity = export_segmenter(loaded, tmp_path / "model", images[:3])
    assert parity.passed
    card = json.loads((out / CARD_FILE).read_text())
    assert card["classifier_gate"]["threshold"] == pytest.approx(loaded.gate_threshold)
    assert {GATE_MODEL_FILE, GATE_TORCHSCRIPT_FILE} <= set(card["files"]) and (out / GATE_MODEL_FILE).is_file()
    exported = load_exported(out)
    for image in images:
        assert exported.gate_probability(image) == pytest.approx(loaded.gate_probability(image), abs=1e-4)
    # predict reproduces the app's masks, gate included, for a classifier that calls some images good
    threshold = float(np.median([loaded.gate_probability(image) for image in images]))
    card["classifier_gate"]["threshold"] = threshold
    (out / CARD_FILE).write_text(json.dumps(card))
    loaded.meta["classifier_gate"]["threshold"] = threshold
    masks = tmp_path / "masks"
    assert cli_main(["predict", str(out), *map(str, tests), "--out", str(masks)]) == 0
    silenced = 0
    for path, image in zip(tests, images):
        in_app = loaded.mask(image)
        predicted = read_mask(masks / f"{path.stem}.png", image.shape[:2])
        union = np.count_nonzero(predicted | in_app)
        assert union == 0 or np.count_nonzero(predicted & in_app) / union >= 0.99
        silenced += not loaded.classifier_says_defect(image)
    assert silenced >= len(images) // 2 - 1
    (out / GATE_MODEL_FILE).unlink()
    with pytest.raises(ModelError, match="classifier gate"):
        load_exported(out)
