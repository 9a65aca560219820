"""The segmenter predicts by overlapping tiles: in the app (LoadedSegmenter) and in `predict` (the
exported model), as the model card's tiling says. Tiled equals whole within tolerance on an image
where both fit; a large image is predicted in bounded memory, band by band, into the same mask."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defect_studio.cli import main as cli_main
from defect_studio.dataset_layout import load_dataset
from defect_studio.imageio import read_image, read_mask, to_float01
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.export import export_segmenter
from defect_studio.ml.segmenter import (
    SegmentationSample,
    SegmenterConfig,
    load_segmenter,
    make_target,
    predict_probability,
    save_segmenter,
    train_segmenter_job,
)
from defect_studio.ml.tiling import Tiling
from defect_studio.predict import CARD_FILE, load_exported

TINY = dict(architecture="unet", channels=(8, 16, 32), crop_size=48, batch_size=8, epochs=3, steps_per_epoch=8,
            learning_rate=1e-2, seed=1, prediction_flips="none")  # tiling alone (flips: test_flip_averaging.py)
# 3 epochs: with 2, seed 1 learned nothing once the crops' flips and jitter got their own stream (4 seeds: 0-1671 pixels found; with 3: 144-7602)
TILES = Tiling("tiles", 128, 64)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


@pytest.fixture(scope="module")
def trained(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny segmenter trained on the demo, and a 384 × 384 mosaic of demo defect images."""
    samples, defect_images = [], []
    for sample in load_dataset(demo_dataset):
        image = read_image(sample.image_path)
        if sample.split == "train":
            mask = read_mask(sample.mask_path) if sample.mask_path else np.zeros(image.shape[:2], bool)
            samples.append(SegmentationSample(sample.stem, image, make_target(mask)))
        elif sample.label == "defect":
            defect_images.append(cv2.resize(image, (96, 96)).reshape(96, 96, -1))
    folder = tmp_path_factory.mktemp("tiled")
    run_job(train_segmenter_job(samples, SegmenterConfig(**TINY), folder / "whole.pt", CancelToken()))
    whole = load_segmenter(folder / "whole.pt", device="cpu")
    # The same weights with a recorded tiling of 128 px tiles: what the app and the card then use.
    meta = {**whole.meta, "tiling": TILES.to_dict()}
    save_segmenter(folder / "tiled.pt", whole.model, meta)
    tiled = load_segmenter(folder / "tiled.pt", device="cpu")
    quad = np.concatenate([np.concatenate(defect_images[0:2], 1), np.concatenate(defect_images[2:4], 1)], 0)
    mosaic = np.ascontiguousarray(np.tile(quad, (2, 2, 1)))
    mosaic = np.round(mosaic * 255) / 255  # exactly what an 8-bit PNG of it reads back as
    return whole, tiled, mosaic.astype(np.float32), folder


def test_tiled_prediction_matches_whole_image_prediction(trained) -> None:
    whole, tiled, mosaic, _ = trained
    assert whole.meta.get("tiling") is None and Tiling().grid_for(*mosaic.shape[:2]) is None  # auto: whole
    grid = TILES.grid_for(*mosaic.shape[:2])
    assert grid is not None and len(grid) == 25
    reference = whole.probability(mosaic)
    np.testing.assert_array_equal(reference, predict_probability(whole.model, mosaic, flips=whole.prediction_flips))  # small: whole
    by_tiles = tiled.probability(mosaic)
    reference_mask, tiled_mask = reference >= whole.threshold, by_tiles >= tiled.threshold
    assert reference_mask.sum() > 20  # the model finds the mosaic's defects, so the comparison means something
    assert np.abs(by_tiles - reference).max() < 0.02  # measured 0.0040
    assert _iou(tiled_mask, reference_mask) >= 0.95  # measured 0.985 (one pixel of 67 differs)


def test_export_records_the_tiling_and_predict_applies_it(trained, tmp_path: Path) -> None:
    _, tiled, mosaic, _ = trained
    out, parity = export_segmenter(tiled, tmp_path / "model", [mosaic])
    assert parity.passed
    card = json.loads((out / CARD_FILE).read_text())
    assert card["tiling"] == {"mode": "tiles", "tile_size": 128, "overlap": 64, "whole_image_max_pixels": 1024 * 1024}
    assert any("overlapping tiles" in step for step in card["preprocessing"])
    image_path = tmp_path / "mosaic.png"
    cv2.imwrite(str(image_path), np.round(mosaic[:, :, 0] * 255).astype(np.uint8))
    assert cli_main(["predict", str(out), str(image_path), "--out", str(tmp_path / "masks")]) == 0
    predicted = read_mask(tmp_path / "masks" / "mosaic.png", mosaic.shape[:2])
    in_app = tiled.mask(read_image(image_path))
    assert in_app.any() and _iou(predicted, in_app) >= 0.99


def test_a_large_image_is_predicted_band_by_band_in_bounded_memory(trained, tmp_path: Path) -> None:
    _, tiled, mosaic, _ = trained
    out, _ = export_segmenter(tiled, tmp_path / "model", [mosaic])
    model = load_exported(out)
    model.card["tiling"] = Tiling("tiles", 512, 64).to_dict()
    # An 8192 × 1024 strip (8.4 MP) of defect mosaics, 8-bit as decoded.
    strip = np.tile(np.round(mosaic[:, :, 0] * 255).astype(np.uint8), (22, 3))[:8192, :1024].copy()
    grid = model.tiling.grid_for(*strip.shape)
    assert grid is not None and len(grid) == 19 * 3

    tracemalloc.start()
    try:
        mask = model.mask_of_pixels(strip)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tile_floats = 512 * 512 * 4
    # The mask, the stitcher's bands and a few tiles' worth of floats; never the whole image in float
    # (33.5 MB here) or a whole-image probability map (another 33.5 MB).
    assert peak <= mask.nbytes + grid.band_bytes() + 12 * tile_floats
    assert peak < strip.size * 4
    # The same mask as stitching the whole probability map first.
    np.testing.assert_array_equal(mask, model.mask(to_float01(strip)))
    assert mask.any()
    torch.set_num_threads(torch.get_num_threads())  # (no thread change leaks from here)


def test_shards_split_the_images_whatever_their_order_and_refuse_bad_input(trained, tmp_path: Path) -> None:
    from defect_studio.errors import ModelError
    from defect_studio.predict import parse_shard, predict_images, shard_of

    images = [tmp_path / f"image-{index}.png" for index in (3, 0, 4, 1, 2)]
    shards = [shard_of(images, (index, 2)) for index in (1, 2)]
    assert sorted(map(str, shards[0] + shards[1])) == sorted(map(str, images)) and not set(shards[0]) & set(shards[1])
    assert shard_of(list(reversed(images)), (1, 2)) == shards[0]  # the same split in any order
    assert parse_shard("2/8") == (2, 8)
    for bad in ("0/4", "5/4", "two/4", "3"):
        with pytest.raises(ModelError, match="shard"):
            parse_shard(bad)

    _, tiled, mosaic, _ = trained
    out, _ = export_segmenter(tiled, tmp_path / "model", [mosaic])
    for path in images:
        cv2.imwrite(str(path), np.round(mosaic[:, :, 0] * 255).astype(np.uint8))
    written = predict_images(out, images, tmp_path / "masks", shard=(2, 2))
    assert [p.stem for p in written] == [p.stem for p in shards[1]]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == sorted(p.stem + ".png" for p in shards[1])
    # the command line: shard 1 of 2 writes the other half; a bad shard is a clear message, not a traceback
    from defect_studio.cli import main as cli_main

    assert cli_main(["predict", str(out), *map(str, images), "--out", str(tmp_path / "masks"), "--shard", "1/2"]) == 0
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == sorted(p.stem + ".png" for p in images)
    assert cli_main(["predict", str(out), *map(str, images), "--out", str(tmp_path / "other"), "--shard", "3/2"]) != 0
    assert not (tmp_path / "other").exists()
