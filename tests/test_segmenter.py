"""The segmenter: loss with an ignore band, aligned crops, training on demo masks, checkpoints, cancel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defect_studio.dataset_layout import load_dataset
from defect_studio.errors import DataError, ModelError
from defect_studio.imageio import read_image, read_mask
from defect_studio.jobs import CancelToken, JobCancelled, run_job
from defect_studio.ml.evaluate import evaluate_pairs
from defect_studio.ml.segmenter import (
    IGNORE,
    CropSampler,
    LoadedSegmenter,
    SegmentationSample,
    SegmenterConfig,
    SegmenterNet,
    load_segmenter,
    make_target,
    segmentation_loss,
    train_segmenter_job,
    _validate,
)

TINY = dict(architecture="unet", channels=(8, 16, 32), crop_size=48, batch_size=8, epochs=6, steps_per_epoch=12, learning_rate=1e-2, seed=0)


def demo_samples(dataset: Path, split: str) -> list[tuple[SegmentationSample, str, str | None]]:
    samples = []
    for s in load_dataset(dataset):
        if s.split != split:
            continue
        image = read_image(s.image_path)
        mask = read_mask(s.mask_path) if s.mask_path else np.zeros(image.shape[:2], bool)
        samples.append((SegmentationSample(s.stem, image, make_target(mask)), s.label, s.defect_type))
    return samples


@pytest.fixture(scope="module")
def trained(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    checkpoint = tmp_path_factory.mktemp("segmenter") / "segmenter.pt"
    train = [s for s, _, _ in demo_samples(demo_dataset, "train")]
    events = []
    result = run_job(train_segmenter_job(train, SegmenterConfig(**TINY), checkpoint, CancelToken()), events.append)
    return result, events, checkpoint


def test_ignored_pixels_do_not_change_the_loss() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.uint8)
    target[0, 2:4, 2:4] = 1
    target[0, 5:, 5:] = IGNORE
    logits = torch.randn(1, 1, 8, 8)
    changed = logits.clone()
    changed[0, 0, 5:, 5:] += 10.0  # only ignored pixels differ
    assert torch.allclose(segmentation_loss(logits, target), segmentation_loss(changed, target))
    changed[0, 0, 0, 0] += 10.0  # a valid background pixel now predicted defect: the loss rises
    assert segmentation_loss(changed, target) > segmentation_loss(logits, target)


def test_make_target_ignores_every_pixel_of_the_ignore_band() -> None:
    # Defect pixels too: from round 1 the band covers the mask's pixels the CAM does not back (ml/pseudo.py).
    mask = np.array([[1, 1, 0, 0]], bool)
    ignore = np.array([[1, 0, 1, 0]], bool)
    assert make_target(mask, ignore).tolist() == [[IGNORE, 1, IGNORE, 0]]
    assert make_target(mask).tolist() == [[1, 1, 0, 0]]


def test_crops_keep_image_and_mask_aligned() -> None:
    rng = np.random.default_rng(0)
    samples = []
    for index in range(4):
        mask = np.zeros((40 + 10 * index, 70), bool)
        mask[rng.integers(0, 30) :][:8, 10:30] = True
        samples.append(SegmentationSample(str(index), mask[:, :, None].astype(np.float32), make_target(mask)))
    sampler = CropSampler(samples, SegmenterConfig(crop_size=64, batch_size=16), in_channels=1)
    images, targets = sampler.batch()
    assert images.shape == (16, 1, 64, 64) and targets.shape == (16, 64, 64)
    valid = targets != IGNORE
    assert bool(valid.any()) and bool((targets == 1).any())
    # Pixels equal the mask before jitter; brightness/contrast jitter keeps them on their side of 0.5.
    assert torch.equal((images[:, 0] > 0.5)[valid], (targets == 1)[valid])
    # Crops from images smaller than the crop are padded with ignored pixels, not background.
    assert bool((targets == IGNORE).any())


def test_same_seed_same_batches() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((60, 60, 1)).astype(np.float32)
    samples = [SegmentationSample("a", image, make_target(image[:, :, 0] > 0.9))]
    first = CropSampler(samples, SegmenterConfig(crop_size=32, batch_size=4, seed=3), 1)
    second = CropSampler(samples, SegmenterConfig(crop_size=32, batch_size=4, seed=3), 1)
    torch.manual_seed(0)
    a = first.batch()
    torch.manual_seed(1)  # every draw comes from the seeded numpy generator, none from torch's
    b = second.batch()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _interleaved(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rank r's rows are positions r, r + world_size, ... of the whole batch."""
    return torch.stack(parts, dim=1).flatten(0, 1)


def _rank_parts_make_up_the_batch(make_sampler) -> None:  # type: ignore[no-untyped-def]
    inputs, targets = make_sampler().batch()
    for world_size in (2, 4):
        parts = [make_sampler().batch((rank, world_size)) for rank in range(world_size)]
        assert torch.equal(_interleaved([part_targets for _, part_targets in parts]), targets)
        if isinstance(inputs, list):  # feature crops, one tensor per encoder level
            for level, whole in enumerate(inputs):
                assert torch.equal(_interleaved([part_inputs[level] for part_inputs, _ in parts]), whole)
        else:
            assert torch.equal(_interleaved([part_inputs for part_inputs, _ in parts]), inputs)


def test_the_ranks_parts_of_a_batch_make_up_the_batch_of_one_process() -> None:
    """A distributed run draws every crop on every rank and cuts only its own: rank r gets positions
    r, r + world_size, ...; together they are exactly one process's batch."""
    from defect_studio.ml.encoded_crops import EncodedCropSampler, EncodedSample

    rng = np.random.default_rng(2)
    samples = []
    for index in range(3):
        image = rng.random((48 + 8 * index, 56, 1)).astype(np.float32)
        samples.append(SegmentationSample(str(index), image, make_target(image[:, :, 0] > 0.8)))
    _rank_parts_make_up_the_batch(lambda: CropSampler(samples, SegmenterConfig(crop_size=32, batch_size=8, seed=5), 1))

    encoded = []
    for sample in samples:
        target = np.pad(sample.target, ((0, 64 - sample.target.shape[0]), (0, 64 - sample.target.shape[1])),
                        constant_values=IGNORE)
        levels = [torch.from_numpy(rng.random((c, 64 // s, 64 // s)).astype(np.float16)) for c, s in ((4, 2), (6, 4))]
        encoded.append(EncodedSample(levels, target, np.flatnonzero(target.ravel() == 1)))
    _rank_parts_make_up_the_batch(lambda: EncodedCropSampler(encoded, 32, 8, 0.5, seed=5, alignment=4, flip_features=True))


def test_network_keeps_any_size_after_padding() -> None:
    from defect_studio.ml.segmenter import predict_probability

    model = SegmenterNet(1, (4, 8, 16))
    for shape in [(17, 33, 1), (64, 64, 1), (5, 7, 3)]:
        assert predict_probability(model, np.random.rand(*shape).astype(np.float32)).shape == shape[:2]


def test_training_learns_the_demo_defects(trained, demo_dataset: Path) -> None:
    result, events, checkpoint = trained
    assert [e.step for e in events if e.stage == "train segmenter"] == list(range(1, TINY["epochs"] + 1))
    assert checkpoint.is_file() and result.checkpoint_sha256
    loaded = load_segmenter(checkpoint, device="cpu")
    assert loaded.meta["in_channels"] == 3  # the demo mixes gray and colour images
    assert 0.0 < loaded.threshold < 1.0
    pairs = []
    for sample, label, kind in demo_samples(demo_dataset, "test"):
        pairs.append((sample.target == 1, loaded.mask(sample.image), label == "defect", kind))
    metrics = evaluate_pairs(pairs)
    # A model that learned nothing predicts all or nothing: defect IoU ~0.
    assert metrics["defect_iou"] > 0.1, metrics
    assert metrics["background_iou"] > 0.9


def test_checkpoint_is_a_plain_state_dict(trained) -> None:
    _, _, checkpoint = trained
    data = torch.load(checkpoint, weights_only=True)
    assert set(data) == {"format", "state_dict", "meta"}
    assert all(isinstance(v, torch.Tensor) for v in data["state_dict"].values())


def test_cancel_keeps_the_previous_checkpoint(trained, tmp_path: Path) -> None:
    _, _, checkpoint = trained
    target = tmp_path / "segmenter.pt"
    target.write_bytes(checkpoint.read_bytes())
    before = target.read_bytes()
    cancel = CancelToken()
    samples = [SegmentationSample("a", np.random.rand(40, 40, 1).astype(np.float32), np.zeros((40, 40), np.uint8))]
    samples[0].target[10:20, 10:20] = 1
    job = train_segmenter_job(samples, SegmenterConfig(**TINY), target, cancel)
    cancel.cancel()
    with pytest.raises(JobCancelled):
        run_job(job)
    assert target.read_bytes() == before
    assert not list(tmp_path.glob("*.partial"))


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no masks"):
        run_job(train_segmenter_job([], SegmenterConfig(**TINY), tmp_path / "x.pt", CancelToken()))
    with pytest.raises(DataError, match="does not match"):
        SegmentationSample("a", np.zeros((4, 4, 1), np.float32), np.zeros((5, 4), np.uint8))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable"):
        load_segmenter(junk)
    with pytest.raises(ModelError, match="no segmenter checkpoint"):
        load_segmenter(tmp_path / "missing.pt")
    with pytest.raises(DataError, match="unknown segmenter settings"):
        SegmenterConfig.from_dict({"epoch": 3})


def test_warm_start_needs_the_same_architecture(tmp_path: Path) -> None:
    """A checkpoint of another architecture is not forced into the network: training starts afresh."""
    samples = [SegmentationSample(f"s{i}", np.random.default_rng(i).random((40, 40, 1), dtype=np.float32),
                                  make_target(np.pad(np.ones((8, 8), bool), 16))) for i in range(4)]
    tiny = dict(architecture="unet", crop_size=32, batch_size=2, epochs=1, warm_start_epochs=1, steps_per_epoch=2,
                validation_fraction=0.0)
    first = run_job(train_segmenter_job(samples, SegmenterConfig(channels=(4, 8), **tiny), tmp_path / "a.pt", CancelToken()))
    same = run_job(train_segmenter_job(samples, SegmenterConfig(channels=(4, 8), **tiny), tmp_path / "b.pt",
                                       CancelToken(), start_from=first.checkpoint_path))
    other = run_job(train_segmenter_job(samples, SegmenterConfig(channels=(4, 8, 16), **tiny), tmp_path / "c.pt",
                                        CancelToken(), start_from=first.checkpoint_path))
    assert same.metrics["started_from"] == first.checkpoint_sha256
    assert other.metrics["started_from"] is None


def test_threads_setting_holds_while_training_and_is_restored(tmp_path: Path) -> None:
    samples = [SegmentationSample(f"s{i}", np.random.default_rng(i).random((40, 40, 1), dtype=np.float32),
                                  make_target(np.pad(np.ones((8, 8), bool), 16))) for i in range(4)]
    config = SegmenterConfig(architecture="unet", channels=(4, 8), crop_size=32, batch_size=2, epochs=2,
                             steps_per_epoch=1, validation_fraction=0.0, threads=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        during = [torch.get_num_threads() for _ in train_segmenter_job(samples, config, tmp_path / "a.pt", CancelToken())]
        assert during == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


class BrightnessNet(torch.nn.Module):
    """A stand-in segmenter whose defect probability rises with the pixel's brightness."""

    in_channels, size_multiple = 1, 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return 20.0 * (pixels - 0.5)


def _speckled(size: int, brightness: float, box: tuple[slice, slice]) -> np.ndarray:
    image = np.zeros((size, size, 1), np.float32)
    image[box] = brightness
    return image


def test_image_gate_silences_faint_blobs_on_good_images() -> None:
    """Held-out good images with a faint bright speck: the gate learnt on validation empties their masks,
    while the defect image (a bright blob) keeps its mask."""
    blob, speck = (slice(8, 20), slice(8, 20)), (slice(30, 34), slice(30, 34))
    defect_image = _speckled(48, 1.0, blob)
    defect_target = np.zeros((48, 48), np.uint8)
    defect_target[blob] = 1
    good = [SegmentationSample(f"good{i}", _speckled(48, 0.7, speck), np.zeros((48, 48), np.uint8)) for i in range(3)]
    samples = [SegmentationSample("defect", defect_image, defect_target), *good]
    threshold, gate, metrics = _validate(BrightnessNet(), samples, torch.device("cpu"))
    assert gate is not None and metrics["gated_images"] == 3
    assert metrics["defect_iou"] == pytest.approx(1.0)
    model = LoadedSegmenter(BrightnessNet(), {"threshold": threshold, "image_gate": gate}, torch.device("cpu"))
    assert not model.mask(good[0].image).any()
    assert model.mask(defect_image)[blob].all()
    # Without the specks there is nothing to silence, and no gate.
    clean = [SegmentationSample(f"good{i}", np.zeros((48, 48, 1), np.float32), np.zeros((48, 48), np.uint8)) for i in range(3)]
    assert _validate(BrightnessNet(), [samples[0], *clean], torch.device("cpu"))[1] is None


def test_image_gate_never_silences_a_defect_image_to_gain_iou() -> None:
    """A faint small defect scores like the faint specks of the good images: silencing all of them would
    raise the pooled IoU (its few pixels weigh little), but an inspector would lose that defect image."""
    blob, speck = (slice(8, 20), slice(8, 20)), (slice(30, 34), slice(30, 34))
    bright = SegmentationSample("bright", _speckled(48, 1.0, blob), np.pad(np.ones((12, 12), np.uint8), ((8, 28), (8, 28))))
    faint_target = np.zeros((48, 48), np.uint8)
    faint_target[speck] = 1
    faint = SegmentationSample("faint", _speckled(48, 0.7, speck), faint_target)
    good = [SegmentationSample(f"good{i}", _speckled(48, 0.7, speck), np.zeros((48, 48), np.uint8)) for i in range(3)]
    samples = [bright, faint, *good]
    _, gate, metrics = _validate(BrightnessNet(), samples, torch.device("cpu"), keeps_defect_images=0.0)
    assert gate is not None and metrics["gated_images"] == 4  # for IoU alone: the faint defect goes too
    threshold, gate, metrics = _validate(BrightnessNet(), samples, torch.device("cpu"))
    assert gate is None and metrics["gated_images"] == 0
    model = LoadedSegmenter(BrightnessNet(), {"threshold": threshold, "image_gate": gate}, torch.device("cpu"))
    assert model.mask(faint.image)[speck].all()
