"""Tiles at native resolution: a grid of overlapping tiles over a large image, and the stitching of
per-tile maps (probabilities, heatmaps) into one map of the whole image with no visible seams.

Why tiles: a network's activations grow with the pixels it sees (the segmenter's first stage alone
holds 32 floats per quarter pixel: 3.2 GB for a 100 MP image), and a 3 px pit vanishes when a large
image is shrunk to fit. A tile of `tile_size` pixels is computed at the image's own resolution, so
memory is bounded by the tile, and time grows linearly with the pixels.

Blending: neighbouring tiles overlap by at least `overlap` pixels. Each tile's map is weighted by a
separable window, 1 in its middle and a raised-cosine ramp over the `overlap` pixels on each side
that another tile covers (no ramp at the image's edges); the weights are divided by their sum over
all tiles at each pixel, which for a separable window on a regular grid is the product of the two
1-D sums, so the stitched map needs no weight map. A pixel near a tile's border, where the network
sees the least context, counts least, and the map changes smoothly from one tile to the next.

Bounded memory: `stitched_rows` takes the tiles in row-major order and hands back each band of rows
as soon as no later tile touches it, so it holds one band (a tile's height × the image's width, reused
from one tile row to the next) and never all the tiles; `stitch_map` writes the bands into one
float32 map.

Qt-free and torch-free (numpy only): `defect_studio.predict`, the production line's inference, uses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from defect_studio.errors import DataError

TILING_MODES = ("auto", "whole", "tiles")
LARGE_MAP_DTYPE = np.float16  # a map of an image above one tile of pixels: 2 bytes a pixel, [0, 1] needs no more
DEFAULT_TILE_SIZE = 1024
DEFAULT_OVERLAP = 128
# "auto" keeps an image that fits in one tile whole, as every image was before tiles (the same masks as
# before for small images); above that, tiles bound the memory: the default segmenter needed 1.1 GB for
# a whole 4 MP image against 80 MB more for 16 MP by tiles, at the same seconds per megapixel
# (docs/benchmarks/scale.md).
WHOLE_IMAGE_MAX_PIXELS = DEFAULT_TILE_SIZE * DEFAULT_TILE_SIZE
MIN_TILE_SIZE = 32


class TileBox(NamedTuple):
    """The pixels [y0, y1) × [x0, x1) of one tile."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


TILE_ALIGN = 32  # px: tiles shrunk to fit an axis stay a multiple of the networks' stride (no padding)


def axis_tiles(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(span, starts) of the tiles along one axis: the fewest tiles of at most `tile` pixels that
    overlap their neighbours by at least `overlap`, each shrunk to just cover the axis (rounded up to
    `TILE_ALIGN`) and spread evenly from the first pixel to the last, so the overlap costs no more
    than it must; one tile as long as the axis when it is no longer than a tile."""
    if length <= tile:
        return length, [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    span = min(tile, math.ceil(math.ceil((length + (count - 1) * overlap) / count) / TILE_ALIGN) * TILE_ALIGN)
    # Neighbours start at most ceil((length - span) / (count - 1)) <= span - overlap apart.
    return span, [round(index * (length - span) / (count - 1)) for index in range(count)]


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    return axis_tiles(length, tile, overlap)[1]


def raised_cosine_ramp(overlap: int) -> np.ndarray:
    """`overlap` weights rising smoothly from near 0 to near 1; a ramp and its mirror sum to 1."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)).astype(np.float64)


def normalised_axis_windows(length: int, starts: Sequence[int], span: int, overlap: int) -> list[np.ndarray]:
    """Per tile along one axis: its 1-D window divided by the sum of all windows at each pixel, so
    that the windows of the tiles covering any pixel sum to exactly 1."""
    ramp = raised_cosine_ramp(overlap) if overlap > 0 else np.zeros(0)
    windows = []
    total = np.zeros(length, np.float64)
    for index, start in enumerate(starts):
        window = np.ones(span, np.float64)
        if overlap and index > 0:  # a tile before this one covers its first `overlap` pixels
            window[:overlap] = ramp
        if overlap and index < len(starts) - 1:
            window[-overlap:] = np.minimum(window[-overlap:], ramp[::-1])
        total[start : start + span] += window
        windows.append(window)
    # Every pixel has a weight of at least 1 in total: where a tile ramps up, the one before it covers
    # the pixel with a weight that makes up the difference (their overlap is at least `overlap`).
    return [(window / total[start : start + span]).astype(np.float32) for window, start in zip(windows, starts)]


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles of `tile_size` over a height × width image (an axis shorter than a tile has
    one tile as long as the axis)."""

    height: int
    width: int
    tile_size: int
    overlap: int
    ys: tuple[int, ...] = field(init=False)  # the tile rows' first pixel rows
    xs: tuple[int, ...] = field(init=False)
    tile_height: int = field(init=False)  # at most tile_size: shrunk to cover the axis with the fewest tiles
    tile_width: int = field(init=False)

    def __post_init__(self) -> None:
        check_tile_settings(self.tile_size, self.overlap)
        if self.height < 1 or self.width < 1:
            raise DataError(f"an image of {self.width} × {self.height} pixels has nothing to tile.")
        if self.tile_size > self.height and self.tile_size > self.width:
            raise DataError(
                f"the tile size ({self.tile_size} px) is larger than the image ({self.width} × {self.height} px): "
                "compute it whole (tiling 'whole' or 'auto') or choose tiles at most "
                f"{max(self.height, self.width)} px."
            )
        tile_height, ys = axis_tiles(self.height, self.tile_size, self.overlap)
        tile_width, xs = axis_tiles(self.width, self.tile_size, self.overlap)
        for name, value in (("ys", tuple(ys)), ("xs", tuple(xs)), ("tile_height", tile_height), ("tile_width", tile_width)):
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def boxes(self) -> Iterator[TileBox]:
        """Every tile, row by row (the order `stitched_rows` expects)."""
        for y0 in self.ys:
            for x0 in self.xs:
                yield TileBox(y0, x0, y0 + self.tile_height, x0 + self.tile_width)

    def band_bytes(self) -> int:
        """The stitcher's working memory: one float32 band of tile rows across the image."""
        return self.tile_height * self.width * 4


def check_tile_settings(tile_size: int, overlap: int) -> None:
    if int(tile_size) != tile_size or tile_size < MIN_TILE_SIZE:
        raise DataError(f"the tile size must be a whole number of pixels, at least {MIN_TILE_SIZE} (got {tile_size!r}).")
    if int(overlap) != overlap or not 0 <= overlap <= tile_size // 2:
        raise DataError(
            f"the tile overlap must be a whole number of pixels from 0 to half the tile size ({tile_size // 2}), "
            f"got {overlap!r}."
        )


@dataclass(frozen=True)
class Tiling:
    """How images are cut for a network: "whole" (as before tiles), "tiles" (always), or "auto":
    whole up to `whole_image_max_pixels`, tiles above."""

    mode: str = "auto"
    tile_size: int = DEFAULT_TILE_SIZE
    overlap: int = DEFAULT_OVERLAP
    whole_image_max_pixels: int = WHOLE_IMAGE_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in TILING_MODES:
            raise DataError(f"tiling mode must be one of {', '.join(TILING_MODES)}, got {self.mode!r}.")
        check_tile_settings(self.tile_size, self.overlap)
        if int(self.whole_image_max_pixels) != self.whole_image_max_pixels or self.whole_image_max_pixels < 1:
            raise DataError(f"whole_image_max_pixels must be a positive whole number, got {self.whole_image_max_pixels!r}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "Tiling":
        """A tiling from its recorded settings (a model card, a checkpoint); None: the default ("auto")."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataError(f"unknown tiling settings: {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def grid_for(self, height: int, width: int) -> TileGrid | None:
        """The tile grid for a height × width image, or None when it is computed whole."""
        if self.mode == "whole" or (self.mode == "auto" and height * width <= self.whole_image_max_pixels):
            return None
        if self.mode == "auto" and self.tile_size > height and self.tile_size > width:
            return None  # auto never asks for a tile larger than the image
        return TileGrid(height, width, self.tile_size, self.overlap)


def choose_tiling(image_sizes: Iterable[tuple[int, int]], tile_size: int = DEFAULT_TILE_SIZE,
                  overlap: int = DEFAULT_OVERLAP, whole_image_max_pixels: int = WHOLE_IMAGE_MAX_PIXELS) -> Tiling:
    """A project's tiling from its images' (height, width): "whole" when every image is small enough
    (today's behaviour, the same masks as before tiles), else "auto": tiles for the large images only."""
    if all(height * width <= whole_image_max_pixels for height, width in image_sizes):
        return Tiling("whole", tile_size, overlap, whole_image_max_pixels)
    return Tiling("auto", tile_size, overlap, whole_image_max_pixels)


def stitched_rows(grid: TileGrid, tile_maps: Iterable[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """Blend per-tile maps, given in `grid.boxes()` order, and hand back the finished map row band by
    row band as (first row, float32 rows × width) as soon as no later tile touches those rows.

    One band of `grid.tile_height` rows is all it holds, never all tiles: the rows handed back are a
    view of it, valid until the next band is asked for (copy them, or use them at once), after which
    the rows the next tile row shares are moved to its top and the rest is cleared for reuse."""
    weights_y = normalised_axis_windows(grid.height, grid.ys, grid.tile_height, grid.overlap)
    weights_x = normalised_axis_windows(grid.width, grid.xs, grid.tile_width, grid.overlap)
    maps = iter(tile_maps)
    band = np.zeros((grid.tile_height, grid.width), np.float32)
    band_y0 = 0
    for row, y0 in enumerate(grid.ys):
        if y0 > band_y0:  # rows above this tile row are finished: no later tile reaches them
            finished = y0 - band_y0
            yield band_y0, band[:finished]
            band[: grid.tile_height - finished] = band[finished:]  # numpy copies overlapping ranges safely
            band[grid.tile_height - finished :] = 0.0
            band_y0 = y0
        for column, x0 in enumerate(grid.xs):
            try:
                tile_map = next(maps)
            except StopIteration:
                raise ValueError(f"stitched_rows got fewer tile maps than the grid's {len(grid)} tiles") from None
            if tile_map.shape != (grid.tile_height, grid.tile_width):
                raise ValueError(f"a tile map is {tile_map.shape}, its tile {(grid.tile_height, grid.tile_width)}")
            weighted = tile_map * weights_y[row][:, None]
            weighted *= weights_x[column][None, :]
            band[:, x0 : x0 + grid.tile_width] += weighted
    yield band_y0, band


def map_tiles(grid: TileGrid, compute_tile: Callable[[TileBox], np.ndarray],
              cancel: Any = None) -> Iterator[np.ndarray]:
    """`compute_tile(box)` for every tile in order, one at a time; `cancel` (a CancelToken) is checked
    before each."""
    for box in grid.boxes():
        if cancel is not None:
            cancel.raise_if_cancelled()
        yield np.asarray(compute_tile(box), np.float32)


def stitch_map(grid: TileGrid, compute_tile: Callable[[TileBox], np.ndarray], cancel: Any = None) -> np.ndarray:
    """The whole image's float32 map, blended from `compute_tile(box)` computed one tile at a time."""
    out = np.empty((grid.height, grid.width), np.float32)
    for y0, rows in stitched_rows(grid, map_tiles(grid, compute_tile, cancel)):
        out[y0 : y0 + len(rows)] = rows
    return out


def tiled_map(image: np.ndarray, map_of: Callable[[np.ndarray], np.ndarray], tiling: Tiling | None = None,
              cancel: Any = None) -> np.ndarray:
    """`map_of(image)` (an H×W map of an H×W[×C] image), computed by tiles when `tiling` says so
    (default: auto), else on the whole image as before."""
    grid = (tiling or Tiling()).grid_for(image.shape[0], image.shape[1])
    if grid is None:
        return map_of(image)
    return stitch_map(grid, lambda box: map_of(image[box.slices]), cancel)


class TopValues:
    """The `k` largest values seen over many arrays (an image's top-k probabilities, band by band)."""

    def __init__(self, k: int) -> None:
        self.k = max(1, int(k))
        self.values = np.empty(0, np.float32)

    def add(self, values: np.ndarray) -> None:
        flat = np.asarray(values, np.float32).ravel()
        if self.values.size >= self.k:  # only values above the k-th best so far can enter (no copy of a whole band)
            flat = flat[flat > self.values.min()]
        if flat.size > self.k:
            flat = np.partition(flat, flat.size - self.k)[flat.size - self.k :]
        merged = np.concatenate([self.values, flat])
        if merged.size > self.k:
            merged = np.partition(merged, merged.size - self.k)[merged.size - self.k :]
        self.values = merged

    def mean(self) -> float:
        return float(self.values.mean()) if self.values.size else 0.0


def tile_count(height: int, width: int, tiling: Tiling | None = None) -> int:
    grid = (tiling or Tiling()).grid_for(height, width)
    return 1 if grid is None else len(grid)

