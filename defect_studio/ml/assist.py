"""Assisted masks: a click or a loose stroke inside a defect grows into the defect's region.

`grow_region` works on a window around the stroke only (so a click on a 4k × 4k image costs what it
costs on a small one) and returns that window's box and the grown region inside it; the caller merges
it into the mask (`merge_region`), which the editor does as one undo step of that box.

Seeds, as GrabCut's mask labels (watershed uses the same definite ones as markers):
- the stroke (drawn with the brush's radius) is definite defect;
- `background` strokes are definite background;
- the window's edges that lie inside the image are definite background (the defect is assumed to
  fit in the window); edges on the image border are not, so defects that touch the border still grow
  to it;
- a prior (the round's proposal or a CAM, >= 0.5 is defect) marks probable defect, the rest of the
  window is probable background.
Only the grown parts connected to the stroke are kept: a look-alike patch of texture elsewhere in the
window is not the defect the user pointed at. A GrabCut region that presses on the window's edges
gets a larger window (the defect is larger than the stroke suggested); one that still does, or a
watershed flood up to the edges, had no edge to stop it, and only the stroke itself is returned, with
a message saying so.

The `segmenter` method reads no pixels: it grows the stroke over the segmenter's own prediction
(`prior`, calibrated so that 0.5 is the segmenter's threshold: `ml.pseudo.calibrate_probability`).
Where the stroke touches a predicted region, that region is taken; where the segmenter missed the
defect, its weaker evidence is followed: the pixels above half the highest probability under the
stroke, connected to the stroke.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

ASSIST_METHODS = ("grabcut", "watershed")  # the methods that grow from the image's pixels
SEGMENTER_METHOD = "segmenter"  # grows over the segmenter's prediction (given as `prior`)
MIN_SEGMENTER_LEVEL = 0.05  # the segmenter method follows no probability below this
DEFAULT_ASSIST_METHOD = "grabcut"  # bench assist: fewer actions per Magnetic Tile mask than watershed
MIN_MARGIN = 12  # px around the stroke: a click on a small pit still sees its edge
MARGIN_FACTOR = 0.5  # and half the stroke's extent: a long stroke along a crack grows sideways
PRIOR_REACH = 2.0  # a prior component touching the stroke widens the window by at most this × the stroke's extent
MAX_WORK_PIXELS = 40_000  # larger windows are shrunk for the segmentation, then the result is enlarged
GRABCUT_ITERATIONS = 3
MAX_WINDOW_STEPS = 2  # GrabCut: a region pressing on the window's edge doubles the margin, at most this often
WATERSHED_SMOOTHING = 2.0  # Gaussian sigma, px: the flooding follows the defect's edge, not the grain of the texture
FRAME_WIDTH = 2
LEAK_SHARE = 0.5  # a region filling more than this share of a window without inner edges has leaked
CROWDED_EDGE_SHARE = 0.1  # "pressing": this share of the pixels along the window's inner edges is defect

Point = tuple[int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends), image pixels


@dataclass(frozen=True)
class GrownRegion:
    """The window (`box`) around the stroke and the grown defect inside it (bool, box-sized)."""

    box: Box
    region: np.ndarray
    message: str = ""  # why nothing grew, or a note on what happened; empty when all went as asked

    @property
    def empty(self) -> bool:
        return not self.region.any()


def draw_stroke(canvas: np.ndarray, points: Sequence[Point], radius: int, value: int, offset: Point = (0, 0)) -> None:
    """Draw a round-capped polyline of `radius` through `points` (image coordinates) on `canvas`,
    whose top-left pixel is image pixel `offset` (the way the editor's brush draws)."""
    radius = max(0, int(radius))
    local = [(int(x) - offset[0], int(y) - offset[1]) for x, y in points]
    if not local:
        return
    for point in local:
        cv2.circle(canvas, point, radius, value, -1, cv2.LINE_8)
    for start, end in zip(local, local[1:]):
        cv2.line(canvas, start, end, value, 2 * radius + 1, cv2.LINE_8)


def to_uint8_bgr(pixels: np.ndarray) -> np.ndarray:
    """Any image (gray, gray + channel axis, RGB, RGBA; uint8, uint16 or float) as 8-bit 3-channel.

    Deeper-than-8-bit and float data are stretched between the window's 0.5 and 99.5 percentiles:
    a 12-bit camera image keeps its contrast. The channel order does not matter to the methods."""
    image = np.asarray(pixels)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] >= 4:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        values = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 0.0)
        if high <= low:
            high = low + 1.0
        image = np.clip((values - low) * (255.0 / (high - low)) + 0.5, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(image)


def _draw_strokes(canvas: np.ndarray, strokes: Sequence[np.ndarray], radius: int, offset: Point) -> None:
    for points in strokes:
        draw_stroke(canvas, [tuple(p) for p in points], radius, 1, offset)


def _stroke_box(strokes: Sequence[np.ndarray], radius: int) -> Box:
    every = np.concatenate(strokes)
    x0, y0 = every.min(axis=0) - radius
    x1, y1 = every.max(axis=0) + radius + 1
    return int(x0), int(y0), int(x1), int(y1)


def _prior_reach(shape: tuple[int, int], strokes: Sequence[np.ndarray], radius: int, pad: int, prior: np.ndarray) -> Box:
    """The stroke's box widened to the prior components under the stroke (at most PRIOR_REACH × its extent)."""
    height, width = shape
    x0, y0, x1, y1 = _stroke_box(strokes, radius)
    extent = max(x1 - x0, y1 - y0)
    reach = pad + int(PRIOR_REACH * max(extent, MIN_MARGIN))
    wx0, wy0 = max(0, x0 - reach), max(0, y0 - reach)
    wx1, wy1 = min(width, x1 + reach), min(height, y1 + reach)
    window = (np.asarray(prior[wy0:wy1, wx0:wx1], np.float32) >= 0.5).astype(np.uint8)
    if window.any():
        _, labels = cv2.connectedComponents(window, connectivity=8)
        seeds = np.zeros_like(window)
        _draw_strokes(seeds, strokes, radius, (wx0, wy0))
        touched = np.unique(labels[(seeds > 0) & (labels > 0)])
        if touched.size:
            ys, xs = np.nonzero(np.isin(labels, touched))
            x0, y0 = min(x0, wx0 + int(xs.min())), min(y0, wy0 + int(ys.min()))
            x1, y1 = max(x1, wx0 + int(xs.max()) + 1), max(y1, wy0 + int(ys.max()) + 1)
    return x0, y0, x1, y1


def _interior_frame(shape: tuple[int, int], box: Box, image_shape: tuple[int, int]) -> np.ndarray:
    """The window's frame, FRAME_WIDTH pixels wide, on the sides that lie inside the image (not on its
    border). Two pixels: cv2.watershed overwrites the outermost pixel of its markers with boundary."""
    height, width = shape
    frame = np.zeros(shape, bool)
    x0, y0, x1, y1 = box
    if x0 > 0:
        frame[:, :FRAME_WIDTH] = True
    if y0 > 0:
        frame[:FRAME_WIDTH, :] = True
    if x1 < image_shape[1]:
        frame[:, width - FRAME_WIDTH:] = True
    if y1 < image_shape[0]:
        frame[height - FRAME_WIDTH:, :] = True
    return frame


def _grabcut(work: np.ndarray, fg: np.ndarray, bg: np.ndarray, probable: np.ndarray | None) -> np.ndarray:
    labels = np.full(fg.shape, cv2.GC_PR_BGD, np.uint8)
    if probable is not None:
        labels[probable] = cv2.GC_PR_FGD
    labels[bg] = cv2.GC_BGD
    labels[fg] = cv2.GC_FGD
    background_samples = int(np.count_nonzero((labels == cv2.GC_BGD) | (labels == cv2.GC_PR_BGD)))
    # The colour models are 5-component mixtures fitted by k-means: each side needs a few samples.
    if background_samples < 5 or np.count_nonzero(fg) < 5:
        raise ValueError("too few seed pixels")
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    cv2.grabCut(work, labels, None, background_model, foreground_model, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def _watershed(work: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    if not bg.any():
        raise ValueError("no background seed")
    markers = np.zeros(fg.shape, np.int32)
    markers[bg] = 1
    markers[fg] = 2
    cv2.watershed(cv2.GaussianBlur(work, (0, 0), WATERSHED_SMOOTHING), markers)
    return markers == 2


def to_work_map(values: np.ndarray, work_shape: tuple[int, int]) -> np.ndarray:
    """A float map resized to the working window (unchanged when it already has that size)."""
    if values.shape == work_shape:
        return values
    return cv2.resize(values, (work_shape[1], work_shape[0]), interpolation=cv2.INTER_AREA)


def _over_prediction(probability: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The segmenter method: its predicted region (>= 0.5) under the stroke, or, where it predicted
    none there, the pixels above half the highest probability under the stroke (at least
    MIN_SEGMENTER_LEVEL); only what connects to the stroke is kept by the caller."""
    under = float(probability[seeds].max()) if seeds.any() else 0.0
    level = 0.5 if under >= 0.5 else max(MIN_SEGMENTER_LEVEL, 0.5 * under)
    if under < MIN_SEGMENTER_LEVEL:
        raise ValueError("the segmenter sees nothing under the stroke")
    return probability >= level


def _without_holes(region: np.ndarray) -> np.ndarray:
    """The region with its enclosed holes filled: a defect is a solid patch, and a hole GrabCut leaves in
    it (a bright speck inside a pit) is one more correction the user would have to make."""
    outside = np.pad(region.astype(np.uint8), 1)
    flood = np.zeros((outside.shape[0] + 2, outside.shape[1] + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2, flags=4)
    return outside[1:-1, 1:-1] != 2


def _connected_to(region: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    count, labels = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
    if count <= 1:
        return region & seeds
    kept = np.unique(labels[seeds & region])
    return np.isin(labels, kept[kept > 0])


def grow_region(
    image: np.ndarray,
    strokes: Sequence[Sequence[Point]],
    radius: int = 2,
    *,
    background: Sequence[Sequence[Point]] = (),
    prior: np.ndarray | None = None,
    method: str = DEFAULT_ASSIST_METHOD,
    margin: int | None = None,
) -> GrownRegion:
    """Grow the defect under `strokes` (polylines of image pixel points, drawn `radius` wide; a
    stroke of one point is a click).

    `image` is the image's native pixels (H×W or H×W×C, any depth); `prior` an H×W map of the same
    size (bool or [0, 1]; >= 0.5 is probable defect) or None; `background` strokes mark pixels that are
    surely not the defect. Only a window around the strokes is read. When the grown region runs into
    the window's edge, the window is doubled (up to MAX_WINDOW_STEPS times): the defect is larger than
    the stroke suggested. The region always holds the strokes' own pixels inside the image.
    """
    if method not in (*ASSIST_METHODS, SEGMENTER_METHOD):
        raise ValueError(f"unknown assist method {method!r}; expected one of {', '.join((*ASSIST_METHODS, SEGMENTER_METHOD))}")
    if method == SEGMENTER_METHOD and prior is None:
        raise ValueError("the segmenter assist grows over the segmenter's prediction: pass it as `prior` "
                         "(train a segmenter first)")
    height, width = image.shape[:2]
    radius = max(1, int(radius))  # a one-pixel seed is too few samples for a colour model
    polylines = [np.array([(int(round(x)), int(round(y))) for x, y in stroke], np.int64).reshape(-1, 2) for stroke in strokes]
    polylines = [points for points in polylines
                 if ((points[:, 0] > -radius - 1) & (points[:, 0] < width + radius)
                     & (points[:, 1] > -radius - 1) & (points[:, 1] < height + radius)).any()]
    if not polylines:
        return GrownRegion((0, 0, 0, 0), np.zeros((0, 0), bool), "The stroke is outside the image: nothing to grow.")
    if prior is not None and prior.shape[:2] != (height, width):
        raise ValueError(f"the prior is {prior.shape[1]} × {prior.shape[0]}, the image {width} × {height}")
    backgrounds = [np.array(stroke, np.int64).reshape(-1, 2) for stroke in background if len(stroke)]
    sx0, sy0, sx1, sy1 = _stroke_box(polylines, radius)
    pad = int(margin) if margin is not None else max(MIN_MARGIN, int(MARGIN_FACTOR * max(sx1 - sx0, sy1 - sy0)))
    for step in range(MAX_WINDOW_STEPS + 1):
        inner = _prior_reach((height, width), polylines, radius, pad, prior) if prior is not None else (sx0, sy0, sx1, sy1)
        box = (max(0, inner[0] - pad), max(0, inner[1] - pad), min(width, inner[2] + pad), min(height, inner[3] + pad))
        region, message, crowded = _grow_in_window(image, box, polylines, backgrounds, radius, prior, method)
        # Watershed always floods up to the frame where no edge stops it: a larger window would only flood more.
        if crowded and method != "watershed" and box != (0, 0, width, height) and step < MAX_WINDOW_STEPS:
            pad *= 2
            continue
        no_frame = not _interior_frame(region.shape, box, (height, width)).any()
        if crowded or (no_frame and region.mean() > LEAK_SHARE):
            # The region still presses on the window's edges, or (a window with no edge inside the
            # image) covers most of it: no edge held the growth back. Keep what the user marked.
            seeds = np.zeros(region.shape, np.uint8)
            _draw_strokes(seeds, polylines, radius, (box[0], box[1]))
            return GrownRegion(box, seeds > 0, "No clear edge around the stroke: only the stroke itself was marked "
                                                "(draw it wider, or use the brush).")
        return GrownRegion(box, region, message)
    raise AssertionError("unreachable")


def _grow_in_window(image: np.ndarray, box: Box, polylines: Sequence[np.ndarray], backgrounds: Sequence[np.ndarray],
                    radius: int, prior: np.ndarray | None, method: str) -> tuple[np.ndarray, str, bool]:
    """(region, message, crowded): `crowded` when the region presses on the window's inner edges."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box
    crop_shape = (y1 - y0, x1 - x0)
    seeds = np.zeros(crop_shape, np.uint8)
    _draw_strokes(seeds, polylines, radius, (x0, y0))
    fg = seeds > 0
    if not fg.any():
        return fg, "The stroke is outside the image: nothing to grow.", False

    # Shrink a large window for the segmentation itself: the cost stays bounded on a 4k image.
    scale = min(1.0, float(np.sqrt(MAX_WORK_PIXELS / float(crop_shape[0] * crop_shape[1]))))
    work = to_uint8_bgr(image[y0:y1, x0:x1])
    work_shape = crop_shape
    if scale < 1.0:
        work_shape = (max(1, int(round(crop_shape[0] * scale))), max(1, int(round(crop_shape[1] * scale))))
        work = cv2.resize(work, (work_shape[1], work_shape[0]), interpolation=cv2.INTER_AREA)

    def to_work(mask: np.ndarray) -> np.ndarray:
        if scale == 1.0:
            return mask
        return cv2.resize(mask.astype(np.uint8), (work_shape[1], work_shape[0]), interpolation=cv2.INTER_NEAREST) > 0

    work_fg = to_work(fg)
    if not work_fg.any():  # a thin stroke vanished in the shrink: keep a trace of it
        grown_seeds = cv2.dilate(fg.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=int(np.ceil(1 / scale)))
        work_fg = to_work(grown_seeds > 0)
    frame = _interior_frame(work_shape, box, (height, width))
    bg = frame.copy()
    if len(backgrounds):
        background_seeds = np.zeros(crop_shape, np.uint8)
        _draw_strokes(background_seeds, backgrounds, radius, (x0, y0))
        bg |= to_work(background_seeds > 0)
    bg &= ~work_fg
    probable = to_work(np.asarray(prior[y0:y1, x0:x1], np.float32) >= 0.5) if prior is not None else None

    message = ""
    try:
        if method == SEGMENTER_METHOD:
            assert prior is not None
            grown = _over_prediction(to_work_map(np.asarray(prior[y0:y1, x0:x1], np.float32), work_shape), work_fg)
        elif method == "grabcut":
            grown = _grabcut(work, work_fg, bg, probable)
        else:
            grown = _watershed(work, work_fg, bg)
    except (ValueError, cv2.error):
        grown = work_fg
        message = ("The segmenter sees no defect under the stroke: only the stroke itself was marked."
                   if method == SEGMENTER_METHOD else "No room to grow around the stroke: only the stroke itself was marked.")
    grown = _without_holes(_connected_to(grown | work_fg, work_fg))
    if not message and not (grown & ~work_fg).any():
        message = "Nothing grew beyond the stroke: no edge or contrast around it to follow."
    # Pressing on the window's edge: the pixels just inside the (background) frame are mostly defect.
    next_to_frame = cv2.dilate(frame.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~frame
    crowded = bool(next_to_frame.any()) and grown[next_to_frame].mean() > CROWDED_EDGE_SHARE
    if scale < 1.0:
        grown = cv2.resize(grown.astype(np.uint8), (crop_shape[1], crop_shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return grown | fg, message, crowded


def merge_region(mask: np.ndarray, grown: GrownRegion, subtract: bool = False) -> bool:
    """Add the grown region to `mask` (H×W, changed in place), or remove it; True if a pixel changed."""
    x0, y0, x1, y1 = grown.box
    if grown.empty:
        return False
    window = mask[y0:y1, x0:x1]
    if subtract:
        changed = bool((window.astype(bool) & grown.region).any())
        window[grown.region] = 0
    else:
        changed = bool((~window.astype(bool) & grown.region).any())
        window[grown.region] = 1
    return changed
