"""The mislabel queue: images whose tag the models contradict, ranked, each with a reason.

Three signals per tagged image, each turned into "how likely is this image a defect":

- the classifier's defect probability;
- the good-image prior, **leave-fold-out**: each image's locations are compared with a memory bank of
  the good-tagged images of the *other* folds (a k-centre coreset, as in `ml.good_prior`), and the
  image scores its farthest location. The checkpoint's own bank cannot be used: it holds every good
  image's features, so a defect image wrongly tagged good finds its own defect in it (and k-centre
  picks exactly such outliers first). A second pass leaves out of the banks the good-tagged images
  that the first pass found defect-like, so a few mislabelled defects cannot hide their kind;
- the current segmenter, when the project has one: the most confident region it marks.

The raw prior and segmenter scores are calibrated against the tags themselves (isotonic regression:
"of the images scoring like this one, this share is tagged defect"); 5 % of wrong tags barely move
that. An image's defect evidence is the mean of its signals; its suspicion is that evidence for a
good-tagged image ("a confident defect region"), one minus it for a defect-tagged one ("no evidence
anywhere"). The classifier and the segmenter were trained on these very tags and may have learnt a
wrong one by heart; the leave-fold-out prior never saw the image, which is why it is there.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Sequence

import cv2
import numpy as np
import torch

from defect_studio.errors import DataError, ModelError
from defect_studio.imageio import read_image
from defect_studio.jobs import CancelToken, EtaClock, Progress
from defect_studio.ml.cams.compute import capture_stage_outputs
from defect_studio.ml.good_prior import MAX_CANDIDATES, greedy_coreset, local_features, nearest_distances
from defect_studio.project.mislabels import QUEUE_FORMAT, SUSPECT_THRESHOLD, save_queue

if TYPE_CHECKING:
    from defect_studio.project.store import Project

FOLDS = 5
DEFAULT_BANK_SIZE = 4096  # per fold; the checkpoint's own bank size when smaller
SIGNALS = ("classifier", "good_prior", "segmenter")


@dataclass
class ImageEvidence:
    image_id: int
    stem: str
    tag: str
    classifier: float  # defect probability
    prior_distance: float  # leave-fold-out: the farthest location's distance to the other folds' good images
    segmenter_score: float | None = None  # mean probability of the most confident region (None: no segmenter)
    segmenter_area: int = 0  # pixels of that region
    calibrated: dict[str, float] = field(default_factory=dict)  # signal -> P(defect | signal)


@dataclass
class Suspect:
    image_id: int
    stem: str
    tag: str
    suggested_tag: str
    suspicion: float  # in [0, 1]: how strongly the models contradict the tag
    reason: str
    evidence: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- the signals
def _content_cells(geometry: Any, feature_shape: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of a stage's feature map whose cell centres lie on image content, not padding."""
    (height, width), (input_h, input_w) = feature_shape, geometry.input_size
    rows, cols = geometry.content_slice()
    cell_h, cell_w = input_h / height, input_w / width

    def cells(span: slice, cell: float, count: int) -> slice:
        first = max(0, min(count - 1, int(math.ceil(span.start / cell - 0.5))))
        last = max(first + 1, min(count, int(math.floor((span.stop) / cell - 0.5)) + 1))
        return slice(first, last)

    return cells(rows, cell_h, height), cells(cols, cell_w, width)


@torch.no_grad()
def classifier_evidence(classifier: Any, images: Sequence[np.ndarray], batch_size: int = 16
                        ) -> tuple[np.ndarray, list[torch.Tensor]]:
    """(defect probability per image, its locations' prior-stage features as an n×C float32 tensor),
    from one forward pass per batch."""
    prior = classifier.good_prior
    stage = prior.stage if prior is not None else int(classifier.config.prior_stage)
    neighbourhood = prior.neighbourhood if prior is not None else 3
    model = classifier.model
    probabilities: list[np.ndarray] = []
    features: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        batch, geometries = classifier.prepare(list(images[start : start + batch_size]))
        with capture_stage_outputs(model, [stage - 1]) as captured:
            logits = model(batch)
            activation = captured[stage - 1].float()
        if getattr(classifier, "tiling", None) is not None:  # trained on tiles: an image scores by its tiles, as everywhere
            probabilities.append(classifier.predict_scores(list(images[start : start + batch_size])))
        else:
            probabilities.append(torch.sigmoid(logits.float().reshape(len(batch), -1)[:, 0]).cpu().numpy())
        local = local_features(activation, neighbourhood).cpu()
        for cells, geometry in zip(local, geometries):
            rows, cols = _content_cells(geometry, tuple(cells.shape[1:]))
            features.append(cells[:, rows, cols].flatten(1).T.contiguous())
    return (np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32)), features


def leave_fold_out_prior(features: Sequence[torch.Tensor], bank_from: np.ndarray, folds: np.ndarray,
                         bank_size: int, seed: int = 0, cancel: CancelToken | None = None) -> np.ndarray:
    """Each image's largest distance to a coreset of the `bank_from` images' locations outside its fold."""
    scores = np.zeros(len(features), dtype=np.float64)
    generator = torch.Generator().manual_seed(seed)
    for fold in np.unique(folds):
        if cancel is not None:
            cancel.raise_if_cancelled()
        sources = [features[i] for i in np.flatnonzero(bank_from & (folds != fold)) if len(features[i])]
        if not sources:
            raise DataError("the mislabel queue needs good-tagged images in more than one fold; tag more good images.")
        candidates = torch.cat(sources)
        if candidates.shape[0] > MAX_CANDIDATES:
            candidates = candidates[torch.randperm(candidates.shape[0], generator=generator)[:MAX_CANDIDATES]]
        bank = candidates[greedy_coreset(candidates, bank_size, seed)]
        members = np.flatnonzero(folds == fold)
        queries = [features[i] for i in members]
        if not queries:
            continue
        distances = nearest_distances(torch.cat(queries), bank)
        offset = 0
        for index, query in zip(members, queries):
            part = distances[offset : offset + len(query)]
            scores[index] = float(part.max()) if len(part) else 0.0
            offset += len(query)
    return scores


def good_prior_distances(features: Sequence[torch.Tensor], good: np.ndarray, folds: np.ndarray, bank_size: int,
                         seed: int = 0, cancel: CancelToken | None = None) -> tuple[np.ndarray, int]:
    """The leave-fold-out prior in two passes: the second leaves out of the banks the good-tagged images
    that the first finds defect-like (a defect wrongly tagged good would otherwise vouch, in the other
    folds' banks, for every defect of its kind). Returns (distances, images left out)."""
    first = leave_fold_out_prior(features, good, folds, bank_size, seed, cancel)
    defect_like = calibrate(first, ~good) >= SUSPECT_THRESHOLD
    trimmed = good & ~defect_like
    if trimmed.sum() < 2 or trimmed.sum() == good.sum():
        return first, 0
    return leave_fold_out_prior(features, trimmed, folds, bank_size, seed, cancel), int(good.sum() - trimmed.sum())


def segmenter_evidence(segmenter: Any, image: np.ndarray, min_area_fraction: float = 2e-4) -> tuple[float, int]:
    """(mean probability of the most confident region the segmenter marks, its area in pixels); with
    no region of at least `min_area_fraction` of the image, the highest probability anywhere, kept
    below the threshold."""
    probability = segmenter.probability(image)
    threshold = float(segmenter.threshold)
    marked = (probability >= threshold).astype(np.uint8)
    min_area = max(4, int(min_area_fraction * probability.size))
    best, area = None, 0
    if marked.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(marked, connectivity=8)
        for label in range(1, count):
            if stats[label, cv2.CC_STAT_AREA] < min_area:
                continue
            mean = float(probability[labels == label].mean())
            if best is None or mean > best:
                best, area = mean, int(stats[label, cv2.CC_STAT_AREA])
    if best is None:
        return min(float(probability.max()), threshold * 0.999), 0
    return best, area


# ------------------------------------------------------------------------------------- calibration
def isotonic_fit(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: a non-decreasing step function of `scores` fitting the 0/1 `targets`
    (knots: block upper score bounds, block values)."""
    order = np.argsort(scores, kind="stable")
    values: list[float] = []
    weights: list[float] = []
    uppers: list[float] = []
    for score, target in zip(scores[order], targets[order].astype(float)):
        values.append(target)
        weights.append(1.0)
        uppers.append(float(score))
        while len(values) > 1 and values[-2] >= values[-1]:
            total = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / total
            weights[-2] = total
            uppers[-2] = uppers[-1]
            del values[-1], weights[-1], uppers[-1]
    return np.asarray(uppers), np.asarray(values)


def isotonic_predict(knots: tuple[np.ndarray, np.ndarray], scores: np.ndarray) -> np.ndarray:
    uppers, values = knots
    index = np.searchsorted(uppers, scores, side="left")
    return values[np.clip(index, 0, len(values) - 1)]


def calibrate(scores: np.ndarray, is_defect: np.ndarray) -> np.ndarray:
    """P(tagged defect | score) for each image, by isotonic regression on all tagged images."""
    return isotonic_predict(isotonic_fit(np.asarray(scores, float), np.asarray(is_defect, bool)), np.asarray(scores, float))


# ------------------------------------------------------------------------------------- the queue
def _share(value: float) -> str:
    return f"{value:.0%}"


def _reason(item: ImageEvidence, population: dict[str, np.ndarray]) -> str:
    """Why the tag is doubted, the signals that contradict it first."""
    good = item.tag == "good"
    parts: list[tuple[bool, str]] = []  # (contradicts the tag, sentence)
    parts.append((
        (item.classifier >= 0.5) == good,
        f"classifier defect probability {item.classifier:.2f}",
    ))
    good_distances = population["good_prior"]
    above = float((good_distances < item.prior_distance).mean()) if len(good_distances) else 0.0
    prior_defect = item.calibrated["good_prior"]
    if prior_defect >= 0.5:
        text = (f"the good-image prior finds a spot unlike the other good images (farther from them than the most "
                f"unusual spot of {_share(above)} of the good-tagged images; {_share(prior_defect)} of the images "
                "scoring like it are tagged defect)")
    else:
        text = (f"the good-image prior finds nothing unusual (its most unusual spot is closer to the good images than "
                f"that of {_share(1.0 - above)} of the good-tagged images; {_share(prior_defect)} of the images "
                "scoring like it are tagged defect)")
    parts.append(((prior_defect >= 0.5) == good, text))
    if item.segmenter_score is not None:
        if item.segmenter_area:
            text = f"the segmenter marks a {item.segmenter_area}-pixel defect region (mean confidence {item.segmenter_score:.2f})"
        else:
            text = f"the segmenter marks no defect region (highest probability {item.segmenter_score:.2f})"
        parts.append(((item.calibrated["segmenter"] >= 0.5) == good, text))
    lead = "tagged good, but " if good else "tagged defect, but "
    contradicting = [text for contradicts, text in parts if contradicts]
    agreeing = [text for contradicts, text in parts if not contradicts]
    return lead + "; ".join(contradicting or ["the signals together lean the other way"]) + (
        f" (agreeing with the tag: {'; '.join(agreeing)})" if agreeing else "")


def rank_suspects(evidence: Sequence[ImageEvidence]) -> list[Suspect]:
    """Every tagged image ranked by how strongly the models contradict its tag (most first)."""
    if not evidence:
        return []
    is_defect = np.array([e.tag == "defect" for e in evidence])
    prior = calibrate(np.array([e.prior_distance for e in evidence]), is_defect)
    has_segmenter = all(e.segmenter_score is not None for e in evidence)
    segmenter = calibrate(np.array([e.segmenter_score for e in evidence]), is_defect) if has_segmenter else None
    population = {"good_prior": np.array([e.prior_distance for e in evidence if e.tag == "good"])}
    suspects = []
    for index, item in enumerate(evidence):
        item.calibrated = {"classifier": float(item.classifier), "good_prior": float(prior[index])}
        if segmenter is not None:
            item.calibrated["segmenter"] = float(segmenter[index])
        defect_evidence = float(np.mean(list(item.calibrated.values())))
        suspicion = defect_evidence if item.tag == "good" else 1.0 - defect_evidence
        suspects.append(Suspect(
            item.image_id, item.stem, item.tag, "defect" if item.tag == "good" else "good", round(suspicion, 6),
            _reason(item, population),
            {"defect_evidence": defect_evidence, "classifier": float(item.classifier),
             "prior_distance": float(item.prior_distance), **{f"calibrated_{k}": v for k, v in item.calibrated.items()},
             **({"segmenter_score": float(item.segmenter_score), "segmenter_area": item.segmenter_area}
                if item.segmenter_score is not None else {})},
        ))
    suspects.sort(key=lambda s: (-s.suspicion, s.image_id))
    return suspects


@dataclass
class LabelledImage:
    image_id: int
    stem: str
    tag: str
    path: Path


def assign_folds(count: int, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(count) % max(1, min(folds, count)))


def mislabel_evidence_job(
    images: Sequence[LabelledImage], classifier: Any, cancel: CancelToken, segmenter: Any = None,
    seed: int = 0, folds: int = FOLDS, bank_size: int | None = None,
) -> Generator[Progress, None, list[ImageEvidence]]:
    """The three signals of every tagged image (see the module's docstring)."""
    tags = [image.tag for image in images]
    if "good" not in tags or "defect" not in tags:
        raise DataError("the mislabel queue needs images tagged good and images tagged defect.")
    if bank_size is None:
        own = int(classifier.good_prior.bank.shape[0]) if classifier.good_prior is not None else DEFAULT_BANK_SIZE
        bank_size = min(DEFAULT_BANK_SIZE, own)
    clock = EtaClock(len(images))
    probabilities, features = [], []
    batch = 16
    for start in range(0, len(images), batch):
        cancel.raise_if_cancelled()
        pixels = [read_image(image.path) for image in images[start : start + batch]]
        p, f = classifier_evidence(classifier, pixels, batch)
        probabilities.append(p)
        features.extend(f)
        yield clock.progress("mislabels: classifier", min(len(images), start + batch), images[min(len(images), start + batch) - 1].stem)
    probability = np.concatenate(probabilities)
    fold_of = assign_folds(len(images), folds, seed)
    good = np.array([tag == "good" for tag in tags])
    yield Progress("mislabels: good-image prior", 0, 1, "leave-fold-out banks")
    distances, left_out = good_prior_distances(features, good, fold_of, bank_size, seed, cancel)
    yield Progress("mislabels: good-image prior", 1, 1, f"{left_out} defect-like good image(s) left out of the banks")
    evidence = [ImageEvidence(image.image_id, image.stem, image.tag, float(probability[i]), float(distances[i]))
                for i, image in enumerate(images)]
    if segmenter is not None:
        clock = EtaClock(len(images))
        for done, (image, item) in enumerate(zip(images, evidence), start=1):
            cancel.raise_if_cancelled()
            item.segmenter_score, item.segmenter_area = segmenter_evidence(segmenter, read_image(image.path))
            yield clock.progress("mislabels: segmenter", done, image.stem)
    return evidence


# ------------------------------------------------------------------------------------- the project job
def mislabel_job(
    project: Project, cancel: CancelToken, classifier_path: str | Path | None = None, use_segmenter: bool = True,
    seed: int = 0,
) -> Generator[Progress, None, dict[str, Any]]:
    """Rank the project's tagged images by how strongly the models contradict their tags, and save the
    queue (`cache/mislabels.json`, derived data: the project's tags and decisions stay in the database)."""
    from defect_studio.ml.cam_cache import default_classifier_path
    from defect_studio.ml.classifier import load_classifier

    checkpoint = Path(classifier_path) if classifier_path is not None else default_classifier_path(project)
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint}: the classifier checkpoint is missing; train the classifier first.")
    classifier = load_classifier(checkpoint, device="cpu")
    segmenter, segmenter_sha = None, None
    if use_segmenter:
        run = project.current_segmenter()
        if run is not None and Path(run.checkpoint_path).is_file():
            from defect_studio.ml.segmenter import load_segmenter

            segmenter = load_segmenter(run.checkpoint_path, device="cpu")
            segmenter_sha = segmenter.checkpoint_sha256
    images = [LabelledImage(r.id, r.stem, r.tag, r.path) for r in project.images() if r.tag in ("good", "defect")]
    evidence = yield from mislabel_evidence_job(images, classifier, cancel, segmenter, seed)
    suspects = rank_suspects(evidence)
    tags_hash = hashlib.sha256(json.dumps(sorted((i.image_id, i.tag) for i in images)).encode()).hexdigest()
    queue = {
        "format": QUEUE_FORMAT,
        "classifier_sha256": classifier.checkpoint_sha256,
        "segmenter_sha256": segmenter_sha,
        "tags_sha256": tags_hash,
        "seed": seed,
        "segmenter_wanted": use_segmenter,
        "signals": [s for s in SIGNALS if s != "segmenter" or segmenter is not None],
        "ranked": [s.as_dict() for s in suspects],
    }
    save_queue(project, queue)
    return queue
