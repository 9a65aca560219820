"""A deterministic synthetic dataset of textured surfaces with scratches, pits, cracks and stains.

What it is for: the README's first command (`defect-studio demo`) builds a project on this dataset
and opens the app on it, so a newcomer sees the whole flow (tag, train, CAMs, masks, segmenter)
without any real data; and the tests use it as their fixture, because it is small, quick to make and
has exact ground-truth masks.

It writes the dataset layout of `defect_studio.dataset_layout`:

    OUT/images/<stem>.png     8-bit gray, or RGB for about a third of the images (tinted surfaces)
    OUT/masks/<stem>.png      0 background, 255 defect; same size as the image; all zero when good
    OUT/labels.csv            stem,label          good | defect
    OUT/split.csv             stem,split          train | test (about 25 % test, stratified, seeded)
    OUT/metadata.csv          stem,label,defect_type,width,height,mask_pixels   (defect_type none if good)

Surfaces come in three families: brushed metal (directional streaks over low-frequency shading),
a fabric-like weave (crossing threads with jitter) and speckled ceramic (fine grain with sparse
speckles); each gets an illumination gradient and sensor noise, and its own width and height, so
aspect ratios differ. A defect image carries one (sometimes two) defects of one kind. The mask is
exactly the set of pixels the defect changed by more than `ALTERATION_THRESHOLD`: outside the mask
the defect image is bit-for-bit the surface it was drawn on. Defects are far above the texture's
contrast, so a tiny CNN learns them in a few epochs, while the mean brightness of an image says
next to nothing (surfaces vary far more in brightness than any defect moves it).

The same seed always gives byte-identical files: every image draws from its own generator seeded
with (seed, index), and PNG encoding is deterministic.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator

import cv2
import numpy as np

from defect_studio.atomic import TEMP_SUFFIX, atomic_open, atomic_write_bytes, remove_stale_temporaries
from defect_studio.dataset_layout import stratified_split
from defect_studio.errors import DataError
from defect_studio.imageio import write_mask
from defect_studio.jobs import CancelToken, EtaClock, Progress, run_job

SURFACE_FAMILIES = ("metal", "weave", "ceramic")
DEFECT_KINDS = ("scratch", "pit", "crack", "stain")
TEST_FRACTION = 0.25
RGB_FRACTION = 1 / 3
SECOND_DEFECT_PROBABILITY = 0.2
# A pixel belongs to the mask when the defect moved it by more than this (in [0, 1] units, ~8 gray levels).
ALTERATION_THRESHOLD = 0.03
MIN_MASK_PIXELS = 5
TWO_PIXEL_KERNEL = np.ones((2, 2), np.uint8)  # dilating a 1-px line with it makes it 2 px wide
LAYOUT_NAMES = frozenset({"images", "masks", "labels.csv", "split.csv", "metadata.csv"})
DEMO_MARKER = ".defect-studio-demo"  # written first, so a run killed midway is recognised as ours
METADATA_HEADER = ["stem", "label", "defect_type", "width", "height", "mask_pixels"]
STEM_PATTERN = re.compile(r"^(?:%s)_\d{4,}$" % "|".join(SURFACE_FAMILIES))

# Per-family RGB gains for the tinted images (luminance stays roughly where the gray surface was).
FAMILY_TINTS = {
    "metal": [(0.93, 0.98, 1.08), (1.0, 1.0, 1.0), (1.06, 0.98, 0.9)],
    "weave": [(1.15, 0.95, 0.8), (0.8, 1.0, 1.15), (0.95, 1.08, 0.9), (1.12, 0.9, 1.0)],
    "ceramic": [(1.08, 1.0, 0.85), (1.0, 0.98, 0.95), (0.95, 1.0, 1.05)],
}


@dataclass(frozen=True)
class PlannedImage:
    """What one image will be, decided up front so the plan is balanced and order-independent."""

    index: int
    stem: str
    family: str
    defect_kind: str | None  # None for a good image
    is_rgb: bool


# ----------------------------------------------------------------------------------------------
# Surfaces: float32 H×W around 0 (texture only); base brightness and illumination are added later.


def _low_frequency(height: int, width: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth random field of unit-ish amplitude: a coarse grid of normals upsampled bicubically."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _unit_std(field: np.ndarray) -> np.ndarray:
    return field / max(float(field.std()), 1e-6)


def _brushed_metal(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    # Streaks: white noise smeared along the brushing direction with a line kernel (motion blur).
    angle = rng.uniform(-15.0, 15.0) + (90.0 if rng.random() < 0.3 else 0.0)
    length = int(rng.integers(15, 32)) | 1
    kernel = np.zeros((length, length), np.float32)
    centre = length // 2
    dx, dy = math.cos(math.radians(angle)) * centre, math.sin(math.radians(angle)) * centre
    cv2.line(kernel, (round(centre - dx), round(centre - dy)), (round(centre + dx), round(centre + dy)), 1.0, 1)
    kernel /= kernel.sum()
    noise = rng.standard_normal((height, width)).astype(np.float32)
    streaks = _unit_std(cv2.filter2D(noise, -1, kernel, borderType=cv2.BORDER_REFLECT))
    shading = _low_frequency(height, width, rng, cells=3)
    return rng.uniform(0.035, 0.05) * streaks + rng.uniform(0.03, 0.05) * shading


def _weave(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(6.0, 11.0)
    angle = math.radians(rng.uniform(-8.0, 8.0))
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    # Jitter: threads wander a little (low-frequency displacement), as real cloth does.
    jitter = 0.25 * period
    u = cols * math.cos(angle) + rows * math.sin(angle) + jitter * _low_frequency(height, width, rng, cells=4)
    v = -cols * math.sin(angle) + rows * math.cos(angle) + jitter * _low_frequency(height, width, rng, cells=4)
    u, v = u / period, v / period
    thread_u, thread_v = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    across_u, across_v = np.sin(np.pi * (u - thread_u)), np.sin(np.pi * (v - thread_v))
    # Each thread has its own brightness; the warp is on top where the cell parity is even.
    gains = 1.0 + 0.15 * rng.standard_normal(64).astype(np.float32)
    warp_on_top = ((thread_u + thread_v) & 1) == 0
    pattern = np.where(warp_on_top, across_u * gains[thread_u % 64], across_v * gains[(thread_v + 32) % 64])
    fibres = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 0.7)
    texture = rng.uniform(0.10, 0.14) * (pattern - pattern.mean()) + 0.015 * _unit_std(fibres)
    return texture.astype(np.float32) + 0.02 * _low_frequency(height, width, rng, cells=3)


def _speckled_ceramic(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    grain = _unit_std(cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 1.0))
    texture = rng.uniform(0.025, 0.04) * grain + rng.uniform(0.02, 0.035) * _low_frequency(height, width, rng, cells=5)
    # Sparse one-pixel speckles, much fainter than a pit so the two are not confused.
    speckle_count = int(height * width * rng.uniform(0.002, 0.005))
    rows = rng.integers(0, height, speckle_count)
    cols = rng.integers(0, width, speckle_count)
    texture[rows, cols] += rng.choice([-1.0, 1.0], speckle_count) * rng.uniform(0.06, 0.1, speckle_count)
    return texture


SURFACE_MAKERS = {"metal": _brushed_metal, "weave": _weave, "ceramic": _speckled_ceramic}


def _illumination(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A linear gradient in a random direction plus a mild vignette."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    rows, cols = rows / height - 0.5, cols / width - 0.5
    direction = rng.uniform(0.0, 2 * math.pi)
    gradient = rng.uniform(0.06, 0.14) * (cols * math.cos(direction) + rows * math.sin(direction))
    vignette = rng.uniform(0.0, 0.1) * (rows**2 + cols**2)
    return gradient - vignette


# ----------------------------------------------------------------------------------------------
# Defects: each returns a signed float32 change ("delta") to add to the clean surface.


def _random_point(height: int, width: int, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    return rng.uniform(margin * width, (1 - margin) * width), rng.uniform(margin * height, (1 - margin) * height)


def _scratch(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A thin, slightly curved line (quadratic Bezier), 1-3 px, mostly bright (specular), fading a little."""
    canvas = np.zeros((height, width), np.float32)
    length = rng.uniform(0.3, 0.7) * min(height, width)
    start = np.array(_random_point(height, width, rng, 0.15))
    direction = rng.uniform(0.0, 2 * math.pi)
    end = start + length * np.array([math.cos(direction), math.sin(direction)])
    normal = np.array([-math.sin(direction), math.cos(direction)])
    control = (start + end) / 2 + normal * rng.uniform(-0.15, 0.15) * length
    t = np.linspace(0.0, 1.0, 24)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    width_px = int(rng.integers(1, 4))
    thickness = 2 if width_px == 3 else 1  # OpenCV's thickness 2 draws 3 px wide
    phase = rng.uniform(0.0, 2 * math.pi)
    for k in range(len(points) - 1):
        strength = 0.8 + 0.2 * math.sin(phase + 0.4 * k)
        a, b = np.round(points[k]).astype(int), np.round(points[k + 1]).astype(int)
        cv2.line(canvas, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), strength, thickness, cv2.LINE_8)
    if width_px == 2:
        canvas = cv2.dilate(canvas, TWO_PIXEL_KERNEL)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return sign * rng.uniform(0.2, 0.32) * canvas


def _pit(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A small blob 3-8 px across, mostly dark, deepest in its middle."""
    blob = np.zeros((height, width), np.float32)
    axis = int(rng.integers(1, 4))  # OpenCV draws 2 * axis + 1 pixels across: 3, 5 or 7
    axes = (axis, max(1, round(axis * rng.uniform(0.6, 1.0))))
    x, y = _random_point(height, width, rng, 0.08)
    cv2.ellipse(blob, (round(x), round(y)), axes, rng.uniform(0.0, 180.0), 0.0, 360.0, 1.0, -1, cv2.LINE_8)
    if rng.random() < 0.5:
        blob = cv2.dilate(blob, TWO_PIXEL_KERNEL)  # even sizes: 4, 6 or 8
    # Shade the inside (deeper in the middle) without spilling outside the blob, so the edge stays crisp.
    shading = cv2.GaussianBlur(blob, (0, 0), 1.0)
    blob *= 0.6 + 0.4 * shading / max(float(shading.max()), 1e-6)
    sign = -1.0 if rng.random() < 0.7 else 1.0
    return sign * rng.uniform(0.3, 0.45) * blob


def _crack(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A dark, jagged, branching random walk, 1-2 px wide."""
    canvas = np.zeros((height, width), np.float32)
    step = 2.5

    def walk(x: float, y: float, heading: float, steps: int, depth: int) -> None:
        points = [(round(x), round(y))]
        wander = heading
        for _ in range(steps):
            # Jagged but going somewhere: the heading jumps and is pulled back towards the main direction.
            wander = heading + 0.6 * (wander - heading) + rng.normal(0.0, 0.45)
            x, y = x + step * math.cos(wander), y + step * math.sin(wander)
            if not (0 <= x < width and 0 <= y < height):
                break
            points.append((round(x), round(y)))
            if depth < 2 and rng.random() < 0.07:
                side = 1.0 if rng.random() < 0.5 else -1.0
                walk(x, y, wander + side * rng.uniform(0.5, 1.1), max(4, steps // 3), depth + 1)
        if len(points) > 1:
            cv2.polylines(canvas, [np.array(points, np.int32)], False, 1.0, 1, cv2.LINE_8)

    x, y = _random_point(height, width, rng, 0.2)
    walk(x, y, rng.uniform(0.0, 2 * math.pi), int(rng.integers(18, 40)), 0)
    if rng.random() < 0.5:
        canvas = cv2.dilate(canvas, TWO_PIXEL_KERNEL)
    return -rng.uniform(0.3, 0.45) * canvas


def _stain(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A larger soft-edged irregular blob that shifts brightness (mostly darker, like oil)."""
    radius = rng.uniform(0.1, 0.2) * min(height, width)
    x, y = _random_point(height, width, rng, 0.2)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    distance = np.sqrt((cols - x) ** 2 + (rows - y) ** 2) / radius
    distance += 0.3 * _low_frequency(height, width, rng, cells=max(4, round(min(height, width) / radius)))
    inside = np.clip((1.0 - distance) / 0.35, 0.0, 1.0)
    profile = inside * inside * (3.0 - 2.0 * inside)  # smoothstep: a soft edge
    sign = -1.0 if rng.random() < 0.65 else 1.0
    return (sign * rng.uniform(0.14, 0.22) * profile).astype(np.float32)


DEFECT_MAKERS = {"scratch": _scratch, "pit": _pit, "crack": _crack, "stain": _stain}


# ----------------------------------------------------------------------------------------------


def _plan(count: int, seed: int, defect_fraction: float) -> list[PlannedImage]:
    """Balanced families, defects stratified per family, defect kinds and RGB images spread evenly."""
    rng = np.random.default_rng([seed, 0x5EED])
    families = [SURFACE_FAMILIES[i % len(SURFACE_FAMILIES)] for i in range(count)]
    rng.shuffle(families)
    is_defect = [False] * count
    for family in SURFACE_FAMILIES:
        members = [i for i in range(count) if families[i] == family]
        for i in rng.permutation(members)[: round(len(members) * defect_fraction)]:
            is_defect[int(i)] = True
    defect_indices = [i for i in range(count) if is_defect[i]]
    kinds = [DEFECT_KINDS[k % len(DEFECT_KINDS)] for k in range(len(defect_indices))]
    rng.shuffle(kinds)
    kind_of = dict(zip(defect_indices, kinds))
    rgb = set(int(i) for i in rng.permutation(count)[: round(count * RGB_FRACTION)])
    return [
        PlannedImage(
            index=i, stem=f"{families[i]}_{i:04d}", family=families[i], defect_kind=kind_of.get(i), is_rgb=i in rgb
        )
        for i in range(count)
    ]


def render_image(planned: PlannedImage, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One planned image -> (uint8 H×W gray or H×W×3 RGB, bool H×W mask). Depends only on (seed, index)."""
    # Separate streams for the surface, the defects and the sensor: the same image rendered good or with
    # a defect is the same surface under the same noise, differing only inside the mask.
    surface_seed, defect_seed, sensor_seed = np.random.SeedSequence([seed, planned.index]).spawn(3)
    rng = np.random.default_rng(surface_seed)
    width = int(rng.integers(round(0.85 * size), round(1.25 * size) + 1))
    height = int(rng.integers(round(0.85 * size), round(1.25 * size) + 1))
    base = rng.uniform(0.38, 0.62)
    clean = np.clip(
        base + SURFACE_MAKERS[planned.family](height, width, rng) + _illumination(height, width, rng), 0.0, 1.0
    ).astype(np.float32)
    surface = clean
    mask = np.zeros((height, width), bool)
    if planned.defect_kind is not None:
        rng = np.random.default_rng(defect_seed)
        defect_count = 2 if rng.random() < SECOND_DEFECT_PROBABILITY else 1
        for _ in range(defect_count):
            for _attempt in range(100):  # a defect drawn mostly off the image or into saturation is redrawn
                altered = np.clip(surface + DEFECT_MAKERS[planned.defect_kind](height, width, rng), 0.0, 1.0)
                changed = np.abs(altered - surface) > ALTERATION_THRESHOLD
                if changed.sum() >= MIN_MASK_PIXELS:
                    break
            else:  # cannot happen with the surfaces above (never saturated everywhere); guard the invariant
                raise RuntimeError(f"could not draw a visible {planned.defect_kind} on {planned.stem}")
            # Only pixels in the mask change, so the mask is exactly where the image was altered.
            surface = np.where(changed, altered, surface)
            mask |= changed
    rng = np.random.default_rng(sensor_seed)
    noise_sigma = rng.uniform(0.006, 0.015)
    if planned.is_rgb:
        palette = FAMILY_TINTS[planned.family]
        tint = np.array(palette[int(rng.integers(len(palette)))], np.float32)
        tint *= rng.uniform(0.95, 1.05, 3).astype(np.float32)
        pixels = surface[:, :, None] * tint[None, None, :]
        pixels += rng.normal(0.0, noise_sigma, (height, width, 3)).astype(np.float32)
    else:
        pixels = surface + rng.normal(0.0, noise_sigma, (height, width)).astype(np.float32)
    return np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), mask


def _encode_png(pixels: np.ndarray) -> bytes:
    bgr_or_gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if pixels.ndim == 3 else pixels
    ok, encoded = cv2.imencode(".png", bgr_or_gray)
    if not ok:
        raise OSError("PNG encoding failed")
    return encoded.tobytes()


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _is_earlier_demo(out_dir: Path) -> bool:
    if (out_dir / DEMO_MARKER).is_file():
        return True
    metadata = out_dir / "metadata.csv"
    if not metadata.is_file():
        return False
    with open(metadata, encoding="utf-8") as handle:
        return handle.readline().rstrip("\r\n") == ",".join(METADATA_HEADER)


def _prepare_output(out_dir: Path) -> None:
    """Refuse a folder that holds anything but an earlier demo dataset; clear that demo's images."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; choose another output folder for the demo dataset.")
    entries = sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(TEMP_SUFFIX))
    if not entries:
        remove_stale_temporaries(out_dir)  # only temporaries: ours, left by a run killed mid-write
        return
    foreign = [name for name in entries if name not in LAYOUT_NAMES and name != DEMO_MARKER]
    if foreign or not _is_earlier_demo(out_dir):
        shown = ", ".join((foreign or entries)[:3])
        raise DataError(
            f"{out_dir}: the folder is not empty and is not an earlier demo dataset (it holds {shown}); "
            "choose an empty or new folder for the demo dataset."
        )
    remove_stale_temporaries(out_dir)  # the folder is ours: clear what a killed run left
    # An earlier demo run with a larger count would leave extra images behind: remove demo-named files only.
    for folder in (out_dir / "images", out_dir / "masks"):
        if folder.is_dir():
            for file in folder.glob("*.png"):
                if STEM_PATTERN.match(file.stem):
                    file.unlink()


def make_demo_dataset(
    out_dir: str | Path, count: int = 240, size: int = 128, seed: int = 0, defect_fraction: float = 0.4
) -> Path:
    """Write the synthetic demo dataset (images/, masks/, labels.csv, split.csv, metadata.csv) into `out_dir`.

    `count` images whose width and height each lie in [0.85, 1.25] × `size`; about `defect_fraction` of
    them carry a defect. The same arguments give byte-identical files. Returns `out_dir` as a Path.
    """
    return run_job(demo_dataset_job(out_dir, CancelToken(), count, size, seed, defect_fraction))


def demo_dataset_job(
    out_dir: str | Path, cancel: CancelToken, count: int = 240, size: int = 128, seed: int = 0,
    defect_fraction: float = 0.4,
) -> Generator[Progress, None, Path]:
    """`make_demo_dataset` as a job: one progress step per image. A cancelled job leaves no labels.csv,
    so the next one starts the dataset again."""
    if count < 8:
        raise DataError(f"the demo dataset needs at least 8 images to have both classes in both splits, got {count}.")
    if size < 32:
        raise DataError(f"the demo images need to be at least 32 pixels across, got {size}.")
    if not 0.0 < defect_fraction < 1.0:
        raise DataError(f"defect_fraction must lie strictly between 0 and 1, got {defect_fraction}.")
    out_dir = Path(out_dir)
    _prepare_output(out_dir)
    atomic_write_bytes(out_dir / DEMO_MARKER, b"synthetic demo dataset made by defect-studio\n")
    plan = _plan(count, seed, defect_fraction)
    clock = EtaClock(len(plan))
    metadata_rows: list[list[object]] = []
    for done, planned in enumerate(plan, start=1):
        cancel.raise_if_cancelled()
        pixels, mask = render_image(planned, size, seed)
        atomic_write_bytes(out_dir / "images" / f"{planned.stem}.png", _encode_png(pixels))
        write_mask(out_dir / "masks" / f"{planned.stem}.png", mask)
        label = "good" if planned.defect_kind is None else "defect"
        height, width = mask.shape
        metadata_rows.append([planned.stem, label, planned.defect_kind or "none", width, height, int(mask.sum())])
        yield clock.progress("demo images", done, planned.stem)
    labels = {row[0]: row[1] for row in metadata_rows}
    held_out = stratified_split(labels, TEST_FRACTION, seed)
    _write_csv(out_dir / "labels.csv", ["stem", "label"], [[stem, label] for stem, label in labels.items()])
    _write_csv(out_dir / "split.csv", ["stem", "split"], [[s, "test" if held_out[s] else "train"] for s in labels])
    _write_csv(out_dir / "metadata.csv", METADATA_HEADER, metadata_rows)
    return out_dir


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-dataset")
    started = time.perf_counter()
    make_demo_dataset(target)
    print(f"demo dataset written to {target} in {time.perf_counter() - started:.2f} s")
