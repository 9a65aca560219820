"""Scoring masks against ground truth: pixel IoU/Dice over a split, per defect type, image-level detection.

Pixel metrics are summed over all pixels of all images (metrics.SegmentationTally), so a large
defect does not count more than its pixels. Image-level detection: an image is predicted
defective when its mask has any defect pixel; the false-positive rate on good images is the
share of good images with any predicted defect pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from defect_studio.dataset_layout import read_csv_rows, read_label_csv
from defect_studio.errors import DataError
from defect_studio.imageio import IMAGE_EXTENSIONS, read_mask
from defect_studio.ml.metrics import SegmentationTally, binary_scores


@dataclass
class GroundTruth:
    """Ground-truth masks by stem, with optional labels, splits and defect types."""

    mask_paths: dict[str, Path]
    labels: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    defect_types: dict[str, str] = field(default_factory=dict)
    image_paths: dict[str, Path] = field(default_factory=dict)

    def stems(self, split: str | None = None) -> list[str]:
        stems = sorted(self.mask_paths)
        if split is not None:
            if not self.splits:
                raise DataError(f"--split {split} asked for, but no split.csv next to the ground truth.")
            stems = [s for s in stems if self.splits.get(s) == split]
        return stems

    def label(self, stem: str, truth: np.ndarray) -> str:
        return self.labels.get(stem) or ("defect" if truth.any() else "good")


def load_ground_truth(directory: str | Path) -> GroundTruth:
    """DIR is a dataset root (with masks/) or a folder of masks; CSVs are read from the dataset root."""
    directory = Path(directory)
    if (directory / "masks").is_dir():
        root, masks_dir = directory, directory / "masks"
    elif directory.is_dir():
        root, masks_dir = directory.parent, directory
    else:
        raise DataError(f"{directory}: no such ground-truth folder.")
    mask_paths = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    if not mask_paths:
        raise DataError(f"{masks_dir}: no mask images found.")
    truth = GroundTruth(mask_paths)
    if (root / "labels.csv").is_file():
        truth.labels, _ = read_label_csv(root / "labels.csv")
    if (root / "split.csv").is_file():
        truth.splits = {r["stem"]: r["split"] for r in read_csv_rows(root / "split.csv") if r.get("stem")}
    if (root / "metadata.csv").is_file():
        truth.defect_types = {
            r["stem"]: r["defect_type"] for r in read_csv_rows(root / "metadata.csv") if r.get("stem") and r.get("defect_type")
        }
    if (root / "images").is_dir():
        truth.image_paths = {p.stem: p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    return truth


@dataclass
class Evaluation:
    overall: SegmentationTally = field(default_factory=SegmentationTally)
    per_type: dict[str, SegmentationTally] = field(default_factory=dict)
    image_labels: list[bool] = field(default_factory=list)
    image_predictions: list[bool] = field(default_factory=list)

    def add(self, truth: np.ndarray, prediction: np.ndarray, is_defect: bool, defect_type: str | None) -> None:
        self.overall.add(truth, prediction)
        kind = defect_type if is_defect else "good"
        self.per_type.setdefault(kind or "defect", SegmentationTally()).add(truth, prediction)
        self.image_labels.append(is_defect)
        self.image_predictions.append(bool(np.any(prediction)))

    def as_dict(self) -> dict[str, Any]:
        labels, predictions = np.array(self.image_labels, bool), np.array(self.image_predictions, bool)
        detection = binary_scores(labels, predictions)
        good = ~labels
        result: dict[str, Any] = dict(self.overall.as_dict())
        result.update(
            {
                "detection_precision": detection.precision,
                "detection_recall": detection.recall,
                "detection_f1": detection.f1,
                "good_false_positive_rate": float(predictions[good].mean()) if good.any() else float("nan"),
                "defect_images": int(labels.sum()),
                "good_images": int(good.sum()),
                "per_type": {kind: tally.as_dict() for kind, tally in sorted(self.per_type.items())},
            }
        )
        return result


def evaluate_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray, bool, str | None]]) -> dict[str, Any]:
    """(truth, prediction, image is defect, defect type) for each image -> the metrics dict."""
    evaluation = Evaluation()
    for truth, prediction, is_defect, defect_type in pairs:
        evaluation.add(truth, prediction, is_defect, defect_type)
    if not evaluation.image_labels:
        raise DataError("nothing to evaluate: no image has both a prediction and a ground-truth mask.")
    return evaluation.as_dict()


def iterate_against_truth(
    truth: GroundTruth, stems: Iterable[str], predict: Callable[[str, tuple[int, int]], np.ndarray | None]
) -> Iterator[tuple[np.ndarray, np.ndarray, bool, str | None]]:
    """Yield evaluate_pairs' tuples; `predict(stem, shape)` returns the predicted mask (None: skip)."""
    for stem in stems:
        truth_mask = read_mask(truth.mask_paths[stem])
        prediction = predict(stem, truth_mask.shape)
        if prediction is None:
            continue
        if prediction.shape != truth_mask.shape:
            raise DataError(f"{stem}: the prediction is {prediction.shape} but the ground truth is {truth_mask.shape}.")
        is_defect = truth.label(stem, truth_mask) == "defect"
        yield truth_mask, prediction, is_defect, truth.defect_types.get(stem)


def summary_row(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The columns shown in tables and on the terminal."""
    return {
        "what": name,
        "defect IoU": metrics.get("defect_iou", math.nan),
        "background IoU": metrics.get("background_iou", math.nan),
        "mIoU": metrics.get("miou", math.nan),
        "Dice": metrics.get("dice", math.nan),
        "det. P": metrics.get("detection_precision", math.nan),
        "det. R": metrics.get("detection_recall", math.nan),
        "det. F1": metrics.get("detection_f1", math.nan),
        "good FP rate": metrics.get("good_false_positive_rate", math.nan),
        "images": metrics.get("images", 0),
    }


SUMMARY_COLUMNS = ["what", "defect IoU", "background IoU", "mIoU", "Dice", "det. P", "det. R", "det. F1", "good FP rate", "images"]


def per_type_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": kind, "defect IoU": t["defect_iou"], "Dice": t["dice"], "images": t["images"]}
        for kind, t in metrics.get("per_type", {}).items()
    ]
