"""The affinity walk (ml/affinity.py): the walk itself, what the head learns, and the head that classifier
training adds to its checkpoint."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defect_studio.jobs import CancelToken, JobCancelled, run_job
from defect_studio.ml import affinity
from defect_studio.ml.cams import CamSettingsError, compute_cams, minmax
from defect_studio.ml.preprocess import letterbox_geometry


def dense_walk(embedding: torch.Tensor, start: torch.Tensor, valid: torch.Tensor, radius: int, beta: float,
               steps: int) -> torch.Tensor:
    """AffinityNet's inference as written in the paper: a dense N×N transition matrix."""
    channels, height, width = embedding.shape
    vectors = embedding.reshape(channels, -1).T
    distance = torch.cdist(vectors[None], vectors[None], p=1)[0] / channels
    ys, xs = np.divmod(np.arange(height * width), width)
    near = torch.from_numpy((ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2 <= radius * radius)
    inside = valid.reshape(-1).float()
    weights = torch.exp(-distance).pow(beta) * near * inside[None] * inside[:, None]
    weights = weights + torch.diag(1.0 - inside)  # a cell off the image keeps its value
    transition = weights / weights.sum(dim=1, keepdim=True)
    values = start.reshape(-1)
    for _ in range(steps):
        values = transition @ values
    return values.reshape(height, width)


def test_the_walk_is_the_dense_random_walk() -> None:
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(6, 9, 11, generator=generator)
    start = torch.rand(9, 11, generator=generator)
    valid = torch.ones(9, 11, dtype=torch.bool)
    valid[:, :2] = False  # letterbox padding
    walked = affinity.random_walk(embedding, start, valid, radius=3, beta=2.0, steps=5)
    torch.testing.assert_close(walked, dense_walk(embedding, start, valid, 3, 2.0, 5), atol=1e-5, rtol=1e-4)
    assert torch.equal(walked[:, :2], start[:, :2])


def test_the_walk_spreads_over_like_surface_and_stops_at_an_edge() -> None:
    embedding = torch.zeros(4, 16, 16)
    embedding[:, :, 8:] = 3.0  # the right half looks different
    start = torch.zeros(16, 16)
    start[8, 3] = 1.0  # evidence on the left half only
    walked = affinity.random_walk(embedding, start, torch.ones(16, 16, dtype=torch.bool), radius=3, beta=8.0, steps=16)
    assert walked[:, :8].min() > 0  # spread over the whole left half
    assert walked[:, 8:].max() < 1e-6 * walked[:, :8].max()  # exp(-3)^8: nothing crosses


def test_the_loss_rewards_an_embedding_that_separates_the_labels() -> None:
    labels = torch.full((1, 12, 12), affinity.UNKNOWN, dtype=torch.long)
    labels[0, :, :5] = 0
    labels[0, :, 7:] = 1
    separated = torch.zeros(1, 8, 12, 12)
    separated[:, :, :, 6:] = 4.0
    mixed = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    assert affinity.affinity_loss(separated, labels, 3) < 0.2 * affinity.affinity_loss(mixed, labels, 3)
    everything_unknown = torch.full_like(labels, affinity.UNKNOWN)
    assert float(affinity.affinity_loss(mixed, everything_unknown, 3)) == 0.0


def synthetic_examples(count: int, seed: int = 0) -> tuple[list[list[torch.Tensor]], list[np.ndarray], list[np.ndarray]]:
    """Stage features (strides 4, 8, 16 of a 64-px input) of surfaces with one square defect whose features
    differ from the background's; labels as a coarse CAM would give them (only the defect's core is confident)."""
    rng = np.random.default_rng(seed)
    features, labels, truths = [], [], []
    for _ in range(count):
        truth = np.zeros((8, 8), bool)
        top, left = rng.integers(0, 4, 2)
        truth[top : top + 4, left : left + 4] = True
        per_stage = []
        for size, channels in ((16, 4), (8, 6), (4, 8)):
            noise = rng.normal(0, 0.3, (channels, size, size)).astype(np.float32)
            mask = np.kron(truth, np.ones((size // 8 or 1,) * 2)) if size >= 8 else truth[::2, ::2]
            noise[0] += 2.0 * mask
            per_stage.append(torch.from_numpy(noise).half())
        features.append(per_stage)
        label = np.full((8, 8), affinity.UNKNOWN, np.uint8)
        label[top + 1 : top + 3, left + 1 : left + 3] = 1  # the confident core
        far = ~np.pad(truth, 0)
        far[max(0, top - 1) : top + 5, max(0, left - 1) : left + 5] = False
        label[far] = 0
        labels.append(label)
        truths.append(truth)
    return features, labels, truths


def test_a_trained_head_lets_the_core_spread_over_the_whole_defect() -> None:
    features, labels, truths = synthetic_examples(24)
    settings = affinity.AffinitySettings(epochs=15, width=8, embedding=16, radius=3, batch_size=8, learning_rate=1e-2)
    model = run_job(affinity.train_head(features, labels, settings, CancelToken()))
    test_features, test_labels, test_truths = synthetic_examples(6, seed=1)
    ious = []
    for feats, label, truth in zip(test_features, test_labels, test_truths):
        with torch.no_grad():
            embedding = model.head([f[None] for f in feats])[0]
        start = torch.from_numpy((label == 1).astype(np.float32))
        walked = affinity.random_walk(embedding, start, torch.ones(8, 8, dtype=torch.bool), 3, 8.0, 16).numpy()
        marked = walked >= 0.5 * walked.max()
        ious.append((marked & truth).sum() / (marked | truth).sum())
    core_iou = 4 / 16  # the confident core alone covers a quarter of the defect
    assert np.mean(ious) > 0.7 > core_iou


def test_training_can_be_cancelled() -> None:
    features, labels, _ = synthetic_examples(4)
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(JobCancelled):
        run_job(affinity.train_head(features, labels, affinity.AffinitySettings(epochs=2, width=8), cancel))


def test_grid_labels_follow_the_letterbox() -> None:
    geometry = letterbox_geometry((40, 80), 64)  # content 32 x 64 inside a 64 x 64 input
    cam = np.zeros((40, 80), np.float32)
    cam[10:30, 50:70] = 1.0
    labels = affinity.grid_labels(cam, geometry, (8, 8), high=0.45, low=0.1)
    valid = affinity.valid_on_grid(geometry, (8, 8))
    assert valid.sum() == 4 * 8 and not valid[:2].any() and not valid[6:].any()  # the padding rows
    assert (labels[~valid] == affinity.UNKNOWN).all()
    assert (labels == 1).any() and (labels[valid] != affinity.UNKNOWN).sum() > 16
    ys, xs = np.nonzero(labels == 1)
    assert xs.min() >= 4  # on the right, where the CAM is


# ---------------------------------------------------------------------------------------------- classifier training


TINY = dict(arch="compact", width=8, input_size=64, epochs=6, min_epochs=6, batch_size=8, lr=5e-3, seed=0,
            augment=False, threads=1)


@pytest.fixture(scope="module")
def trained_with_head(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    from defect_studio.dataset_layout import load_dataset
    from defect_studio.imageio import file_sha256
    from defect_studio.ml.classifier import ClassifierConfig, train_classifier_job

    samples = [(s.image_path, s.label, file_sha256(s.image_path)) for s in load_dataset(demo_dataset) if s.split == "train"]
    checkpoint = tmp_path_factory.mktemp("affinity") / "classifier.pt"
    events = []
    run_job(train_classifier_job(samples, ClassifierConfig(**TINY), checkpoint, CancelToken(), "cpu"), events.append)
    return checkpoint, samples, events


def test_classifier_training_adds_the_head_and_its_walk_maps_the_defect_images(trained_with_head) -> None:
    from defect_studio.imageio import read_image
    from defect_studio.ml.classifier import load_classifier

    checkpoint, samples, events = trained_with_head
    assert any(e.stage == "affinity" and "epoch 8/8" in e.message for e in events)
    classifier = load_classifier(checkpoint)
    assert classifier.affinity is not None and classifier.affinity.base.method == affinity.BASE_METHOD
    images = [read_image(path) for path, tag, _ in samples if tag == "defect"][:3]
    walked = compute_cams(classifier, images, "affinity-walk")
    base = compute_cams(classifier, images, "fgbp")
    for walk_map, base_map, image in zip(walked, base, images):
        assert walk_map.shape == image.shape[:2] and walk_map.dtype == np.float32
        assert walk_map.min() >= 0 and walk_map.max() == pytest.approx(1.0)
        assert not np.allclose(walk_map, base_map, atol=1e-3)  # the walk changed the map
    # no step: the base CAM averaged onto the stride-8 grid and back
    still = compute_cams(classifier, images[:1], "affinity-walk", {"steps": 0})[0]
    _, (geometry,) = classifier.preprocessing.prepare_batch(images[:1])
    grid = affinity.map_on_grid(base[0], geometry, (TINY["input_size"] // 8,) * 2)
    expected = geometry.to_original(cv2.resize(grid, geometry.input_size[::-1], interpolation=cv2.INTER_LINEAR))
    np.testing.assert_allclose(still, minmax(expected), atol=1e-5)


def test_a_classifier_without_the_head_gets_a_clear_message_and_can_have_one_added(trained_with_head, tmp_path: Path) -> None:
    from defect_studio.imageio import file_sha256, read_image
    from defect_studio.ml.classifier import load_classifier

    checkpoint, samples, _ = trained_with_head
    payload = torch.load(io.BytesIO(checkpoint.read_bytes()), weights_only=True)
    del payload["affinity"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    image = read_image(samples[0][0])
    with pytest.raises(CamSettingsError, match="train the classifier again"):
        compute_cams(load_classifier(old), [image], "affinity-walk")
    before = file_sha256(old)
    added = run_job(affinity.add_affinity_head(
        old, tmp_path / "with-head.pt", [p for p, tag, _ in samples if tag == "defect"],
        [p for p, tag, _ in samples if tag == "good"], CancelToken(), affinity.AffinitySettings(epochs=1)))
    assert file_sha256(old) == before  # the original is left as it was
    assert compute_cams(load_classifier(added), [image], "affinity-walk")[0].shape == image.shape[:2]


def test_no_head_when_its_epochs_are_zero(demo_dataset: Path, tmp_path: Path) -> None:
    from defect_studio.dataset_layout import load_dataset
    from defect_studio.imageio import file_sha256
    from defect_studio.ml.classifier import ClassifierConfig, load_classifier, train_classifier_job

    samples = [(s.image_path, s.label, file_sha256(s.image_path)) for s in load_dataset(demo_dataset) if s.split == "train"]
    config = ClassifierConfig(**{**TINY, "epochs": 1, "min_epochs": 1, "affinity_epochs": 0})
    run_job(train_classifier_job(samples, config, tmp_path / "c.pt", CancelToken(), "cpu"))
    assert load_classifier(tmp_path / "c.pt").affinity is None
