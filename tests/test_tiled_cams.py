"""CAMs by tiles: each tile's map (the public compute_cams) weighted by its defect probability, blended
at native resolution: the defect is found where it is, tiles the classifier calls good stay near
zero, a defect across tile borders leaves no seam, and a small image is computed whole as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defect_studio.ml.cams import compute_cams
from defect_studio.ml.preprocess import Preprocessing
from defect_studio.ml.tiled_cams import cam_tiling, tile_defect_probability, tiled_cam
from defect_studio.ml.tiling import Tiling
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
        assert stitched.shape == (640, 640) and stitched.dtype == np.float32
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
