"""Class activation maps of a large image by tiles, stitched at native resolution (issue 15).

Letterboxed whole, a 100 MP image reaches the classifier at its input size (128-256 px), where a
3 px pit is gone. Here each tile of the image (`ml.tiling`) goes through the public
`compute_cams` on its own, so the classifier looks at it at a far smaller shrink, and the tiles' maps
are blended into one map of the whole image with no seams.

Every CAM is min-max normalised per image, so a tile without any defect would still show its own
strongest texture at full strength. Each tile's map is therefore weighted by the classifier's defect
probability for that tile, the multiple-instance reading of an image-level tag (an image is defect
when some tile is): a tile the classifier calls good contributes little, whatever its CAM says.

A classifier trained on tiles (`ml.tile_training`) cuts the image as it trained, by its checkpoint's
tiling, and its tile probabilities are those it learned; one trained whole is cut by the fixed rule
below, its tile scores those of a model used at a smaller shrink than it trained at.

Bounded memory (issue 15): the image may be given as its decoded 8- or 16-bit pixels, each tile is made
float on its own, the tiles' maps are blended band by band of rows, and the stitched map is kept as
float16 (2 bytes a pixel; a CAM in [0, 1] needs no more, and the cache stores 16 bits).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from defect_studio.imageio import to_float01
from defect_studio.ml.cams import CamSpec, compute_cams
from defect_studio.ml.classifier_options import classifier_tile_grid
from defect_studio.ml.tiling import LARGE_MAP_DTYPE, MIN_TILE_SIZE, WHOLE_IMAGE_MAX_PIXELS, Tiling, map_tiles, stitched_rows


def cam_tiling(classifier: Any) -> Tiling:
    """The default tiling for CAMs: a classifier trained on tiles, its own; else tiles as large as the
    classifier's input, so it sees each at its own resolution (a 1024 px tile would be shrunk 8 times
    into a 128 px input, and a 3 px pit with it); an image that fits in one segmenter tile (1024 × 1024)
    is computed whole, as before."""
    trained = getattr(classifier, "tiling", None)
    if isinstance(trained, Tiling) and trained.mode != "whole":
        return trained
    size = max(MIN_TILE_SIZE, int(classifier.preprocessing.input_size))
    return Tiling("auto", size, size // 4, WHOLE_IMAGE_MAX_PIXELS)


@torch.no_grad()
def tile_defect_probability(classifier: Any, tile: np.ndarray) -> float:
    """The classifier's defect probability for one tile (a LoadedClassifier's own scoring when it has one)."""
    if hasattr(classifier, "predict_scores"):
        return float(classifier.predict_scores([tile])[0])
    batch, _ = classifier.preprocessing.prepare_batch([tile])
    model = classifier.model
    was_training = model.training
    model.eval()
    try:
        logit = model(batch.to(torch.device(getattr(classifier, "device", "cpu"))))
    finally:
        model.train(was_training)
    return float(torch.sigmoid(logit.float().reshape(-1)[0]))


def float_pixels(pixels: np.ndarray) -> np.ndarray:
    """Float H×W×C in [0, 1] of `pixels`: integer pixels (as `imageio.decode_image` gives) made float as
    `read_image` does, a float image taken as it is (already in [0, 1], as `read_image` gives)."""
    return pixels if pixels.dtype.kind == "f" else to_float01(pixels)


def tiled_cam(classifier: Any, image: np.ndarray, method: str | CamSpec, settings: dict[str, Any] | None = None,
              tiling: Tiling | None = None, cancel: Any = None) -> np.ndarray:
    """The CAM of `image` at its own resolution. `image`: float H×W×C in [0, 1], or its integer pixels
    (uint8/uint16, H×W or H×W×C, as `imageio.read_image_pixels` gives), made float one tile at a time.

    Computed whole, exactly as `compute_cams` (float32), when the tiling (default `cam_tiling`) keeps it
    whole; else per tile, each tile's map times its defect probability, blended, as float16. Values in
    [0, 1]; by tiles they are not re-normalised, so an image the classifier finds good everywhere keeps a
    low map."""
    spec = CamSpec.resolve(method, settings)
    grid = classifier_tile_grid(tiling or cam_tiling(classifier), image.shape[0], image.shape[1])
    if grid is None:
        return compute_cams(classifier, [float_pixels(image)], spec)[0]

    def weighted_tile_map(box: Any) -> np.ndarray:
        tile = float_pixels(image[box.slices])
        return compute_cams(classifier, [tile], spec)[0] * tile_defect_probability(classifier, tile)

    stitched = np.empty((grid.height, grid.width), LARGE_MAP_DTYPE)
    for y0, rows in stitched_rows(grid, map_tiles(grid, weighted_tile_map, cancel)):
        # rows handed back are finished: clipping them in place touches no later tile's sum
        stitched[y0 : y0 + len(rows)] = np.clip(rows, 0.0, 1.0, out=rows)
    return stitched
