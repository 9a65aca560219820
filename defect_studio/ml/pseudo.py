"""Pseudo-labels: score maps (a CAM, or the previous segmenter fused with it) -> masks with an ignore band.

For each map: defect where score >= high, background where score <= low, ignored in between.
Thresholds are fixed values, percentiles of the image's own map, or Otsu's threshold of it.
Defect components smaller than `min_area` pixels are dropped (and ignored rather than called
background: they are uncertain, not known clean). The mask PNG stays a plain 0/255 file; the
ignore band is written beside it as its own 0/255 PNG (`<project>/cache/pseudo/round-<k>/`) and
its path recorded in the mask's provenance, so training can leave those pixels out.

The labelling itself makes one uint8 target, a byte a pixel (`pseudo_target`: 0 background, 1 defect,
255 ignored, the encoding the segmenter trains on); `pseudo_label` splits it into the two bool masks.
A large image's proposal lets go of its map before splitting, so its float16 map (2 bytes a pixel) and
the target are the most it holds at once: 3× the 8-bit image, where a mask and an ignore band made 4×.

From round 1 on, the mask comes from the previous segmenter fused with the CAM, and the pixels where
that mask and the CAM's own (round-0 style) pseudo-label disagree join the ignore band: training learns
only what both sources say, so a segmenter does not teach the next one its own mistakes (measured in
docs/method-notes.md, section 12). The mask the user reviews is still the fused one.

Images tagged good get an empty mask with no ignore band (fully known background). Images tagged
defect whose mask comes out empty are flagged for review.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Sequence

import cv2
import numpy as np

from defect_studio.errors import ConfigError, DataError, ModelError
from defect_studio.imageio import read_image, read_mask, write_mask
from defect_studio.jobs import CancelToken, EtaClock, Progress
from defect_studio.ml.cams.registry import CamSpec
from defect_studio.ml.tiling import WHOLE_IMAGE_MAX_PIXELS
from defect_studio.project import DECIDED_STATES
from defect_studio.project.provenance import segmenter_to_build_on

if TYPE_CHECKING:
    from defect_studio.project.store import Project

THRESHOLD_MODES = ("fixed", "percentile", "otsu")
PSEUDO_SUBDIR = "pseudo"


@dataclass
class PseudoLabelSettings:
    mode: str = "fixed"  # fixed | percentile | otsu
    # fixed 0.3 / 0.15: the best of the fixed pairs for FGBP and the affinity walk on MT, and within 0.03 of Otsu's
    # per-image threshold, for every seed (method-notes section 15); 0.5 / 0.25 cut FGBP's proposals to 0.13-0.16
    high: float = 0.3  # fixed: defect at or above
    low: float = 0.15  # fixed: background at or below; ignored in between
    high_percentile: float = 99.0  # percentile mode: of the image's own map
    low_percentile: float = 95.0
    otsu_low_ratio: float = 0.5  # otsu mode: low = ratio × Otsu threshold
    min_area: int = 16  # pixels; smaller defect components are dropped (ignored)
    segmenter_weight: float = 0.5  # round k >= 1: score = w × segmenter probability + (1 − w) × CAM
    ignore_disagreement: bool = True  # round k >= 1: train only where the fused mask and the CAM's agree

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "PseudoLabelSettings":
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown pseudo-label settings: {', '.join(unknown)}")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise ConfigError(f"pseudo-label mode must be one of {', '.join(THRESHOLD_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ConfigError(f"pseudo-label thresholds need 0 <= low <= high <= 1, got low {self.low}, high {self.high}")
        if not 0.0 <= self.low_percentile <= self.high_percentile <= 100.0:
            raise ConfigError("pseudo-label percentiles need 0 <= low_percentile <= high_percentile <= 100")
        if not 0.0 <= self.segmenter_weight <= 1.0:
            raise ConfigError(f"segmenter_weight must be in [0, 1], got {self.segmenter_weight}")
        if self.min_area < 0:
            raise ConfigError("min_area cannot be negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PSEUDO_LABEL_BAND_ROWS = 256  # rows labelled at a time: a large map's temporaries are a band's, not the image's
# A pseudo-label target's values: the segmenter's training target (segmenter.make_target, segmenter.IGNORE;
# not imported from there: the segmenter pulls in torch, and proposing masks needs none).
TARGET_BACKGROUND = 0
TARGET_DEFECT = 1
TARGET_IGNORED = 255


def _float32_rows(score_map: np.ndarray, y0: int, y1: int) -> np.ndarray:
    """Rows [y0, y1) of the map as float32 (a view of a float32 map, a copy of a float16 one), so that a
    float16 map is compared with the thresholds as the float32 values it holds."""
    return score_map[y0:y1].astype(np.float32, copy=False)


def thresholds_for(score_map: np.ndarray, settings: PseudoLabelSettings) -> tuple[float, float]:
    """(high, low) for this map under the settings' mode."""
    if settings.mode == "fixed":
        return settings.high, settings.low
    if settings.mode == "percentile":
        values = score_map
        if values.dtype != np.float32:  # the float32 percentiles of the values a float16 map holds
            values = values.astype(np.float32)
        high = float(np.percentile(values, settings.high_percentile))
        low = float(np.percentile(values, settings.low_percentile))
        return max(high, 1e-6), min(low, high)
    if score_map.dtype == np.float32:
        scaled = cv2.convertScaleAbs(score_map, alpha=255.0)  # straight to one byte a pixel: no float copies
    else:  # OpenCV takes no float16: the same bytes, band by band
        scaled = np.empty(score_map.shape, np.uint8)
        for y0 in range(0, score_map.shape[0], PSEUDO_LABEL_BAND_ROWS):
            rows = _float32_rows(score_map, y0, y0 + PSEUDO_LABEL_BAND_ROWS)
            scaled[y0 : y0 + len(rows)] = cv2.convertScaleAbs(rows, alpha=255.0)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    high = max(float(otsu) / 255.0, 1e-6)
    return high, high * settings.otsu_low_ratio


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    if min_area <= 1 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def pseudo_target(score_map: np.ndarray, settings: PseudoLabelSettings) -> tuple[np.ndarray, dict[str, float]]:
    """score map in [0, 1] (float32, or float16 as a large image's tiled CAM) -> (uint8 target, {'high',
    'low'}): TARGET_DEFECT on the defect mask, TARGET_IGNORED on the ignore band, TARGET_BACKGROUND elsewhere.

    A large map is labelled band by band of rows, each band with `min_area` rows of margin above and below:
    a component under `min_area` pixels spans fewer rows, so it lies whole in the margined band, and one the
    margin cuts has more than `min_area` pixels inside it, kept either way. No full-size float or label
    array is made (a 100 MP map's int32 labels alone were 400 MB); the target is the only full-size array."""
    score_map = np.asarray(score_map)
    if score_map.dtype not in (np.float16, np.float32):
        score_map = score_map.astype(np.float32)
    if score_map.size and np.isnan(score_map.max()):  # max is NaN if any is: no bool temporary; a copy only then
        score_map = np.nan_to_num(score_map, nan=0.0)
    high, low = thresholds_for(score_map, settings)
    height = score_map.shape[0]
    # a map of one segmenter tile or less (a small image's) is labelled whole, as it always was
    band_rows = max(1, height) if score_map.size <= WHOLE_IMAGE_MAX_PIXELS else PSEUDO_LABEL_BAND_ROWS
    target = np.empty(score_map.shape, np.uint8)
    margin = settings.min_area if settings.min_area > 1 else 0  # rows: see above
    for y0 in range(0, height, band_rows):
        y1 = min(height, y0 + band_rows)
        above, below = max(0, y0 - margin), min(height, y1 + margin)
        scores = _float32_rows(score_map, above, below)
        raw = scores >= high
        band = slice(y0 - above, y1 - above)
        defect = remove_small_components(raw, settings.min_area)[band]
        # uncertain (between the thresholds) or a dropped small component: ignored, not background
        ignored = scores[band] > low
        ignored |= raw[band]
        rows = target[y0:y1]
        np.multiply(ignored.view(np.uint8), TARGET_IGNORED, out=rows)
        np.copyto(rows, TARGET_DEFECT, where=defect)  # the mask wins over the band: the two never overlap
    return target, {"high": high, "low": low}


def split_target(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(defect mask, ignore band) of a `pseudo_target` target, as bools. The ignore band is written over the
    target's own bytes, so splitting adds one full-size array, not two: the target is used up."""
    mask = target == TARGET_DEFECT
    ignore = target.view(bool)
    np.equal(target, TARGET_IGNORED, out=ignore)  # element by element in place: each byte read before it is written
    return mask, ignore


def pseudo_label(score_map: np.ndarray, settings: PseudoLabelSettings) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """score map in [0, 1] -> (defect mask, ignore mask, {'high', 'low'}): `pseudo_target` split in two; the
    two masks never overlap. A caller done with the map after labelling a large image should call
    `pseudo_target`, let go of the map, then `split_target`: one full-size array fewer at the peak."""
    target, thresholds = pseudo_target(score_map, settings)
    mask, ignore = split_target(target)
    return mask, ignore, thresholds


def fused_pseudo_label(cam_map: np.ndarray, segmenter_probability: np.ndarray,
                       settings: PseudoLabelSettings) -> tuple[np.ndarray, np.ndarray, dict[str, float], int]:
    """pseudo_label of the CAM fused with a segmenter's (calibrated) probability: (mask, ignore, thresholds,
    disagreeing pixels). With `ignore_disagreement` the ignore band also covers every pixel where the fused
    mask and the CAM's own pseudo-label (mask or ignore band) differ, defect pixels of the mask included."""
    mask, ignore, thresholds = pseudo_label(fuse_scores(cam_map, segmenter_probability, settings.segmenter_weight),
                                            settings)
    if not settings.ignore_disagreement:
        return mask, ignore, thresholds, 0
    cam_mask, cam_ignore, _ = pseudo_label(cam_map, settings)
    disagree = (mask != cam_mask) | (cam_ignore & ~ignore)
    return mask, ignore | disagree, thresholds, int(disagree.sum())


def calibrate_probability(probability: np.ndarray, model_threshold: float, target: float) -> np.ndarray:
    """Map a segmenter's probability piecewise-linearly so that its own decision threshold lands on
    `target` (the pseudo-label high threshold). Without this, a CAM-tuned threshold such as 0.1 would
    call almost every pixel of an averaged score defect; with it, fused >= high means the segmenter
    and the CAM agree on balance."""
    threshold = float(np.clip(model_threshold, 1e-3, 1.0 - 1e-3))
    target = float(np.clip(target, 1e-3, 1.0 - 1e-3))
    below = probability / threshold * target
    above = target + (probability - threshold) / (1.0 - threshold) * (1.0 - target)
    return np.where(probability < threshold, below, above).astype(np.float32)


def fuse_scores(cam_map: np.ndarray, segmenter_probability: np.ndarray | None, weight: float) -> np.ndarray:
    if segmenter_probability is None:
        return cam_map
    if segmenter_probability.shape != cam_map.shape:
        raise DataError(f"segmenter map {segmenter_probability.shape} and CAM {cam_map.shape} differ in size")
    return (weight * segmenter_probability + (1.0 - weight) * cam_map).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The project job


def ignore_path(project: Project, round_index: int, stem: str) -> Path:
    return Path(project.cache_dir) / PSEUDO_SUBDIR / f"round-{round_index}" / f"{stem}-ignore.png"


def load_ignore(project: Project, record: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """The ignore band recorded with a mask, or None (human edits and good images have none)."""
    if record.source == "human-edit" or record.state == "edited":
        return None
    relative = (record.params or {}).get("ignore_path")
    if not relative:
        return None
    path = Path(project.path) / relative
    if not path.is_file():
        return None
    return read_mask(path, shape)


def segmenter_checkpoint_for_round(project: Project, round_index: int) -> Any:
    """The segmenter run whose predictions round `round_index`'s proposals fuse with the CAM (None for
    round 0): the latest trained on round `round_index - 1`, or an earlier round's that the user made
    current (`defect-studio use-segmenter`)."""
    if round_index <= 0:
        return None
    run = segmenter_to_build_on(project, round_index)
    if run is None:
        raise ModelError(
            f"round {round_index} proposals need a segmenter trained on round {round_index - 1}; "
            "train it first (defect-studio refine)."
        )
    return run


def check_can_propose(project: Project, round_index: int, classifier_path: str | Path | None = None) -> None:
    """Raise the clear error that proposing round `round_index` would meet, before a round is created for it."""
    from defect_studio.ml.cam_cache import default_classifier_path

    if not any(r.tag == "defect" for r in project.images()):
        raise DataError("no image is tagged defect: nothing to propose masks for.")
    checkpoint = Path(classifier_path) if classifier_path is not None else default_classifier_path(project)
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint}: the classifier checkpoint is missing; train the classifier again.")
    segmenter_checkpoint_for_round(project, round_index)


def create_checked_round(project: Project, config: dict[str, Any], classifier_path: str | Path | None = None) -> int:
    """Create the next round only once `check_can_propose` passes (no empty round left behind); its index."""
    rounds = project.rounds()
    check_can_propose(project, rounds[-1].index + 1 if rounds else 0, classifier_path)
    return int(project.create_round(config).index)


def _cached(record: Any, found: np.ndarray | None, what: str) -> np.ndarray:
    """A map the job put in a cache moments ago (pseudo_maps_job), read with the image's size."""
    if found is None:
        raise ModelError(f"{record.stem}: the {what} left the cache during the job; run it again.")
    return found


@dataclass
class ProposalMaps:
    """What pseudo_maps_job leaves in the caches and what made it: the classifier's hash (the CAMs' key), the
    segmenter run and model (rounds >= 1, else None), and per kind of map how many were computed and cached."""

    classifier_sha256: str
    segmenter_run: Any
    segmenter: Any
    counts: dict[str, dict[str, int]]


def _fused_proposal(cam_map: np.ndarray, probability: np.ndarray, segmenter: Any,
                    settings: PseudoLabelSettings) -> tuple[np.ndarray, np.ndarray, dict[str, float], dict[str, Any]]:
    """(mask, ignore, thresholds, extra params) of a defect image from round 1 on: the CAM fused with the
    segmenter's probability, calibrated so that its threshold meets the CAM's scale."""
    calibrated_threshold = settings.high if settings.mode == "fixed" else 0.5
    probability = calibrate_probability(probability, segmenter.threshold, calibrated_threshold)
    mask, ignore, thresholds, disagreeing = fused_pseudo_label(cam_map, probability, settings)
    return mask, ignore, thresholds, {"disagreeing_pixels": disagreeing}


def segmenter_maps_job(
    project: Project, segmenter_run: Any, image_ids: Sequence[int], cancel: CancelToken,
) -> Generator[Progress, None, dict[str, Any]]:
    """The segmenter's probability maps of these images in the project's cache (SegmenterMapCache), computed
    where missing; a read-only project will do, as for cam_job: each map is one atomic file, so shards of
    `pseudo --shard` fill the cache side by side. Returns the loaded segmenter and the counts."""
    from defect_studio.ml.cam_cache import SegmenterMapCache
    from defect_studio.ml.segmenter import load_segmenter

    yield Progress("loading segmenter", 0, None, Path(segmenter_run.checkpoint_path).name)
    segmenter = load_segmenter(segmenter_run.checkpoint_path)
    cache = SegmenterMapCache(project.cache_dir)
    records = [project.image(i) for i in image_ids]
    clock = EtaClock(len(records))
    computed = 0
    for done, record in enumerate(records, start=1):
        cancel.raise_if_cancelled()
        if cache.get(record.sha256, segmenter.checkpoint_sha256, (record.height, record.width)) is None:
            cache.put(record.sha256, segmenter.checkpoint_sha256, segmenter.probability(read_image(record.path)))
            computed += 1
        yield clock.progress("segmenter maps", done, record.stem, {"computed": computed})
    return {"segmenter": segmenter, "images": len(records), "computed": computed, "cached": len(records) - computed}


def pseudo_maps_job(
    project: Project, round_index: int, cam_spec: CamSpec, image_ids: Sequence[int], cancel: CancelToken,
    classifier_path: str | Path | None = None,
) -> Generator[Progress, None, ProposalMaps]:
    """The maps round `round_index`'s proposals of these (defect-tagged) images are made from, in the
    project's caches: their CAMs and, from round 1 on, the previous round's segmenter's maps; computed where
    missing. Writes no mask and nothing in the database, so a read-only project will do: `pseudo --shard`
    runs it for its share of the images, side by side with the other shards and beside the app."""
    from defect_studio.ml.cam_cache import cam_job

    segmenter_run = segmenter_checkpoint_for_round(project, round_index)  # "train the segmenter first"
    cams = yield from cam_job(project, cam_spec, None, cancel, classifier_path=classifier_path, image_ids=image_ids)
    maps = ProposalMaps(cams["checkpoint_sha256"], segmenter_run, None,
                        {"cam": {"computed": cams["computed"], "cached": cams["cached"]}})
    if segmenter_run is not None:
        made = yield from segmenter_maps_job(project, segmenter_run, image_ids, cancel)
        maps.segmenter = made["segmenter"]
        maps.counts["segmenter_maps"] = {"computed": made["computed"], "cached": made["cached"]}
    return maps


def pseudo_job(
    project: Project,
    round_index: int,
    method: "str | CamSpec",
    settings: dict[str, Any] | None,
    cancel: CancelToken,
    cam_settings: dict[str, Any] | None = None,
    classifier_path: str | Path | None = None,
    only_missing: bool = False,
) -> Generator[Progress, None, dict[str, Any]]:
    """Proposals of round `round_index` for every tagged image, saved through the project store.

    `only_missing`: propose only for images without a mask in this round (completing a round whose
    proposing was interrupted), leaving every existing mask and review decision as it is.

    The CAM maps come from the project's CAM cache (computed now where missing). For round k >= 1
    the segmenter trained on round k-1 is run and fused with the CAM. Accepted or edited masks of
    earlier rounds are carried forward by the store untouched.
    """
    from defect_studio.ml.cam_cache import CamCache, SegmenterMapCache

    label_settings = PseudoLabelSettings.from_dict(settings)
    cam_spec = CamSpec.resolve(method, cam_settings)  # a name with its settings, or a resolved spec
    method, resolved_cam = cam_spec.method, cam_spec.settings
    known_rounds = {r.index for r in project.rounds()}
    if round_index not in known_rounds:
        raise DataError(f"this project has no round {round_index}; rounds: {sorted(known_rounds) or 'none'}")
    check_can_propose(project, round_index, classifier_path)
    records = [r for r in project.images() if r.tag in ("good", "defect")]
    kept = 0
    if only_missing:
        present = {m.image_id for m in project.mask_records(round_index=round_index)}
        kept = sum(r.id in present for r in records)
        records = [r for r in records if r.id not in present]
    else:  # every mask is proposed again: the round records what it is proposed with now
        project.set_round_proposal_settings(round_index, {**cam_spec.to_record(), "pseudo": label_settings.to_dict()})
    defect_records = [r for r in records if r.tag == "defect"]
    maps = yield from pseudo_maps_job(project, round_index, cam_spec, [r.id for r in defect_records], cancel, classifier_path)
    classifier_sha, segmenter, segmenter_run = maps.classifier_sha256, maps.segmenter, maps.segmenter_run
    cache = CamCache(project.cache_dir)
    probabilities = SegmenterMapCache(project.cache_dir)
    source = f"cam:{method}" if segmenter is None else f"segmenter-{segmenter_run.round_index}+cam:{method}"
    clock = EtaClock(len(records))
    flagged = proposed = carried = 0
    defect_pixels = 0
    for done, record in enumerate(records, start=1):
        cancel.raise_if_cancelled()
        shape = (record.height, record.width)
        params: dict[str, Any] = {"round": round_index, "settings": label_settings.to_dict()}
        # Each image's arrays are let go as soon as they are done with, not when the next image's replace them:
        # a large image's map and pseudo-label target are the most this loop holds at once (3× its 8-bit pixels).
        if record.tag == "good":
            mask, ignore, is_flagged = np.zeros(shape, bool), None, False
            params["source"] = record_source = "tag:good"
        else:
            cam_map = _cached(record, cache.get(record.sha256, classifier_sha, method, resolved_cam, shape), "CAM")
            if segmenter is None:  # round 0: the CAM's own pseudo-label
                target, thresholds = pseudo_target(cam_map, label_settings)
                del cam_map  # before the masks are made from the target
                mask, ignore = split_target(target)
                del target  # its bytes are the ignore band now
            else:
                probability = _cached(
                    record, probabilities.get(record.sha256, segmenter.checkpoint_sha256, shape), "segmenter's map")
                mask, ignore, thresholds, extra = _fused_proposal(cam_map, probability, segmenter, label_settings)
                del cam_map, probability
                params.update(extra)
            is_flagged = not mask.any()
            record_source = source
            params.update(
                {
                    "source": source,
                    **cam_spec.to_record(),
                    "classifier_sha256": classifier_sha,
                    "segmenter_sha256": segmenter_run.checkpoint_sha256 if segmenter_run else None,
                    "segmenter_threshold": segmenter.threshold if segmenter is not None else None,
                    "thresholds": thresholds,
                }
            )
            if ignore.any():
                path = ignore_path(project, round_index, record.stem)
                write_mask(path, ignore)
                params["ignore_path"] = str(path.relative_to(project.path))
                params["ignore_pixels"] = int(ignore.sum())
        saved = project.save_mask_proposal(record.id, round_index, mask, record_source, params, flagged=is_flagged)
        if saved.state in DECIDED_STATES:  # the user's decision stands
            carried += 1
        else:
            proposed += 1
            flagged += int(is_flagged)
            defect_pixels += int(mask.sum())
        del mask, ignore
        yield clock.progress("pseudo-labels", done, record.stem, {"flagged": flagged, "carried": carried})
    summary = {
        "round": round_index,
        "source": source,
        "images": len(records),
        "proposed": proposed,
        "carried_forward": carried,
        "kept_existing": kept,
        "flagged_empty": flagged,
        "defect_pixels": defect_pixels,
        "settings": label_settings.to_dict(),
        "settings_hash": hashlib.sha256(json.dumps(label_settings.to_dict(), sort_keys=True).encode()).hexdigest()[:16],
        "maps_computed": {name: counts["computed"] for name, counts in maps.counts.items()},
    }
    project.update_round(round_index, status="proposed", metrics={"pseudo": summary})
    return summary
