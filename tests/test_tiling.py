"""Tiles at native resolution: the grid, the blending weights, seamless stitching of a defect that
lies across tile borders, bounded memory while stitching, and the automatic whole-or-tiles choice."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest

from defect_studio.errors import DataError
from defect_studio.ml.tiling import (
    TileGrid,
    Tiling,
    TopValues,
    axis_starts,
    choose_tiling,
    map_tiles,
    stitch_map,
    stitched_rows,
    tiled_map,
)


@pytest.mark.parametrize("height, width, tile, overlap", [
    (300, 300, 128, 32), (1000, 130, 256, 64), (97, 500, 64, 0), (64, 64, 64, 32), (513, 257, 128, 64), (40, 900, 128, 16),
])
def test_tiles_cover_the_image_and_their_weights_sum_to_one(height: int, width: int, tile: int, overlap: int):
    grid = TileGrid(height, width, tile, overlap)
    covered = np.zeros((height, width), np.int32)
    assert grid.tile_height <= min(tile, height) and grid.tile_width <= min(tile, width)
    for box in grid.boxes():
        assert box.shape == (grid.tile_height, grid.tile_width)
        covered[box.slices] += 1
    assert covered.min() >= 1
    for starts, length, span in ((grid.ys, height, grid.tile_height), (grid.xs, width, grid.tile_width)):
        assert starts[0] == 0 and starts[-1] + span == length
        assert all(b - a <= span - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap by >= overlap
        # The fewest tiles: one fewer could not cover the axis with that overlap.
        assert (len(starts) - 1) * (tile - overlap) + overlap < length or len(starts) == 1
    image = np.random.default_rng(0).random((height, width)).astype(np.float32)
    # A map that is the same whatever tile computes it comes back exactly: the weights are a partition of one.
    np.testing.assert_allclose(stitch_map(grid, lambda box: image[box.slices]), image, atol=1e-6)


def defect_image(size: int, centre: tuple[int, int]) -> np.ndarray:
    """Textured surface with a bright crack-like defect through `centre`."""
    rng = np.random.default_rng(1)
    image = (0.4 + 0.05 * rng.standard_normal((size, size))).astype(np.float32)
    cv2.line(image, (centre[0] - 40, centre[1] - 25), (centre[0] + 45, centre[1] + 30), 0.95, 3)
    cv2.circle(image, centre, 6, 0.9, -1)
    return image


def blurred(image: np.ndarray) -> np.ndarray:
    """A stand-in for a network's map: depends on ~10 px of context, reflects at the tile's edges."""
    return cv2.GaussianBlur(image, (0, 0), 3.0, borderType=cv2.BORDER_REFLECT_101)


def test_a_defect_across_tile_borders_stitches_without_seams():
    grid = TileGrid(400, 400, 160, 48)
    assert grid.ys == grid.xs == (0, 80, 160, 240)
    # The defect sits where four tiles meet, across the borders of the second tile row and column.
    image = defect_image(400, centre=(grid.xs[1] + 20, grid.ys[1] + 20))
    whole = blurred(image)
    stitched = stitch_map(grid, lambda box: blurred(image[box.slices]))
    # Without blending (each pixel from the last tile that covers it) the tile edges show.
    hard = np.zeros_like(whole)
    for box in grid.boxes():
        hard[box.slices] = blurred(image[box.slices])

    defect_region = (slice(60, 240), slice(60, 240))
    assert np.abs(stitched - whole).max() < 2e-3
    assert np.abs(hard - whole)[defect_region].max() > 10 * np.abs(stitched - whole)[defect_region].max()
    assert np.abs(hard - whole).max() > 0.05  # the test can fail: a hard seam is a visible error

    # No seam: the step across every tile border is what the whole-image map has there.
    for border in {box.y0 for box in grid.boxes()} | {box.y1 for box in grid.boxes()} - {0, 400}:
        if 0 < border < 400:
            step = np.abs(stitched[border] - stitched[border - 1])
            whole_step = np.abs(whole[border] - whole[border - 1])
            assert np.abs(step - whole_step).max() < 2e-3
    for border in {box.x0 for box in grid.boxes()} | {box.x1 for box in grid.boxes()}:
        if 0 < border < 400:
            step = np.abs(stitched[:, border] - stitched[:, border - 1])
            whole_step = np.abs(whole[:, border] - whole[:, border - 1])
            assert np.abs(step - whole_step).max() < 2e-3
    # The defect's outline is the whole image's.
    np.testing.assert_array_equal(stitched > 0.6, whole > 0.6)


def test_stitching_hands_back_rows_as_soon_as_they_are_final_and_holds_one_band():
    grid = TileGrid(2048, 1536, 256, 64)
    computed: list[int] = []

    def tile_map(box):  # type: ignore[no-untyped-def]
        computed.append(1)
        return np.full(box.shape, 0.5, np.float32)

    bands = stitched_rows(grid, map_tiles(grid, tile_map))
    first_row, rows = next(bands)
    assert first_row == 0 and len(rows) == grid.ys[1]
    assert len(computed) == len(grid.xs)  # only the first tile row was computed
    first_rows = len(rows)
    buffers = {id(rows.base)}
    rest = 0
    for _, rows in bands:
        rest += len(rows)
        buffers.add(id(rows.base if rows.base is not None else rows))
    assert first_rows + rest == grid.height and len(computed) == len(grid)
    assert len(buffers) == 1  # one band reused from tile row to tile row

    tracemalloc.start()
    try:
        out = stitch_map(grid, tile_map)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tile_bytes = 256 * 256 * 4
    # The output map, the one band and a few tiles' temporaries.
    assert peak <= out.nbytes + grid.band_bytes() + 6 * tile_bytes
    assert peak < out.nbytes + 0.2 * out.nbytes * len(grid) / len(grid.xs)  # far less than all the tiles
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_cancel_stops_between_tiles():
    from defect_studio.jobs import CancelToken, JobCancelled

    cancel = CancelToken()
    grid = TileGrid(512, 512, 128, 32)
    calls: list[int] = []

    def tile_map(box):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            cancel.cancel()
        return np.zeros(box.shape, np.float32)

    with pytest.raises(JobCancelled):
        stitch_map(grid, tile_map, cancel)
    assert len(calls) == 3


def test_auto_keeps_small_images_whole_and_tiles_large_ones():
    auto = Tiling()
    assert auto.grid_for(1024, 1024) is None  # today's behaviour for images that fit in one tile
    strip = auto.grid_for(100, 16_000)  # a thin 1.6 MP strip: one row of tiles as high as the strip
    assert strip is not None and strip.ys == (0,) and strip.tile_height == 100
    grid = auto.grid_for(2000, 16_000)  # a 32 MP line-scan strip
    assert grid is not None and len(grid.xs) == len(axis_starts(16_000, 1024, 128)) == 18
    assert grid.tile_width == 1024  # 18 tiles of 1024 px with 128 px overlap just cover 16 000 px
    assert grid.ys == (0, 616, 1232) and grid.tile_height == 768  # 3 rows, shrunk to 768 px (2 cannot overlap 128)
    assert Tiling("whole").grid_for(10_000, 10_000) is None
    assert Tiling("tiles", 256, 32).grid_for(300, 300) is not None
    assert choose_tiling([(512, 512), (1024, 768)]).mode == "whole"
    assert choose_tiling([(512, 512), (10_000, 10_000)]).mode == "auto"
    assert Tiling.from_dict(Tiling("tiles", 512, 64).to_dict()) == Tiling("tiles", 512, 64)
    assert Tiling.from_dict(None) == Tiling()
    image = np.random.default_rng(0).random((50, 60, 1)).astype(np.float32)
    np.testing.assert_array_equal(tiled_map(image, lambda pixels: pixels[:, :, 0] * 2), image[:, :, 0] * 2)


def test_bad_tile_settings_get_clear_messages():
    with pytest.raises(DataError, match=r"tile size \(2048 px\) is larger than the image \(1000 × 800 px\)"):
        Tiling("tiles", 2048, 128).grid_for(800, 1000)
    with pytest.raises(DataError, match="overlap must be a whole number of pixels from 0 to half the tile size"):
        Tiling("tiles", 256, 200)
    with pytest.raises(DataError, match="tile size must be a whole number of pixels, at least 32"):
        TileGrid(100, 100, 8, 0)
    with pytest.raises(DataError, match="tiling mode must be one of auto, whole, tiles"):
        Tiling("mosaic")
    with pytest.raises(DataError, match="unknown tiling settings: size"):
        Tiling.from_dict({"size": 3})


def test_top_values_over_bands_are_the_top_values_of_the_whole():
    rng = np.random.default_rng(3)
    parts = [rng.random(n).astype(np.float32) for n in (5, 1000, 3, 400)]
    top = TopValues(16)
    for part in parts:
        top.add(part)
    whole = np.sort(np.concatenate(parts))[-16:]
    assert np.isclose(top.mean(), whole.mean())
