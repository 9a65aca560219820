"""Assisted masks in the core: a stroke grows into the defect under it, on every kind of image."""

from __future__ import annotations

import numpy as np
import pytest

from defect_studio.ml.assist import ASSIST_METHODS, GrownRegion, grow_region, merge_region


def blob_image(height: int = 120, width: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark textured surface with a bright elliptic blob: (gray uint8 image, the blob)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(60, 10, (height, width))
    yy, xx = np.mgrid[:height, :width]
    blob = ((yy - height / 2) / 22.0) ** 2 + ((xx - width / 2) / 30.0) ** 2 <= 1.0
    image[blob] = rng.normal(190, 10, int(blob.sum()))
    return image.clip(0, 255).astype(np.uint8), blob


def full_mask(shape: tuple[int, int], grown: GrownRegion) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    merge_region(mask, grown)
    return mask > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


LOOSE_STROKE = [(58, 58), (75, 62), (95, 58)]  # inside the blob, off its axis, not reaching its ends


@pytest.mark.parametrize("method", ASSIST_METHODS)
def test_a_loose_stroke_inside_a_blob_grows_to_the_blob(method: str) -> None:
    image, blob = blob_image()
    grown = grow_region(image, [LOOSE_STROKE], radius=2, method=method)
    mask = full_mask(blob.shape, grown)
    assert iou(mask, blob) > 0.85, iou(mask, blob)
    # Only a window around the stroke was segmented, and the region fits in it.
    x0, y0, x1, y1 = grown.box
    assert grown.region.shape == (y1 - y0, x1 - x0)
    assert grown.message == ""


def test_a_click_in_a_small_pit_finds_the_pit() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(150, 8, (200, 200)).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:200, :200]
    pit = (yy - 70) ** 2 + (xx - 130) ** 2 <= 6 ** 2
    image[pit] = 60
    mask = full_mask(pit.shape, grow_region(image, [[(130, 70)]], radius=1))
    assert iou(mask, pit) > 0.8


def test_the_stroke_is_always_kept_and_nothing_far_away_is_added() -> None:
    image, blob = blob_image()
    image[5:15, 5:15] = 190  # a look-alike patch elsewhere, inside the same window if the window were the image
    grown = grow_region(image, [LOOSE_STROKE], radius=2)
    mask = full_mask(blob.shape, grown)
    assert mask[58, 58] and mask[62, 75] and mask[58, 95]
    assert not mask[5:15, 5:15].any()


def test_a_defect_at_the_image_border_grows_to_the_border() -> None:
    image, _ = blob_image()
    image = image.copy()
    image[:, :] = np.random.default_rng(2).normal(60, 10, image.shape).clip(0, 255)
    band = np.zeros(image.shape, bool)
    band[:, :18] = True  # a bright band along the left edge
    image[band] = 200
    grown = grow_region(image, [[(3, 40), (3, 80)]], radius=2)  # a stroke hugging the border
    mask = full_mask(band.shape, grown)
    assert grown.box[0] == 0
    assert mask[40:80, 0].all(), "the border column is defect"
    assert iou(mask[30:90], band[30:90]) > 0.6


def test_strokes_off_the_image_grow_nothing() -> None:
    image, _ = blob_image()
    grown = grow_region(image, [[(-50, -50), (-30, -40)]], radius=2)
    assert grown.empty and "outside the image" in grown.message
    assert not merge_region(np.zeros(image.shape, np.uint8), grown)


def test_a_stroke_partly_outside_keeps_its_inside_part() -> None:
    image, blob = blob_image()
    grown = grow_region(image, [[(80, 60), (80, -40)]], radius=2)  # from the blob out through the top edge
    mask = full_mask(blob.shape, grown)
    assert mask[60, 80] and mask[0, 80]


def test_tiny_strokes_on_a_tiny_image_do_not_fail() -> None:
    image = np.full((6, 6), 100, np.uint8)
    image[2:4, 2:4] = 200
    for radius in (0, 1, 5):
        grown = grow_region(image, [[(2, 2)]], radius=radius)
        mask = full_mask(image.shape, grown)
        assert mask[2, 2]  # the click itself is always marked


def test_a_uniform_window_does_not_flood() -> None:
    image = np.full((300, 300), 128, np.uint8)
    mask = full_mask(image.shape, grow_region(image, [[(150, 150), (160, 150)]], radius=2))
    assert mask[150, 150] and mask[150, 160]
    assert mask.sum() < 200, "nothing to grow into: no flood of the window"


def test_a_stroke_covering_the_whole_image_is_kept_with_a_message() -> None:
    image = np.full((3, 3), 50, np.uint8)
    grown = grow_region(image, [[(1, 1)]], radius=5)
    assert full_mask(image.shape, grown).all()
    assert "only the stroke" in grown.message


@pytest.mark.parametrize("kind", ["gray", "gray-channel", "rgb", "rgba", "uint16", "float"])
def test_every_image_kind_grows_alike(kind: str) -> None:
    gray, blob = blob_image()
    if kind == "gray":
        image = gray
    elif kind == "gray-channel":
        image = gray[:, :, None]
    elif kind == "rgb":
        image = np.stack([gray, gray // 2, 255 - gray], axis=2)
    elif kind == "rgba":
        image = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    elif kind == "uint16":
        image = gray.astype(np.uint16) * 16 + 100  # a 12-bit camera's range inside 16 bits
    else:
        image = gray.astype(np.float32) * 3.7 - 200.0  # arbitrary units
    mask = full_mask(blob.shape, grow_region(image, [LOOSE_STROKE], radius=2))
    assert iou(mask, blob) > 0.85, (kind, iou(mask, blob))


def test_a_prior_guides_a_short_stroke_along_a_faint_defect() -> None:
    """A short stroke at one end of a long, faint band: the proposal under it widens the window and
    guides the growth along the band."""
    rng = np.random.default_rng(4)
    image = rng.normal(100, 12, (160, 320))
    band = np.zeros(image.shape, bool)
    band[70:90, 20:300] = True
    image[band] += 40
    image = image.clip(0, 255).astype(np.uint8)
    stroke = [[(40, 80), (80, 80)]]
    alone = full_mask(band.shape, grow_region(image, stroke, radius=2))
    guided = full_mask(band.shape, grow_region(image, stroke, radius=2, prior=band))
    assert iou(guided, band) > 0.6
    assert iou(guided, band) > iou(alone, band) + 0.3


def test_background_strokes_stop_the_growth() -> None:
    image, blob = blob_image()
    unbounded = full_mask(blob.shape, grow_region(image, [LOOSE_STROKE], radius=2))
    assert unbounded[:, 103:].any()
    bounded = full_mask(blob.shape, grow_region(image, [LOOSE_STROKE], radius=2, background=[[(101, 40), (101, 80)]]))
    assert not bounded[:, 103:].any()
    assert bounded[:, :90].sum() > 0.9 * blob[:, :90].sum()


def test_a_large_image_segments_a_bounded_window() -> None:
    rng = np.random.default_rng(5)
    image = rng.normal(130, 10, (2000, 3000)).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:2000, :3000]
    blob = ((yy - 1000) / 150.0) ** 2 + ((xx - 1500) / 400.0) ** 2 <= 1.0
    image[blob] = 60
    grown = grow_region(image, [[(1250, 1000), (1750, 1000)]], radius=3)
    mask = full_mask(blob.shape, grown)
    x0, y0, x1, y1 = grown.box
    assert (x1 - x0) * (y1 - y0) < image.size / 4
    assert iou(mask, blob) > 0.85


def test_merge_adds_or_removes_and_reports_a_change() -> None:
    image, blob = blob_image()
    grown = grow_region(image, [LOOSE_STROKE], radius=2)
    mask = np.zeros(blob.shape, np.uint8)
    assert merge_region(mask, grown)
    assert not merge_region(mask, grown), "adding again changes nothing"
    assert merge_region(mask, grown, subtract=True)
    assert not mask.any()
    assert not merge_region(mask, grown, subtract=True)


def test_unknown_method_and_mismatched_prior_are_refused() -> None:
    image, blob = blob_image()
    with pytest.raises(ValueError, match="unknown assist method"):
        grow_region(image, [LOOSE_STROKE], method="magic")
    with pytest.raises(ValueError, match="prior"):
        grow_region(image, [LOOSE_STROKE], prior=blob[:10])


# ----------------------------------------------------------------------------------------- the segmenter's prediction
def test_the_segmenter_assist_takes_the_predicted_region_under_the_stroke() -> None:
    from defect_studio.ml.assist import grow_region

    image = np.full((120, 160), 128, np.uint8)  # no pixel contrast at all: only the prediction guides
    probability = np.zeros((120, 160), np.float32)
    yy, xx = np.mgrid[:120, :160]
    blob = ((yy - 60) / 12.0) ** 2 + ((xx - 50) / 20.0) ** 2 <= 1.0
    other = ((yy - 60) / 8.0) ** 2 + ((xx - 120) / 8.0) ** 2 <= 1.0
    probability[blob] = 0.9
    probability[other] = 0.9  # another predicted defect: not the one pointed at
    grown = grow_region(image, [[(50, 60)]], 2, prior=probability, method="segmenter")
    x0, y0, x1, y1 = grown.box
    full = np.zeros((120, 160), bool)
    full[y0:y1, x0:x1] = grown.region
    assert (full & blob).sum() == blob.sum() and not (full & other).any() and grown.message == ""


def test_the_segmenter_assist_follows_weak_evidence_and_says_when_there_is_none() -> None:
    from defect_studio.ml.assist import grow_region

    image = np.full((100, 100), 128, np.uint8)
    probability = np.full((100, 100), 0.01, np.float32)
    probability[40:60, 30:70] = 0.3  # the segmenter missed it (below its threshold), but saw something
    grown = grow_region(image, [[(50, 50)]], 2, prior=probability, method="segmenter")
    assert grown.region.sum() == 20 * 40
    nothing = grow_region(image, [[(10, 10)]], 2, prior=np.zeros((100, 100), np.float32), method="segmenter")
    assert "sees no defect" in nothing.message and nothing.region.sum() <= 25  # the stroke only
    with pytest.raises(ValueError, match="pass it as `prior`"):
        grow_region(image, [[(50, 50)]], 2, method="segmenter")
