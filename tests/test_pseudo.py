"""Pseudo-label thresholding on arrays, and the review operations on a project's round."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from defect_studio.cli import main as cli_main
from defect_studio.errors import DataError
from defect_studio.imageio import write_mask
from defect_studio.ml.pseudo import (
    PSEUDO_LABEL_BAND_ROWS,
    TARGET_BACKGROUND,
    TARGET_DEFECT,
    TARGET_IGNORED,
    PseudoLabelSettings,
    calibrate_probability,
    fuse_scores,
    fused_pseudo_label,
    pseudo_label,
    pseudo_target,
    remove_small_components,
    split_target,
)
from defect_studio.ml.segmenter import IGNORE, make_target
from defect_studio.project import Project
from defect_studio.project import review


def blob_map() -> np.ndarray:
    score = np.zeros((40, 40), np.float32)
    score[5:15, 5:15] = 0.9  # a confident defect
    score[4:16, 4:16] = np.maximum(score[4:16, 4:16], 0.35)  # its uncertain rim
    score[30, 30] = 0.95  # a single hot pixel
    score[25:28, 2:5] = 0.3  # a lukewarm patch
    return score


def test_fixed_thresholds_make_an_ignore_band() -> None:
    mask, ignore, thresholds = pseudo_label(blob_map(), PseudoLabelSettings(high=0.5, low=0.25, min_area=4))
    assert thresholds == {"high": 0.5, "low": 0.25}
    assert mask[5:15, 5:15].all() and mask.sum() == 100
    assert not (mask & ignore).any()
    assert ignore[4, 4] and ignore[26, 3]  # rim and lukewarm patch: neither defect nor background
    assert ignore[30, 30] and not mask[30, 30]  # a component under min_area is dropped to "ignored", not background
    assert not ignore[0, 0] and not mask[0, 0]


def test_the_target_is_the_segmenters_training_target_of_the_two_masks() -> None:
    """One byte a pixel: 0 background, 1 defect, 255 ignored, as segmenter.make_target encodes the mask and
    the ignore band; split_target gives the two masks back, the ignore band over the target's own bytes."""
    settings = PseudoLabelSettings(high=0.5, low=0.25, min_area=4)
    target, thresholds = pseudo_target(blob_map(), settings)
    assert target.dtype == np.uint8 and thresholds == {"high": 0.5, "low": 0.25}
    assert (TARGET_BACKGROUND, TARGET_DEFECT, TARGET_IGNORED) == (0, 1, IGNORE)
    assert set(np.unique(target)) == {TARGET_BACKGROUND, TARGET_DEFECT, TARGET_IGNORED}
    mask, ignore, _ = pseudo_label(blob_map(), settings)
    np.testing.assert_array_equal(target, make_target(mask, ignore))
    split_mask, split_ignore = split_target(target)
    assert split_mask.dtype == bool and split_ignore.dtype == bool and np.shares_memory(split_ignore, target)
    np.testing.assert_array_equal(split_mask, mask)
    np.testing.assert_array_equal(split_ignore, ignore)


def test_percentile_and_otsu_modes_follow_the_map() -> None:
    score = blob_map()
    mask, ignore, thresholds = pseudo_label(score, PseudoLabelSettings(mode="percentile", high_percentile=95, low_percentile=90, min_area=1))
    assert thresholds["high"] == pytest.approx(np.percentile(score, 95))
    assert mask.sum() >= 0.04 * score.size and mask[10, 10]
    mask, _, thresholds = pseudo_label(score * 0.5, PseudoLabelSettings(mode="otsu", min_area=1))
    assert 0.0 < thresholds["high"] <= 0.45 and thresholds["low"] == pytest.approx(thresholds["high"] * 0.5)
    assert mask[10, 10] and not mask[0, 0]


def test_empty_map_gives_an_empty_mask() -> None:
    mask, ignore, _ = pseudo_label(np.zeros((10, 10), np.float32), PseudoLabelSettings())
    assert not mask.any() and not ignore.any()


def test_small_components_and_fusion() -> None:
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = True
    mask[5:8, 5:8] = True
    kept = remove_small_components(mask, 4)
    assert not kept[0, 0] and kept[5:8, 5:8].all()
    cam = np.full((2, 2), 0.2, np.float32)
    assert np.allclose(fuse_scores(cam, np.ones((2, 2), np.float32), 0.75), 0.8)
    assert fuse_scores(cam, None, 0.5) is cam
    with pytest.raises(DataError):
        fuse_scores(cam, np.ones((3, 3), np.float32), 0.5)


def test_training_ignores_where_the_segmenter_and_the_cam_disagree() -> None:
    cam = blob_map()  # a blob at [5:15, 5:15]
    segmenter = np.zeros_like(cam)
    segmenter[5:15, 5:15] = 0.9  # agrees on the blob...
    segmenter[20:30, 20:30] = 1.0  # ...and alone finds a second one, strong enough to carry the fused score
    settings = PseudoLabelSettings(high=0.5, low=0.25, min_area=4, segmenter_weight=0.6)
    mask, ignore, _, disagreeing = fused_pseudo_label(cam, segmenter, settings)
    assert mask[5:15, 5:15].all() and mask[20:30, 20:30].all()  # the reviewer sees both
    assert not ignore[5:15, 5:15].any() and ignore[20:30, 20:30].all()  # training learns only the agreed one
    assert disagreeing >= 100 and not ignore[0, 0]
    target = make_target(mask, ignore)
    assert (target[5:15, 5:15] == 1).all() and (target[20:30, 20:30] == IGNORE).all() and target[0, 0] == 0
    # Switched off, the fused pseudo-label is used as it is: its ignore band never covers the mask.
    plain_mask, plain_ignore, _, none = fused_pseudo_label(cam, segmenter, PseudoLabelSettings(
        high=0.5, low=0.25, min_area=4, segmenter_weight=0.6, ignore_disagreement=False))
    assert none == 0 and np.array_equal(plain_mask, mask) and not (plain_mask & plain_ignore).any()


def test_calibration_puts_the_model_threshold_on_the_high_threshold() -> None:
    probability = np.array([0.0, 0.35, 0.7, 0.85, 1.0], np.float32)
    calibrated = calibrate_probability(probability, model_threshold=0.7, target=0.2)
    assert calibrated == pytest.approx([0.0, 0.1, 0.2, 0.6, 1.0], abs=1e-6)
    assert np.all(np.diff(calibrated) > 0)  # order kept: only the scale changes


def test_bad_settings_are_refused() -> None:
    with pytest.raises(DataError, match="low <= high"):
        PseudoLabelSettings.from_dict({"high": 0.2, "low": 0.5})
    with pytest.raises(DataError, match="mode"):
        PseudoLabelSettings.from_dict({"mode": "magic"})
    with pytest.raises(DataError, match="unknown pseudo-label settings"):
        PseudoLabelSettings.from_dict({"hgh": 0.5})


def test_accept_reject_and_events(reviewed_round: Path) -> None:
    with Project.open(reviewed_round) as project:
        defects = [i for i in project.images() if i.tag == "defect"]
        result = review.reject(project, [defects[0].stem])
        assert result.changed == [defects[0].stem]
        review.accept(project, [str(defects[1].id)])
        result = review.accept_all(project)
        assert defects[0].stem in result.unchanged  # a rejection is not overridden by accept-all
        states = {r.image_id: r.state for r in project.mask_records(round_index=0)}
        assert states[defects[0].id] == "rejected" and states[defects[2].id] == "accepted"
        history = [state for _, state, *_ in project.mask_history(defects[0].id, 0)]
        assert history == ["proposed", "rejected"]


def test_import_masks_checks_sizes_first(reviewed_round: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Project.open(reviewed_round) as project:
        images = [i for i in project.images() if i.tag == "defect"][:3]
    folder = tmp_path / "edited"
    good_mask = np.zeros((images[0].height, images[0].width), bool)
    good_mask[2:6, 2:6] = True
    write_mask(folder / f"{images[0].stem}.png", good_mask)
    write_mask(folder / f"{images[1].stem}.png", np.zeros((images[1].height + 3, images[1].width), bool))
    code = cli_main(["review", str(reviewed_round), "--import-masks", str(folder)])
    assert code == DataError.exit_code
    error = capsys.readouterr().err
    assert "wrong size" in error and f"{images[1].stem}.png" in error and "nothing imported" in error
    with Project.open(reviewed_round) as project:
        assert project.mask_record(images[0].id, 0).state == "proposed"  # nothing written on error
    (folder / f"{images[1].stem}.png").unlink()
    assert cli_main(["review", str(reviewed_round), "--import-masks", str(folder)]) == 0
    with Project.open(reviewed_round) as project:
        record = project.mask_record(images[0].id, 0)
        assert record.state == "edited" and record.source == "human-edit"
        assert np.array_equal(project.load_mask(record), good_mask)


def test_review_cli_accept_all_and_reject(reviewed_round: Path) -> None:
    with Project.open(reviewed_round) as project:
        defect = next(i for i in project.images() if i.tag == "defect")
    assert cli_main(["review", str(reviewed_round), "--reject", defect.stem]) == 0
    assert cli_main(["review", str(reviewed_round), "--accept-all", "--round", "0"]) == 0
    with Project.open(reviewed_round) as project:
        states = {r.state for r in project.mask_records(round_index=0)}
        assert states == {"accepted", "rejected"}
    assert cli_main(["review", str(reviewed_round), "--accept", "no-such-image"]) != 0


def test_reject_the_rest_leaves_decisions_and_good_images_alone(reviewed_round: Path) -> None:
    """`review --reject-rest`: every defect proposal not yet decided is rejected; the user's accepts and
    edits stay, and good images keep their empty masks (they train as background)."""
    with Project.open(reviewed_round) as project:
        defects = project.images("defect")
        review.accept(project, [defects[0].stem])
        edit = np.zeros((defects[1].height, defects[1].width), bool)
        edit[1:3, 1:3] = True
        review.save_edit(project, defects[1].id, edit)
    assert cli_main(["review", str(reviewed_round), "--reject-rest"]) == 0
    with Project.open(reviewed_round) as project:
        states = {r.image_id: r.state for r in project.mask_records(round_index=0)}
        assert states[defects[0].id] == "accepted" and states[defects[1].id] == "edited"
        assert all(states[image.id] == "rejected" for image in defects[2:])
        assert all(states[image.id] == "proposed" for image in project.images("good"))
        assert review.reject_rest(project).changed == []  # nothing left to reject


def test_completing_an_interrupted_round_keeps_every_existing_mask_and_decision(reviewed_round: Path) -> None:
    """refine finishes a round whose proposing stopped part-way: only images without a mask get one."""
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.ml.models import ClassifierConfig
    from defect_studio.ml.pseudo import pseudo_job

    with Project.open(reviewed_round) as project:
        config = ClassifierConfig(arch="compact", epochs=1, min_epochs=1, input_size=32, width=4, batch_size=8, seed=0)
        run_job(train_project_classifier_job(project, config, CancelToken(), device="cpu"))
        defects = [i for i in project.images() if i.tag == "defect"]
        review.reject(project, [defects[0].stem])
        missing = defects[1]
        project._query("DELETE FROM masks WHERE image_id = ? AND round_idx = 0", (missing.id,))  # as if killed before it
        before = {r.image_id: (r.state, r.sha256) for r in project.mask_records(round_index=0)}
        summary = run_job(pseudo_job(project, 0, "gradcam", {"mode": "percentile"}, CancelToken(), only_missing=True))
        after = {r.image_id: (r.state, r.sha256) for r in project.mask_records(round_index=0)}
        assert summary["proposed"] == 1 and summary["kept_existing"] == len(before)
        assert {k: v for k, v in after.items() if k != missing.id} == before  # the rejection included
        assert after[missing.id][0] == "proposed"
        # Proposing the whole round again (new settings, say) keeps every decision made in it.
        run_job(pseudo_job(project, 0, "gradcam", {"mode": "otsu"}, CancelToken()))
        assert project.mask_record(defects[0].id, 0).state == "rejected"


def _whole_image_pseudo_label(score_map: np.ndarray, settings: PseudoLabelSettings) -> tuple[np.ndarray, np.ndarray]:
    """pseudo_label as it was before it went band by band: one float32 map, its components labelled whole."""
    score_map = np.nan_to_num(np.asarray(score_map, dtype=np.float32), nan=0.0)
    if settings.mode == "fixed":
        high, low = settings.high, settings.low
    elif settings.mode == "percentile":
        high = max(float(np.percentile(score_map, settings.high_percentile)), 1e-6)
        low = min(float(np.percentile(score_map, settings.low_percentile)), high)
    else:
        otsu, _ = cv2.threshold(cv2.convertScaleAbs(score_map, alpha=255.0), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        high = max(float(otsu) / 255.0, 1e-6)
        low = high * settings.otsu_low_ratio
    raw = score_map >= high
    mask = raw
    if settings.min_area > 1 and raw.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(raw.astype(np.uint8), connectivity=8)
        keep = np.zeros(count, dtype=bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= settings.min_area
        mask = keep[labels]
    return mask, ((score_map > low) & ~mask) | (raw & ~mask)


def large_score_map() -> np.ndarray:
    """A map over one segmenter tile (so pseudo_label goes band by band) with blobs of every size, and thin
    vertical and slanted strokes of 14 to 18 pixels (about min_area) that end just below a band border or
    start just above one."""
    rng = np.random.default_rng(7)
    score = cv2.GaussianBlur(rng.random((1100, 1000), dtype=np.float32), (0, 0), 2.5)
    score = np.clip((score - score.mean()) * 12 + 0.3, 0, 1)
    strokes = [(slanted, length, rows) for slanted in (False, True) for length in range(14, 19) for rows in range(3)]
    for border in (256, 512, 768, 1024):
        for column, (slanted, length, rows) in zip(range(10, 1000, 33), strokes):
            # ending `rows` rows below the border (the band below sees it through its top margin), or
            # starting `rows` rows above it (the band above, through its bottom margin)
            top = border - length + 1 + rows if border % 512 else border - 1 - rows
            score[top - 2 : top + length + 2, column - 2 : column + length + 2] = 0.1  # alone, not in a blob
            score[np.arange(top, top + length), column + (np.arange(length) if slanted else 0)] = 0.8
    score[:3, :3] = np.nan  # NaNs count as 0
    return score


@pytest.mark.parametrize("settings", [
    PseudoLabelSettings(),
    PseudoLabelSettings(high=0.6, low=0.3, min_area=40),
    PseudoLabelSettings(min_area=1),
    PseudoLabelSettings(mode="percentile", high_percentile=97, low_percentile=90),
    PseudoLabelSettings(mode="otsu"),
], ids=["fixed", "large-min-area", "no-min-area", "percentile", "otsu"])
def test_a_large_map_labelled_by_bands_gives_the_whole_image_masks(settings: PseudoLabelSettings) -> None:
    score = large_score_map()
    for score_map in (score, score.astype(np.float16)):  # a tiled CAM is float16
        mask, ignore, _ = pseudo_label(score_map, settings)
        whole_mask, whole_ignore = _whole_image_pseudo_label(score_map, settings)
        assert whole_mask.any() and whole_ignore.any()
        np.testing.assert_array_equal(mask, whole_mask)
        np.testing.assert_array_equal(ignore, whole_ignore)
        target, _ = pseudo_target(score_map, settings)  # what a large image's proposal labels with
        np.testing.assert_array_equal(target, make_target(whole_mask, whole_ignore))
    if settings.min_area == 16:  # the strokes under min_area are dropped, the others kept, across the borders
        dropped = _whole_image_pseudo_label(score, PseudoLabelSettings(min_area=1))[0] & ~mask
        assert dropped[240:1040].any() and mask[240:1040].sum() > 0


def _traced_peak(make: Any) -> tuple[Any, int]:
    """What `make()` returns, and the peak bytes numpy (and OpenCV's arrays) allocated while it ran."""
    tracemalloc.start()
    try:
        made = make()
        return made, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_labelling_a_large_map_holds_one_byte_a_pixel_besides_the_map() -> None:
    """A tall float16 map (a tiled CAM's dtype): its target is the only full-size array pseudo_target makes
    (the rest are a band's), splitting it adds only the mask, and pseudo_label holds the two masks and no more.
    Before the target, labelling held the mask and the ignore band: 2 bytes a pixel."""
    rng = np.random.default_rng(3)
    height, width = 20000, 200
    score = cv2.GaussianBlur(rng.random((height, width), dtype=np.float32), (0, 0), 2.0)
    score = np.clip((score - score.mean()) * 12 + 0.3, 0, 1).astype(np.float16)
    settings = PseudoLabelSettings()
    band_pixels = (PSEUDO_LABEL_BAND_ROWS + 2 * settings.min_area) * width
    band_budget = 20 * band_pixels  # a band's float32 scores, its labels (int32) and a few bool temporaries
    assert band_budget < 0.5 * score.size  # else this test could not tell 1 byte a pixel from 2

    (target, _), peak = _traced_peak(lambda: pseudo_target(score, settings))
    assert (target == TARGET_DEFECT).any() and (target == TARGET_IGNORED).any()
    assert peak <= score.size + band_budget
    (mask, ignore), peak = _traced_peak(lambda: split_target(target))
    assert peak <= score.size * 1.01  # the mask; the ignore band is the target's bytes
    _, peak = _traced_peak(lambda: pseudo_label(score, settings))
    assert peak <= 2 * score.size + band_budget
