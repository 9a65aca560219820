"""CAM maps on disk: the cache the GUI reads instantly, the `cam` job that fills it, 16-bit PNG heatmaps
(and the same store for the segmenter's maps that the next round's proposals fuse with the CAM).

A cached map is keyed by everything that determines it: the image's content hash, the classifier
checkpoint's hash, the method and its resolved settings (canonical JSON, so defaults spelled out
or left implicit give the same key). Maps are stored as 16-bit gray PNG (values 0..65535 for
[0, 1]; a quantisation step of 1.5e-5, far below any threshold anyone sets), written atomically.
A damaged cache file is treated as a miss and replaced.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Sequence

import cv2
import numpy as np

from defect_studio.atomic import atomic_write_bytes
from defect_studio.errors import ModelError
from defect_studio.jobs import CancelToken, EtaClock, Progress
from defect_studio.ml.cams.registry import CamSpec, canonical_settings, check_method
from defect_studio.ml.tiling import LARGE_MAP_DTYPE, WHOLE_IMAGE_MAX_PIXELS

if TYPE_CHECKING:
    from defect_studio.project.store import Project

CACHE_SUBDIR = "cams"
HEATMAP_SCALE = 65535.0
CAM_BATCH_SIZE = 8


HEATMAP_BAND_ROWS = 256  # rows quantised at a time: float temporaries of a band, not of a 100 MP map


def quantise_heatmap(cam_map: np.ndarray, dtype: type = np.uint16) -> np.ndarray:
    """A float map in [0, 1] (float16 or float32) -> 0..max of `dtype` (uint16 for the cache, uint8 for the
    screen), band by band of rows; NaN counts as 0."""
    values = np.asarray(cam_map)
    if values.ndim != 2:
        raise ValueError(f"a CAM map is 2-D, got shape {values.shape}")
    scale = float(np.iinfo(dtype).max)
    quantised = np.empty(values.shape, dtype)
    for y0 in range(0, values.shape[0], HEATMAP_BAND_ROWS):
        band = np.nan_to_num(values[y0 : y0 + HEATMAP_BAND_ROWS].astype(np.float32))
        quantised[y0 : y0 + HEATMAP_BAND_ROWS] = np.clip(band * scale + 0.5, 0, scale)
    return quantised


def encode_heatmap_png(cam_map: np.ndarray) -> bytes:
    """A float map in [0, 1] -> 16-bit gray PNG bytes."""
    ok, encoded = cv2.imencode(".png", quantise_heatmap(cam_map))
    if not ok:
        raise OSError("PNG encoding failed")
    return encoded.tobytes()


def decode_heatmap_png(data: bytes) -> np.ndarray | None:
    """16-bit gray PNG bytes -> map in [0, 1]; None if the bytes are not such a PNG. float32, except the
    map of an image above one segmenter tile of pixels: float16 (as `tiled_cam` makes it), converted band
    by band over the 16-bit pixels' own bytes (both are 2 bytes a pixel), so reading a 100 MP map costs its
    200 MB and a band, not the pixels and the map side by side (400 MB)."""
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16 or pixels.ndim != 2:
        return None
    if pixels.size <= WHOLE_IMAGE_MAX_PIXELS:
        values = pixels.astype(np.float32)
        values /= HEATMAP_SCALE  # in place: one float32 map, not two
        return values
    values = pixels.view(LARGE_MAP_DTYPE)
    for y0 in range(0, pixels.shape[0], HEATMAP_BAND_ROWS):
        # the band's float32 values are made before any of its bytes is overwritten; later bands are untouched
        values[y0 : y0 + HEATMAP_BAND_ROWS] = pixels[y0 : y0 + HEATMAP_BAND_ROWS] / np.float32(HEATMAP_SCALE)
    return values


def write_heatmap_png(path: str | Path, cam_map: np.ndarray) -> None:
    atomic_write_bytes(path, encode_heatmap_png(cam_map))


def read_heatmap_png(path: str | Path) -> np.ndarray | None:
    try:
        return decode_heatmap_png(Path(path).read_bytes())
    except OSError:
        return None


def cam_by_tiles(height: int, width: int, classifier: Any = None) -> bool:
    """Whether an image's CAMs are computed by tiles at its own resolution (ml/tiled_cams.py): as
    `classifier` cuts it (a classifier trained on tiles by its own tiling); without one, the default
    rule: above one segmenter tile of pixels by tiles, below whole, as before tiles. The cache key uses
    the default rule: a classifier with a tiling of its own has a checkpoint, so keys, of its own."""
    if classifier is not None:
        from defect_studio.ml.classifier_options import classifier_tile_grid
        from defect_studio.ml.tiled_cams import cam_tiling

        return classifier_tile_grid(cam_tiling(classifier), height, width) is not None
    return height * width > WHOLE_IMAGE_MAX_PIXELS


def _content_key(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class HeatmapStore:
    """Float maps in [0, 1] under `<cache_dir>/<SUBDIR>/`, one 16-bit PNG per content key, written atomically
    (so processes may fill one store side by side); a damaged file is a miss and is replaced."""

    SUBDIR = ""

    def __init__(self, cache_dir: str | Path) -> None:
        cache_dir = Path(cache_dir)
        self.root = cache_dir if cache_dir.name == self.SUBDIR else cache_dir / self.SUBDIR

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def _get(self, key: str, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """The map stored under `key`, or None; with `size` (height, width), None too for a map of another size."""
        path = self._path(key)
        if not path.is_file():
            return None
        heatmap = read_heatmap_png(path)
        if heatmap is None:  # damaged: forget it, it will be recomputed
            path.unlink(missing_ok=True)
        if heatmap is not None and size is not None and heatmap.shape != tuple(size):
            return None
        return heatmap

    def _put(self, key: str, heatmap: np.ndarray) -> Path:
        path = self._path(key)
        write_heatmap_png(path, heatmap)
        return path

    def clear(self) -> int:
        """Delete every cached map; returns how many."""
        removed = 0
        if self.root.is_dir():
            for path in self.root.rglob("*.png"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class CamCache(HeatmapStore):
    """CAM maps keyed by (image sha256, checkpoint sha256, method, settings) under `<cache_dir>/cams/`.

    `cache_dir` is the project's cache folder (`project.cache_dir`); passing its `cams` folder
    itself works too.
    """

    SUBDIR = CACHE_SUBDIR

    @staticmethod
    def key(image_sha256: str, checkpoint_sha256: str, method: str, settings: dict[str, Any] | None,
            size: tuple[int, int] | None = None) -> str:
        """`size` (height, width): an image large enough to be computed by tiles (cam_by_tiles) has maps of
        its own, never the whole-image map an earlier version cached for it."""
        check_method(method)
        record = {
            "image": image_sha256,
            "checkpoint": checkpoint_sha256,
            "method": method,
            "settings": json.loads(canonical_settings(method, settings)),
        }
        if size is not None and cam_by_tiles(*size):
            record["frame"] = "tiles"
        return _content_key(record)

    def path(self, image_sha256: str, checkpoint_sha256: str, method: str, settings: dict[str, Any] | None,
             size: tuple[int, int] | None = None) -> Path:
        return self._path(self.key(image_sha256, checkpoint_sha256, method, settings, size))

    def get(
        self, image_sha256: str, checkpoint_sha256: str, method: str, settings: dict[str, Any] | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray | None:
        """The cached map, or None; `size`: the image's (height, width), which every reader of a project's
        images passes (see `key`)."""
        return self._get(self.key(image_sha256, checkpoint_sha256, method, settings, size), size)

    def put(
        self, image_sha256: str, checkpoint_sha256: str, method: str, settings: dict[str, Any] | None,
        cam_map: np.ndarray,
    ) -> Path:
        return self._put(self.key(image_sha256, checkpoint_sha256, method, settings, cam_map.shape), cam_map)


class SegmenterMapCache(HeatmapStore):
    """A segmenter's defect probability per image (as the app predicts it, test-time flips included), keyed by
    (image sha256, segmenter checkpoint sha256) under `<cache_dir>/segmenter-maps/`: what the proposals of
    the next round fuse with the CAM, computed once, by `pseudo` or by its shards."""

    SUBDIR = "segmenter-maps"

    def get(self, image_sha256: str, segmenter_sha256: str, size: tuple[int, int] | None = None) -> np.ndarray | None:
        return self._get(_content_key({"image": image_sha256, "segmenter": segmenter_sha256}), size)

    def put(self, image_sha256: str, segmenter_sha256: str, probability: np.ndarray) -> Path:
        return self._put(_content_key({"image": image_sha256, "segmenter": segmenter_sha256}), probability)


def default_classifier_path(project: Project) -> Path:
    run = project.latest_run("classifier")
    if run is None:
        raise ModelError("this project has no trained classifier yet; train one first (defect-studio train PROJECT).")
    return Path(run.checkpoint_path)


def cam_job(
    project: Project,
    method: str | CamSpec,
    settings: dict[str, Any] | None,
    cancel: CancelToken,
    classifier_path: str | Path | None = None,
    write_png_dir: str | Path | None = None,
    image_ids: Sequence[int] | None = None,
    batch_size: int = CAM_BATCH_SIZE,
) -> Generator[Progress, None, dict[str, Any]]:
    """CAM maps for the project's images (default: all), from the cache or computed and cached.

    With `write_png_dir`, each map is also written there as a 16-bit PNG heatmap `<stem>.png`.
    Each cached map is complete when written, so a cancelled job keeps the maps it finished.
    """
    from defect_studio.imageio import read_image, read_image_pixels
    from defect_studio.ml.cams import compute_cams
    from defect_studio.ml.classifier import load_classifier
    from defect_studio.ml.tiled_cams import tiled_cam

    spec = CamSpec.resolve(method, settings)  # refuse bad settings before any work
    method, resolved = spec.method, spec.settings
    checkpoint = Path(classifier_path) if classifier_path is not None else default_classifier_path(project)
    started = time.perf_counter()
    yield Progress("loading classifier", 0, None, checkpoint.name)
    classifier = load_classifier(checkpoint)
    records = project.images() if image_ids is None else [project.image(i) for i in image_ids]
    cache = CamCache(project.cache_dir)
    png_dir = Path(write_png_dir) if write_png_dir is not None else None
    clock = EtaClock(len(records))
    computed = cached = tiled = 0

    def write_png_if_asked(record: Any, cam_map: np.ndarray) -> None:
        # at once, not held until the chunk ends: a chunk's maps of large images add up
        if png_dir is not None:
            write_heatmap_png(png_dir / f"{record.stem}.png", cam_map)

    yield clock.progress(f"{method} maps", 0)
    for start in range(0, len(records), max(1, batch_size)):
        cancel.raise_if_cancelled()
        chunk = records[start : start + batch_size]
        missing = []
        for record in chunk:
            hit = cache.get(record.sha256, classifier.checkpoint_sha256, method, resolved, (record.height, record.width))
            if hit is not None:
                write_png_if_asked(record, hit)
            else:
                missing.append(record)
        by_tiles = [cam_by_tiles(r.height, r.width, classifier) for r in missing]
        whole = [r for r, tiles in zip(missing, by_tiles) if not tiles]
        fresh = compute_cams(classifier, [read_image(r.path) for r in whole], spec, batch_size=batch_size) if whole else []
        for record, cam_map in zip(whole, fresh):
            cache.put(record.sha256, classifier.checkpoint_sha256, method, resolved, cam_map)
            write_png_if_asked(record, cam_map)
        for record in (r for r, tiles in zip(missing, by_tiles) if tiles):  # one large image at a time
            cam_map = tiled_cam(classifier, read_image_pixels(record.path), spec, cancel=cancel)  # float by tiles
            cache.put(record.sha256, classifier.checkpoint_sha256, method, resolved, cam_map)
            write_png_if_asked(record, cam_map)
            del cam_map  # before the next image's pixels are read
            tiled += 1
        computed += len(missing)
        cached += len(chunk) - len(missing)
        done = start + len(chunk)
        yield clock.progress(f"{method} maps", done, chunk[-1].stem, {"computed": computed, "cached": cached})
    return {
        "method": method,
        "settings": resolved,
        "classifier": str(checkpoint),
        "checkpoint_sha256": classifier.checkpoint_sha256,
        "images": len(records),
        "computed": computed,
        "cached": cached,
        "by_tiles": tiled,
        "png_dir": str(png_dir) if png_dir is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
