"""CAMs by tiles: each tile's map (the public compute_cams) weighted by its defect probability, blended
at native resolution: the defect is found where it is, tiles the classifier calls good stay near
zero, a defect across tile borders leaves no seam, and a small image is computed whole as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defect_studio.imageio import to_float01
from defect_studio.ml.cams import compute_cams
from defect_studio.ml.preprocess import Preprocessing
from defect_studio.ml.tiled_cams import cam_tiling, tile_defect_probability, tiled_cam
from defect_studio.ml.tiling import TileBox, Tiling, stitch_map
from tests.cam_fixtures import BlobStandIn, StandInClassifier, blob_image

TILES = Tiling("tiles", 256, 64)


class BlobScoringStandIn(BlobStandIn):
    """BlobStandIn scored by its strongest bright-blob response: higher for a tile with the blob."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x[:, 0].amax(dim=(1, 2)) * 40.0 - 3.0


@pytest.fixture
def classifier() -> StandInClassifier:
    return StandInClassifier(BlobScoringStandIn(), Preprocessing(input_size=128, normalisation="none"))


def test_a_defect_across_tile_borders_is_found_without_seams(classifier: StandInClassifier) -> None:
    grid = TILES.grid_for(640, 640)
    assert grid is not None and grid.ys == grid.xs == (0, 192, 384)
    centre = (grid.ys[1] + 20, grid.xs[2] + 10)  # inside the overlap of two tile rows, and of two tile columns
    image, defect = blob_image((640, 640), [(*centre, 6, 0.7)], seed=1)
    blob_tile = image[grid.ys[1] : grid.ys[1] + 256, grid.xs[2] : grid.xs[2] + 256]
    assert tile_defect_probability(classifier, blob_tile) > 1.5 * tile_defect_probability(classifier, image[:256, :256])

    for method in ("fgbp", "region-aware"):
        stitched = tiled_cam(classifier, image, method, tiling=TILES)
        assert stitched.shape == (640, 640) and stitched.dtype == np.float16  # 2 bytes a pixel of a large image
        stitched = stitched.astype(np.float32)
        peak = np.unravel_index(np.argmax(stitched), stitched.shape)
        assert np.hypot(peak[0] - centre[0], peak[1] - centre[1]) <= 10, (method, peak)
        far = np.ones(stitched.shape, bool)
        far[centre[0] - 80 : centre[0] + 80, centre[1] - 80 : centre[1] + 80] = False
        assert stitched[far].max() < 0.02 * stitched.max()

        # Without blending (each pixel from the last tile over it) the tiles' edges cut the map.
        hard = np.zeros_like(stitched)
        for box in grid.boxes():
            tile = image[box.slices]
            hard[box.slices] = compute_cams(classifier, [tile], method)[0] * tile_defect_probability(classifier, tile)
        def worst_border_step(cam: np.ndarray) -> float:
            steps = [np.abs(cam[b] - cam[b - 1]).max() for b in {*grid.ys[1:], *(y + 256 for y in grid.ys[:-1])}]
            steps += [np.abs(cam[:, b] - cam[:, b - 1]).max() for b in {*grid.xs[1:], *(x + 256 for x in grid.xs[:-1])}]
            return float(max(steps))
        inner_step = max(np.abs(np.diff(stitched, axis=0)).max(), np.abs(np.diff(stitched, axis=1)).max())
        assert worst_border_step(stitched) <= inner_step  # a border is no steeper than the map's own edges
        assert worst_border_step(hard) > worst_border_step(stitched)  # the check can fail


def test_a_small_image_is_computed_whole_as_before(classifier: StandInClassifier) -> None:
    default = cam_tiling(classifier)  # tiles the size of the classifier's input, above one segmenter tile
    assert (default.tile_size, default.overlap) == (128, 32) and default.grid_for(1024, 1024) is None
    assert default.grid_for(1100, 1100) is not None
    image, _ = blob_image((200, 240), [(80, 90, 6, 0.7)], seed=2)
    np.testing.assert_array_equal(tiled_cam(classifier, image, "fgbp"), compute_cams(classifier, [image], "fgbp")[0])


def _float32_stitched_cam(classifier: StandInClassifier, image: np.ndarray, method: str) -> np.ndarray:
    """The tiled CAM as it was made before bounded memory: the whole image float32, a float32 map clipped."""
    grid = TILES.grid_for(image.shape[0], image.shape[1])

    def weighted_tile_map(box: TileBox) -> np.ndarray:
        tile = image[box.slices]
        return compute_cams(classifier, [tile], method)[0] * tile_defect_probability(classifier, tile)

    stitched = stitch_map(grid, weighted_tile_map)
    return np.clip(stitched, 0.0, 1.0, out=stitched)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_integer_pixels_made_float_by_tiles_give_the_float32_map_rounded_to_float16(
        classifier: StandInClassifier, dtype: type) -> None:
    floats, _ = blob_image((600, 520), [(200, 300, 6, 0.7), (450, 100, 4, 0.6)], seed=3)
    pixels = np.round(floats[:, :, 0] * np.iinfo(dtype).max).astype(dtype)  # 2-D, as decode_image gives gray
    good, _ = blob_image((256, 256), [], seed=4)
    classifier.with_good_prior([good])  # the region-aware CAM then uses the good-image prior in every tile
    for method in ("fgbp", "region-aware"):
        before = _float32_stitched_cam(classifier, to_float01(pixels), method)
        after = tiled_cam(classifier, pixels, method, tiling=TILES)
        assert after.dtype == np.float16 and after.shape == before.shape
        np.testing.assert_array_equal(after, before.astype(np.float16))  # the same sums, stored in 2 bytes
        assert before.max() > 0.1  # a map with something in it
        np.testing.assert_array_equal(tiled_cam(classifier, to_float01(pixels), method, tiling=TILES), after)


def test_a_small_image_given_as_pixels_is_computed_whole_in_float32(classifier: StandInClassifier) -> None:
    floats, _ = blob_image((200, 240), [(80, 90, 6, 0.7)], seed=2)
    pixels = np.round(floats[:, :, 0] * 255).astype(np.uint8)
    whole = tiled_cam(classifier, pixels, "fgbp")
    assert whole.dtype == np.float32
    np.testing.assert_array_equal(whole, compute_cams(classifier, [to_float01(pixels)], "fgbp")[0])
