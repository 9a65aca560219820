"""The "edit these first" order of a round's proposals (issue 16, item 1): Qt-free, no ground truth.

After a round's masks are proposed, every defect-tagged image whose mask is still `proposed` gets a
score for how much editing it is expected to buy, from what the project knows without ground truth:

- **typicality**: how densely the classifier's features of the image are surrounded by those of the
  round's other defect images (the inverse mean distance to its nearest neighbours). With few edits,
  a mask drawn on a typical image teaches the segmenter about many images; an outlier teaches about
  itself (Hacohen et al., "Active learning on a budget", ICML 2022);
- **classifier confidence**: the classifier's defect probability. An edit on an image the classifier
  barely calls a defect may be spent on a wrong tag or an invisible defect;
- from round 1 on, with the previous round's segmenter: its **uncertainty** (mean binary entropy of
  its probability inside and around the region it predicts), the **disagreement** between the CAM's
  proposal and the segmenter's prediction (1 − IoU), and the **change** of the proposal since the
  previous round's mask (1 − IoU). Where the models disagree or waver, the proposal is least likely
  right, and the user's mask tells the segmenter most.

Each signal becomes its percentile among the round's candidates; the score is their weighted mean.
The order then **covers** the feature space: the round's defect images are clustered (k-means on
the classifier features) and each next place goes to the cluster furthest behind its share of the
edits (its share of the images; masks already edited or accepted count), taking that cluster's best
remaining score. So the head of the queue is not twenty near-duplicates of one defect kind, and a
kind is not over-drawn either. Every item carries a sentence saying why it sits where it does.

`review_order_job` is the long job (a generator of progress events, cancellable); `rank_for_review`
runs it and stores the order in the project (`Project.save_review_order`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Sequence

import cv2
import numpy as np

from defect_studio.errors import DataError, ModelError
from defect_studio.imageio import read_image
from defect_studio.jobs import CancelToken, EtaClock, Progress, run_job
from defect_studio.project.store import LOCKED_STATES, Project, ReviewOrderEntry

# Weights of the signals in the score (renormalised over the signals a round has).
SIGNAL_WEIGHTS: dict[str, float] = {
    "typicality": 0.35,
    "confidence": 0.15,
    "uncertainty": 0.25,
    "disagreement": 0.15,
    "change": 0.10,
}
SIGNAL_NAMES = tuple(SIGNAL_WEIGHTS)
NEIGHBOURS = 10  # typicality: the nearest neighbours its mean distance is taken over
IMAGES_PER_CLUSTER = 10  # coverage: about this many defect images per cluster ...
MAX_CLUSTERS = 30  # ... but no more clusters than this
AROUND_PIXELS = 8  # uncertainty: the predicted region is widened by this many pixels
BATCH = 16


@dataclass
class ImageSignals:
    """What is measured of one defect image of the round (None: the signal is not available)."""

    image_id: int
    stem: str
    state: str  # the mask's review state: only `proposed` masks are ranked; the others count for coverage
    feature: np.ndarray  # the classifier's pooled feature (L2-normalised)
    confidence: float  # the classifier's defect probability
    uncertainty: float | None = None  # mean binary entropy (bits) in and around the segmenter's region
    disagreement: float | None = None  # 1 − IoU(CAM proposal, segmenter prediction)
    change: float | None = None  # 1 − IoU(this round's proposal, the previous round's mask)
    proposal_fraction: float = 0.0  # share of the image the proposal marks


@dataclass
class ReviewItem:
    image_id: int
    stem: str
    rank: int  # 1 = edit first
    score: float  # in [0, 1]
    reason: str
    signals: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ pure ranking
def percentiles(values: Sequence[float]) -> np.ndarray:
    """Each value's share of the others it exceeds, in [0, 1] (ties share their mean place)."""
    values = np.asarray(values, dtype=np.float64)
    count = len(values)
    if count <= 1:
        return np.full(count, 0.5)
    order = np.argsort(values, kind="stable")
    places = np.empty(count, dtype=np.float64)
    places[order] = np.arange(count, dtype=np.float64)
    for value in np.unique(values):  # ties: mean place
        tied = values == value
        if tied.sum() > 1:
            places[tied] = places[tied].mean()
    return places / (count - 1)


def typicality(features: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """1 / mean Euclidean distance to the `neighbours` nearest other rows (higher: more typical)."""
    count = len(features)
    if count <= 1:
        return np.ones(count)
    squared = (features**2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * features @ features.T, 0.0))
    np.fill_diagonal(distances, np.inf)
    k = max(1, min(neighbours, count - 1))
    nearest = np.sort(distances, axis=1)[:, :k]
    return 1.0 / (nearest.mean(1) + 1e-12)


def kmeans(features: np.ndarray, clusters: int, seed: int = 0, iterations: int = 30) -> np.ndarray:
    """Cluster labels by k-means with k-means++ seeding (deterministic for a seed)."""
    count = len(features)
    clusters = max(1, min(clusters, count))
    if clusters == 1:
        return np.zeros(count, dtype=int)
    rng = np.random.default_rng(seed)
    centres = [features[rng.integers(count)]]
    for _ in range(1, clusters):
        nearest = np.min(((features[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = nearest.sum()
        centres.append(features[rng.choice(count, p=nearest / total)] if total > 0 else features[rng.integers(count)])
    centre_array = np.asarray(centres, dtype=np.float64)
    labels = np.zeros(count, dtype=int)
    for _ in range(iterations):
        distances = ((features[:, None, :] - centre_array[None]) ** 2).sum(-1)
        new_labels = distances.argmin(1)
        if _ > 0 and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for cluster in range(clusters):
            members = features[labels == cluster]
            if len(members):
                centre_array[cluster] = members.mean(0)
    return labels


def cluster_count(images: int) -> int:
    return max(1, min(MAX_CLUSTERS, int(round(images / IMAGES_PER_CLUSTER))))


def _score(signals: Sequence[ImageSignals]) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """(score per candidate, each signal's percentile per candidate, the signals used)."""
    raw: dict[str, np.ndarray] = {
        "typicality": typicality(np.stack([s.feature for s in signals])),
        "confidence": np.array([s.confidence for s in signals]),
    }
    for name in ("uncertainty", "disagreement", "change"):
        values = [getattr(s, name) for s in signals]
        if all(v is not None for v in values):
            raw[name] = np.array(values, dtype=np.float64)
    ranked = {name: percentiles(values) for name, values in raw.items()}
    weights = {name: SIGNAL_WEIGHTS[name] for name in ranked}
    total = sum(weights.values())
    score = sum(ranked[name] * weight for name, weight in weights.items()) / total
    return np.asarray(score), ranked, list(ranked)


def _strongest(ranked: dict[str, np.ndarray], index: int, used: list[str]) -> list[str]:
    """The signals that put the item high, strongest first (at most three)."""
    contributions = sorted(((ranked[name][index] * SIGNAL_WEIGHTS[name], name) for name in used), reverse=True)
    return [name for value, name in contributions if ranked[name][index] >= 0.5][:3]


def _describe(item: ImageSignals, name: str, percentile: float) -> str:
    share = f"{percentile:.0%}"
    if name == "typicality":
        return f"typical of the round's defect images (more than {share} of them)"
    if name == "confidence":
        return f"the classifier is {item.confidence:.2f} sure it is a defect"
    if name == "uncertainty":
        return f"the segmenter is unsure around its region (entropy {item.uncertainty:.2f} bits, more than {share})"
    if name == "disagreement":
        return f"the CAM and the segmenter disagree (IoU {1.0 - (item.disagreement or 0.0):.2f})"
    if name == "change":
        return f"the proposal changed {item.change:.0%} since the previous round"
    return name


def order_for_review(signals: Sequence[ImageSignals], seed: int = 0, clusters: int | None = None) -> list[ReviewItem]:
    """Rank the `proposed` items of `signals`; accepted or edited ones count as covering their cluster,
    rejected ones only shape the clusters."""
    candidates = [s for s in signals if s.state == "proposed"]
    if not candidates:
        return []
    score, ranked, used = _score(candidates)
    features = np.stack([s.feature for s in signals]).astype(np.float64)
    labels = kmeans(features, clusters or cluster_count(len(signals)), seed)
    sizes = Counter(labels.tolist())
    covered = Counter(int(labels[i]) for i, s in enumerate(signals) if s.state in LOCKED_STATES)
    candidate_cluster = [int(labels[i]) for i, s in enumerate(signals) if s.state == "proposed"]
    waiting: dict[int, list[int]] = {}
    for index in sorted(range(len(candidates)), key=lambda i: (-score[i], candidates[i].image_id)):
        waiting.setdefault(candidate_cluster[index], []).append(index)
    cluster_names = {cluster: number for number, cluster in enumerate(sorted(sizes, key=lambda c: (-sizes[c], c)), 1)}
    total_images = len(signals)
    taken = Counter(covered)
    items: list[ReviewItem] = []
    while waiting:
        placed = sum(taken.values()) + 1

        def behind(cluster: int) -> tuple[float, float]:
            return (sizes[cluster] * placed / total_images - taken[cluster], score[waiting[cluster][0]])

        cluster = max(waiting, key=behind)
        index = waiting[cluster].pop(0)
        if not waiting[cluster]:
            del waiting[cluster]
        item = candidates[index]
        reasons = [_describe(item, name, float(ranked[name][index])) for name in _strongest(ranked, index, used)]
        coverage = (f"group {cluster_names[cluster]} of {len(sizes)}: {sizes[cluster]} similar defect images, "
                    f"{taken[cluster]} of them edited, accepted or placed above it")
        taken[cluster] += 1
        items.append(ReviewItem(
            item.image_id, item.stem, len(items) + 1, round(float(score[index]), 6),
            "; ".join(reasons or ["no signal stands out"]) + f" — {coverage}",
            {"score": float(score[index]), "cluster": cluster_names[cluster], "cluster_size": sizes[cluster],
             **{name: float(ranked[name][index]) for name in used},
             **{f"raw_{name}": float(getattr(item, name)) for name in ("confidence", "uncertainty", "disagreement", "change")
                if getattr(item, name) is not None},
             "proposal_fraction": item.proposal_fraction},
        ))
    return items


@dataclass
class QueueEntry:
    """A mask still to review, as the queue lists it."""

    image_id: int
    stem: str
    rank: int | None  # its place in the stored edit-first order (None: not in it, e.g. proposed again since)
    reason: str | None
    flagged: bool


def edit_first_queue(project: Project, round_index: int) -> list[QueueEntry]:
    """The round's defect masks still `proposed`, in the stored edit-first order (those the order does
    not know follow in image order); in image order when the round has no stored order."""
    stems = {image.id: image.stem for image in project.images("defect")}
    order = {entry.image_id: entry for entry in project.review_order(round_index)}
    entries = []
    for record in project.mask_records(round_index=round_index, state="proposed", tag="defect"):
        ranked = order.get(record.image_id)
        entries.append(QueueEntry(record.image_id, stems[record.image_id], ranked.rank if ranked else None,
                                  ranked.reason if ranked else None, record.flagged))
    entries.sort(key=lambda e: (e.rank is None, e.rank or 0, e.image_id))
    return entries


# ------------------------------------------------------------------------------------ measuring
def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree fully (1.0)."""
    union = np.count_nonzero(first | second)
    return 1.0 if union == 0 else np.count_nonzero(first & second) / union


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    p = np.clip(probability.astype(np.float64), 1e-6, 1.0 - 1e-6)
    return -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))


def uncertainty_around(probability: np.ndarray, threshold: float, around: int = AROUND_PIXELS) -> float:
    """Mean binary entropy of the probability inside the region at or above `threshold`, widened by
    `around` pixels; with no such region, inside the 1 % most probable pixels."""
    region = probability >= threshold
    if region.any():
        size = 2 * around + 1
        region = cv2.dilate(region.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))) > 0
    else:
        region = probability >= np.percentile(probability, 99.0)
    return float(binary_entropy(probability[region]).mean())


def _cam_proposal(project: Project, image: Any, params: dict[str, Any]) -> np.ndarray | None:
    """The CAM-only pseudo-label of the image, from the CAM cache and the round's own settings."""
    from defect_studio.ml.cam_cache import CamCache
    from defect_studio.ml.pseudo import PseudoLabelSettings, pseudo_label

    method, classifier_sha = params.get("cam_method"), params.get("classifier_sha256")
    if not method or not classifier_sha:
        return None
    cam_map = CamCache(project.cache_dir).get(image.sha256, classifier_sha, method, params.get("cam_settings") or {},
                                              (image.height, image.width))
    if cam_map is None:
        return None
    mask, _, _ = pseudo_label(cam_map, PseudoLabelSettings.from_dict(params.get("settings")))
    return mask


def review_order_job(
    project: Project, round_index: int, cancel: CancelToken, classifier_path: str | Path | None = None, seed: int = 0,
) -> Generator[Progress, None, list[ReviewItem]]:
    """Measure the signals of round `round_index`'s defect images and rank its proposed masks."""
    from defect_studio.ml.cam_cache import default_classifier_path
    from defect_studio.ml.classifier import load_classifier
    from defect_studio.ml.mislabels import classifier_evidence
    from defect_studio.ml.pseudo import segmenter_checkpoint_for_round

    project.round(round_index)  # "this project has no round K"
    images = {image.id: image for image in project.images("defect")}
    records = [r for r in project.mask_records(round_index=round_index, tag="defect") if r.image_id in images]
    if not records:
        raise DataError(f"round {round_index} has no mask of a defect-tagged image: nothing to order for review.")
    if not any(r.state == "proposed" for r in records):
        raise DataError(f"round {round_index} has no mask left to review (every one is accepted, edited or rejected).")
    checkpoint = Path(classifier_path) if classifier_path is not None else default_classifier_path(project)
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint}: the classifier checkpoint is missing; train the classifier again.")
    classifier = load_classifier(checkpoint, device="cpu")
    segmenter, threshold = None, 0.5
    if round_index > 0:
        run = segmenter_checkpoint_for_round(project, round_index)
        if not Path(run.checkpoint_path).is_file():
            raise ModelError(f"{run.checkpoint_path}: the segmenter of round {run.round_index} is missing from disk.")
        from defect_studio.ml.segmenter import load_segmenter

        segmenter = load_segmenter(run.checkpoint_path, device="cpu")
        threshold = float(segmenter.threshold)
    previous = ({r.image_id: r for r in project.mask_records(round_index=round_index - 1)} if round_index > 0 else {})
    clock = EtaClock(len(records))
    signals: list[ImageSignals] = []
    for start in range(0, len(records), BATCH):
        cancel.raise_if_cancelled()
        batch = records[start : start + BATCH]
        pixels = [read_image(images[r.image_id].path) for r in batch]
        probabilities, features = classifier_evidence(classifier, pixels, BATCH)
        for record, image_pixels, probability, locations in zip(batch, pixels, probabilities, features):
            cancel.raise_if_cancelled()
            image = images[record.image_id]
            pooled = locations.float().mean(0).numpy().astype(np.float64) if len(locations) else np.zeros(1)
            pooled /= np.linalg.norm(pooled) + 1e-12
            item = ImageSignals(image.id, image.stem, record.state, pooled, float(probability))
            if record.state == "proposed":
                proposal = project.load_mask(record)
                item.proposal_fraction = float(proposal.mean())
                if segmenter is not None:
                    segmenter_probability = segmenter.probability(image_pixels)
                    item.uncertainty = uncertainty_around(segmenter_probability, threshold)
                    cam = _cam_proposal(project, image, record.params)
                    item.disagreement = 1.0 - mask_iou(cam if cam is not None else proposal, segmenter_probability >= threshold)
                    before = previous.get(image.id)
                    item.change = 1.0 - mask_iou(proposal, project.load_mask(before)) if before is not None else 0.0
            signals.append(item)
        done = min(len(records), start + BATCH)
        yield clock.progress("review order", done, images[records[done - 1].image_id].stem)
    return order_for_review(signals, seed)


def rank_for_review_job(
    project: Project, round_index: int, cancel: CancelToken, classifier_path: str | Path | None = None, seed: int = 0,
) -> Generator[Progress, None, list[ReviewItem]]:
    """`review_order_job`, then the order stored in the project (replacing the round's earlier one)."""
    items = yield from review_order_job(project, round_index, cancel, classifier_path, seed)
    project.save_review_order(round_index, [ReviewOrderEntry(i.image_id, i.rank, i.score, i.reason, i.signals)
                                            for i in items])
    return items


def rank_for_review(project: Project, round_index: int, cancel: CancelToken | None = None,
                    classifier_path: str | Path | None = None, seed: int = 0,
                    on_progress: Any = None) -> list[ReviewItem]:
    """Order round `round_index`'s proposed masks for review (edit first at rank 1) and store the
    order in the project; returns it. Call it once a round's proposals are made."""
    return run_job(rank_for_review_job(project, round_index, cancel or CancelToken(), classifier_path, seed), on_progress)
