"""The classifier gate: the project's classifier decides which images get a mask, in the app, in the export and
in `predict` (its checkpoint travels inside the segmenter's)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
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


def test_a_classifier_trained_on_tiles_gates_by_its_most_defect_like_tile(tmp_path: Path) -> None:
    """The app, the export and `predict` score a large image as the tile classifier trained: per tile."""
    from tests.test_tile_training import pitted_surface

    folder = tmp_path / "surfaces"
    folder.mkdir()
    items, samples = [], []
    for index in range(8):
        label = "defect" if index % 2 else "good"
        pixels = pitted_surface(index, 4 if label == "defect" else 0, size=192)
        path = folder / f"{index:02d}-{label}.png"
        assert cv2.imwrite(str(path), pixels)
        items.append((path, label, file_sha256(path)))
        samples.append(SegmentationSample(path.stem, read_image(path), make_target(np.zeros(pixels.shape, bool))))
    classifier = tmp_path / "tiles.pt"
    run_job(train_classifier_job(items, ClassifierConfig(**{**CLASSIFIER, "epochs": 1, "min_epochs": 1},
                                                         tiling="tiles", tile_size=64, tile_overlap=0),
                                 classifier, CancelToken(), "cpu"))
    segmenter = tmp_path / "segmenter.pt"
    run_job(train_segmenter_job(samples, SegmenterConfig(**{**SEGMENTER, "epochs": 1, "steps_per_epoch": 2}), segmenter,
                                CancelToken(), classifier_path=classifier))
    loaded = load_segmenter(segmenter, "cpu")
    assert loaded.gate_classifier is not None and loaded.gate_classifier.tiling is not None
    assert loaded.meta["classifier_gate"]["tiling"]["tile_size"] == 64
    images = [sample.image for sample in samples[:4]]
    paths = [path for path, _, _ in items[:4]]
    for index in (0, 1):  # larger than one segmenter tile: predict decodes and gates them tile by tile
        path = folder / f"large-{index}.png"
        assert cv2.imwrite(str(path), pitted_surface(100 + index, 6 * index, size=1100))
        paths.append(path)
        images.append(read_image(path))
    for image in images[:4]:  # the image's probability is its most defect-like tile's (9 tiles of 64 px)
        tiles = [image[y : y + 64, x : x + 64] for y in range(0, 192, 64) for x in range(0, 192, 64)]
        assert loaded.gate_probability(image) == pytest.approx(
            float(loaded.gate_classifier.predict_scores(tiles).max()), abs=1e-6)

    out, parity = export_segmenter(loaded, tmp_path / "model", images[:2])
    assert parity.passed
    card = json.loads((out / CARD_FILE).read_text())
    assert card["classifier_gate"]["tiling"] == loaded.meta["classifier_gate"]["tiling"]
    exported = load_exported(out)
    for image in images:
        assert exported.gate_probability(image) == pytest.approx(loaded.gate_probability(image), abs=1e-4)
    # a threshold between the images' probabilities: predict silences the same images the app does
    probabilities = sorted(loaded.gate_probability(image) for image in images)
    threshold = (probabilities[2] + probabilities[3]) / 2
    card["classifier_gate"]["threshold"] = threshold
    (out / CARD_FILE).write_text(json.dumps(card))
    loaded.meta["classifier_gate"]["threshold"] = threshold
    loaded.meta["threshold"] = 0.0  # every pixel the segmenter sees is defect: only the gate empties a mask
    card["threshold"] = 0.0
    (out / CARD_FILE).write_text(json.dumps(card))
    masks = tmp_path / "masks"
    assert cli_main(["predict", str(out), *map(str, paths), "--out", str(masks)]) == 0
    for path, image in zip(paths, images):
        in_app = loaded.mask(image)
        assert in_app.any() == loaded.classifier_says_defect(image)
        np.testing.assert_array_equal(read_mask(masks / f"{path.stem}.png", image.shape[:2]), in_app)
    assert sum(loaded.classifier_says_defect(image) for image in images) == 3
