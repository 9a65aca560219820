"""Image-level and pixel-level metrics shared by training, benchmarks and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); nan if one class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    rank_sum = ranks[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


@dataclass(frozen=True)
class BinaryScores:
    precision: float
    recall: float
    f1: float
    accuracy: float
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int


def binary_scores(labels: np.ndarray, predictions: np.ndarray) -> BinaryScores:
    """Precision, recall, F1 of the positive (defect) class, and accuracy."""
    labels = np.asarray(labels).astype(bool)
    predictions = np.asarray(predictions).astype(bool)
    tp = int((labels & predictions).sum())
    fp = int((~labels & predictions).sum())
    fn = int((labels & ~predictions).sum())
    tn = int((~labels & ~predictions).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (tp + tn) / max(1, len(labels))
    return BinaryScores(precision, recall, f1, accuracy, tp, fp, fn, tn)


@dataclass
class SegmentationTally:
    """Pixel counts summed over many images, so IoU is computed over all pixels of a split."""

    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0
    images: int = 0

    def add(self, truth: np.ndarray, prediction: np.ndarray, valid: np.ndarray | None = None) -> None:
        truth = np.asarray(truth, dtype=bool)
        prediction = np.asarray(prediction, dtype=bool)
        if truth.shape != prediction.shape:
            raise ValueError(f"mask shapes differ: {truth.shape} vs {prediction.shape}")
        if valid is not None:
            truth, prediction = truth[valid], prediction[valid]
        self.true_positive += int(np.count_nonzero(truth & prediction))
        self.false_positive += int(np.count_nonzero(~truth & prediction))
        self.false_negative += int(np.count_nonzero(truth & ~prediction))
        self.true_negative += int(np.count_nonzero(~truth & ~prediction))
        self.images += 1

    def merge(self, other: "SegmentationTally") -> "SegmentationTally":
        return SegmentationTally(
            self.true_positive + other.true_positive,
            self.false_positive + other.false_positive,
            self.false_negative + other.false_negative,
            self.true_negative + other.true_negative,
            self.images + other.images,
        )

    @property
    def defect_iou(self) -> float:
        union = self.true_positive + self.false_positive + self.false_negative
        return self.true_positive / union if union else float("nan")

    @property
    def background_iou(self) -> float:
        union = self.true_negative + self.false_positive + self.false_negative
        return self.true_negative / union if union else float("nan")

    @property
    def miou(self) -> float:
        return (self.defect_iou + self.background_iou) / 2.0

    @property
    def dice(self) -> float:
        denominator = 2 * self.true_positive + self.false_positive + self.false_negative
        return 2 * self.true_positive / denominator if denominator else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "defect_iou": self.defect_iou,
            "background_iou": self.background_iou,
            "miou": self.miou,
            "dice": self.dice,
            "images": self.images,
        }


@dataclass
class ThresholdSweep:
    """IoU tallies at many global thresholds at once, to find the best single threshold."""

    thresholds: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, 101))
    tallies: list[SegmentationTally] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tallies:
            self.tallies = [SegmentationTally() for _ in self.thresholds]

    def add(self, truth: np.ndarray, score_map: np.ndarray) -> None:
        truth = np.asarray(truth, dtype=bool).ravel()
        scores = np.asarray(score_map, dtype=np.float32).ravel()
        positives = int(truth.sum())
        # Counting by histogram: pixels with score >= t are predicted defect.
        bins = np.clip(np.searchsorted(self.thresholds, scores, side="right") - 1, 0, len(self.thresholds) - 1)
        defect_hist = np.bincount(bins[truth], minlength=len(self.thresholds))
        background_hist = np.bincount(bins[~truth], minlength=len(self.thresholds))
        defect_at_or_above = np.cumsum(defect_hist[::-1])[::-1]
        background_at_or_above = np.cumsum(background_hist[::-1])[::-1]
        negatives = truth.size - positives
        for index, tally in enumerate(self.tallies):
            tp, fp = int(defect_at_or_above[index]), int(background_at_or_above[index])
            tally.true_positive += tp
            tally.false_positive += fp
            tally.false_negative += positives - tp
            tally.true_negative += negatives - fp
            tally.images += 1

    def best(self) -> tuple[float, SegmentationTally]:
        """(threshold, tally) with the highest defect IoU."""
        index = int(np.nanargmax([t.defect_iou for t in self.tallies]))
        return float(self.thresholds[index]), self.tallies[index]

    def at(self, threshold: float) -> SegmentationTally:
        index = int(np.argmin(np.abs(self.thresholds - threshold)))
        return self.tallies[index]
