"""`defect-studio bench full`: the whole weak loop against full supervision, with time per stage.

classifier -> CAMs -> round-0 pseudo-labels -> N refinement rounds in which every proposal is
accepted (a user who accepts everything) -> the final segmenter on the test split; and the same
segmenter (same config, same number of steps) trained on the ground-truth masks of the same
training images: the upper bound. The loop runs through the real project store and jobs, in a
temporary project whose images are the dataset's; only training-split images are tagged.

`--edits-per-round K` simulates a careful user instead: each round, K defect images not edited
before get their ground-truth mask as the user's edit (locked for later rounds, as in the app);
with `--reject-unedited` the user also rejects every other defect proposal, so the segmenter
trains on the edits and the good images only. This measures how far hand-edited masks carry
the loop when the CAMs do not localise. `--edit-order ranked` makes the user edit the head of each
round's edit-first order (`ml.review_order`) instead of K images at random; `--no-upper-bound`
skips the ground-truth segmenter (comparing reviewers, it is the same for both).

Reported: test-split segmentation (defect/background IoU, mIoU, Dice, image-level detection
P/R/F1, false-positive rate on good images), per defect type, per round (pseudo-label quality on
the training split, mask change, the round's segmenter on the test split), the pseudo-label
threshold modes on the round-0 CAMs (training split), the classifier's test scores, wall time of
each stage and peak memory.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from defect_studio.bench.report import write_report
from defect_studio.dataset_layout import DatasetSample, load_dataset
from defect_studio.imageio import read_image, read_mask
from defect_studio.jobs import CancelToken, Progress, run_job
from defect_studio.key_values import parse_key_values
from defect_studio.ml.device import describe_device, peak_memory_mb, select_device
from defect_studio.ml.evaluate import (
    SUMMARY_COLUMNS,
    evaluate_pairs,
    summary_row,
)
from defect_studio.ml.pseudo import PseudoLabelSettings, pseudo_label
from defect_studio.ml.refine import RefineConfig, refine_job
from defect_studio.ml.segmenter import (
    LoadedSegmenter,
    SegmentationSample,
    SegmenterConfig,
    load_segmenter,
    make_target,
    train_segmenter_job,
)

if TYPE_CHECKING:
    from defect_studio.project.store import Project

ROUNDS = 3
FULL_SEGMENTER: dict[str, Any] = {}  # the app's defaults
# The classifier trains a fixed number of epochs here, not to the app's wall-clock budget: the quality numbers
# must not depend on how busy the machine is (8 epochs is what the budget gives on an idle 2-core machine).
FULL_CLASSIFIER: dict[str, Any] = dict(epochs=8, min_epochs=8, max_train_seconds=None, threads=None)
QUICK_SEGMENTER = dict(crop_size=64, batch_size=8, epochs=3, warm_start_epochs=1, steps_per_epoch=8)
QUICK_SIZES = {"train_defect": 24, "train_good": 24, "test_defect": 12, "test_good": 12}
QUICK_ROUNDS = 2
DATASET_SHORT_NAMES = {"magnetic-tile": "mt"}  # report file names: docs/benchmarks/full-mt.md
PSEUDO_ABLATION = {
    "fixed 0.5/0.25": dict(mode="fixed", high=0.5, low=0.25),
    "fixed 0.3/0.15": dict(mode="fixed", high=0.3, low=0.15),
    "fixed 0.2/0.1": dict(mode="fixed", high=0.2, low=0.1),
    "fixed 0.1/0.05": dict(mode="fixed", high=0.1, low=0.05),
    "percentile 98/95": dict(mode="percentile", high_percentile=98.0, low_percentile=95.0),
    "percentile 90/80": dict(mode="percentile", high_percentile=90.0, low_percentile=80.0),
    "percentile 80/65": dict(mode="percentile", high_percentile=80.0, low_percentile=65.0),
    "otsu": dict(mode="otsu"),
}


def _subset(samples: list[DatasetSample], quick: bool, seed: int) -> tuple[list[DatasetSample], list[DatasetSample]]:
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    if not quick:
        return train, test
    rng = random.Random(seed)

    def pick(items: list[DatasetSample], label: str, count: int) -> list[DatasetSample]:
        chosen = [s for s in items if s.label == label]
        rng.shuffle(chosen)
        return sorted(chosen[:count], key=lambda s: s.stem)

    return (
        pick(train, "defect", QUICK_SIZES["train_defect"]) + pick(train, "good", QUICK_SIZES["train_good"]),
        pick(test, "defect", QUICK_SIZES["test_defect"]) + pick(test, "good", QUICK_SIZES["test_good"]),
    )


class StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return function()
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started


def _printer(as_json: bool) -> Callable[[Progress], None]:
    last: dict[str, float] = {}

    def show(event: Progress) -> None:
        if as_json:
            print(event.to_json(), flush=True)
            return
        now = time.monotonic()
        final = event.total is not None and event.step >= event.total
        if final or now - last.get(event.stage, 0.0) > 10.0:
            last[event.stage] = now
            total = f"/{event.total}" if event.total else ""
            metrics = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.metrics.items())
            print(f"  [{event.stage}] {event.step}{total} {event.message[:40]} {metrics}", file=sys.stderr, flush=True)

    return show


EDIT_ORDERS = ("random", "ranked")  # how the simulated user picks the masks it edits


class SimulatedReviewer:
    """The review step of each round, done by a user who edits `edits_per_round` masks (drawing
    the ground truth) and accepts or rejects the rest, through the project's review API.

    `edit_order` "random" picks the images to edit at random; "ranked" takes the head of the round's
    edit-first order (`ml.review_order.rank_for_review`, which never sees the ground truth; the
    `classifier_path` it needs is set once the bench has its classifier)."""

    def __init__(self, train: list[DatasetSample], edits_per_round: int, reject_unedited: bool, seed: int,
                 edit_order: str = "random", classifier_path: Path | None = None) -> None:
        if edit_order not in EDIT_ORDERS:
            raise ValueError(f"edit order must be one of {', '.join(EDIT_ORDERS)}, got {edit_order!r}")
        self.truth_of = {sample.stem: sample for sample in train}
        self.edits_per_round = edits_per_round
        self.reject_unedited = reject_unedited
        self.edit_order = edit_order
        self.classifier_path = classifier_path
        self.seed = seed
        self.random = random.Random(seed)
        self.edited: set[int] = set()
        self.ordering_seconds = 0.0

    def describe(self) -> str:
        if not self.edits_per_round and not self.reject_unedited:
            return "all accepted"
        rest = "the rest rejected" if self.reject_unedited else "the rest accepted"
        order = " in the edit-first order" if self.edit_order == "ranked" and self.edits_per_round else ""
        return f"{self.edits_per_round} edited per round{order}, {rest}"

    def note(self) -> str:
        """What the simulated user did, for the report."""
        return review_note(self.edits_per_round, self.reject_unedited, self.edit_order)

    def _to_edit(self, project: Project, round_index: int) -> list[Any]:
        if self.edit_order == "ranked":
            from defect_studio.ml.review_order import rank_for_review

            started = time.monotonic()
            order = rank_for_review(project, round_index, classifier_path=self.classifier_path, seed=self.seed)
            self.ordering_seconds += time.monotonic() - started
            ranked = [project.image(item.image_id) for item in order if item.image_id not in self.edited]
            return ranked[: self.edits_per_round]
        candidates = [image for image in project.images("defect") if image.id not in self.edited]
        return self.random.sample(candidates, min(self.edits_per_round, len(candidates)))

    def __call__(self, project: Project, round_index: int) -> None:
        from defect_studio.project import review

        if self.edits_per_round:
            for image in self._to_edit(project, round_index):
                review.save_edit(project, image.id, self.truth_of[image.stem].truth((image.height, image.width)),
                                 round_index)
                self.edited.add(image.id)
        if self.reject_unedited:
            review.reject_rest(project, round_index)  # Shift+R in the window


def review_note(edits_per_round: int, reject_unedited: bool, edit_order: str = "random") -> str:
    """The report's sentence on what happened to each round's proposals."""
    tail = ("good-tagged images train as all-background; the ignore band is left out of the loss (from round 1 on it "
            "also covers the pixels where the fused proposal and the CAM's own disagree).")
    if not edits_per_round and not reject_unedited:
        return ("Every round's proposals were used as they came (a user who accepts everything without clicking accept: "
                "an explicit accept locks a mask for all later rounds, which would freeze the round-0 CAM masks); " + tail)
    parts = []
    if edits_per_round:
        chosen = "taken from the head of the round's edit-first order" if edit_order == "ranked" else "chosen at random"
        parts.append(f"Each round the simulated user drew the ground-truth mask of {edits_per_round} more defect images, "
                     f"{chosen}; edited masks are locked for later rounds.")
    if reject_unedited:
        parts.append("Every other defect proposal was rejected (Shift+R): those images sat the round out.")
    else:
        parts.append("The other proposals were used as they came.")
    return " ".join(parts) + " " + tail[0].upper() + tail[1:]


def _type_mean(per_type: dict[str, Any]) -> float:
    """Mean over defect types of each type's pooled defect IoU (good images excluded)."""
    values = [m["defect_iou"] for kind, m in per_type.items() if kind not in ("good", None) and "defect_iou" in m]
    return float(np.nanmean(values)) if values else float("nan")


def _evaluate_segmenter(model: LoadedSegmenter, test: list[DatasetSample]) -> dict[str, Any]:
    def pairs():
        for sample in test:
            image = read_image(sample.image_path)
            truth = sample.truth(image.shape[:2])
            yield truth, model.mask(image), sample.label == "defect", sample.defect_type

    return evaluate_pairs(pairs())


def _one_view(model: LoadedSegmenter) -> LoadedSegmenter | None:
    """The same segmenter predicting from the image alone (no test-time flips, the same threshold and gate), to
    show what the flipped views add; None when it already predicts from one view."""
    if model.prediction_flips == "none":
        return None
    return dataclasses.replace(model, meta={**model.meta, "config": {**model.meta["config"], "prediction_flips": "none"}})


def _evaluate_with_one_view(bench: FullBench, model: LoadedSegmenter) -> dict[str, Any]:
    """_evaluate_segmenter, plus under "one_view" the same without test-time flips (when it uses them)."""
    metrics = bench.clock.run("evaluation", lambda: _evaluate_segmenter(model, bench.test))
    single = _one_view(model)
    if single is not None:
        metrics["one_view"] = bench.clock.run("evaluation", lambda: _evaluate_segmenter(single, bench.test))
    return metrics


def _classifier_scores(path: Path, test: list[DatasetSample]) -> dict[str, Any]:
    from defect_studio.ml.classifier import load_classifier
    from defect_studio.ml.metrics import auroc, binary_scores

    classifier = load_classifier(path, select_device("auto"))
    scores = []
    for start in range(0, len(test), 32):
        scores.extend(classifier.predict_scores([read_image(s.image_path) for s in test[start : start + 32]]))
    labels = np.array([s.label == "defect" for s in test])
    predictions = np.array(scores) > classifier.decision_threshold
    binary = binary_scores(labels, predictions)
    return {"test_auroc": auroc(labels, np.array(scores)), "test_f1": binary.f1, "test_accuracy": binary.accuracy,
            "test_precision": binary.precision, "test_recall": binary.recall}


def _pseudo_ablation(project: Project, classifier_sha: str, method: str, cam_settings: dict[str, Any],
                     train: list[DatasetSample]) -> list[dict[str, Any]]:
    """Each threshold mode on the round-0 CAMs (from the cache) vs ground truth on the training split."""
    from defect_studio.ml.cam_cache import CamCache
    from defect_studio.ml.metrics import SegmentationTally

    cache = CamCache(project.cache_dir)
    by_stem = {image.stem: image for image in project.images("defect")}
    maps = []
    for sample in train:
        image = by_stem.get(sample.stem)
        if image is None or sample.mask_path is None:
            continue
        cam_map = cache.get(image.sha256, classifier_sha, method, cam_settings, (image.height, image.width))
        if cam_map is not None:
            maps.append((cam_map, read_mask(sample.mask_path, cam_map.shape)))
    rows = []
    for name, values in PSEUDO_ABLATION.items():
        settings = PseudoLabelSettings.from_dict(values)
        tally, ignored, empty = SegmentationTally(), 0, 0
        for cam_map, truth in maps:
            mask, ignore, _ = pseudo_label(cam_map, settings)
            tally.add(truth, mask)
            ignored += int(ignore.sum())
            empty += int(not mask.any())
        pixels = sum(t.size for _, t in maps) or 1
        rows.append({"method": method, "thresholds": name, "defect IoU": tally.defect_iou, "mIoU": tally.miou, "Dice": tally.dice,
                     "ignored px %": 100.0 * ignored / pixels, "empty masks": empty, "images": len(maps)})
    return rows


def _app_defaults_note(ablation: list[dict[str, Any]]) -> str:
    """What a project's defaults (no threshold chosen on ground truth) give on the training split, when measured."""
    from defect_studio.ml.cams import DEFAULT_CAM_METHOD

    defaults = PseudoLabelSettings()
    name = f"fixed {defaults.high:g}/{defaults.low:g}" if defaults.mode == "fixed" else defaults.mode
    row = next((r for r in ablation if r["method"] == DEFAULT_CAM_METHOD and r["thresholds"] == name), None)
    if row is None:
        return (f"The app's defaults ({DEFAULT_CAM_METHOD}, {defaults.mode} {defaults.high:g}/{defaults.low:g}) were "
                "not among the CAMs measured here (--method).")
    return (f"With the app's defaults instead ({DEFAULT_CAM_METHOD}, {name}; nothing chosen on ground truth) the round-0 "
            f"proposals would score {row['defect IoU']:.3f} pooled defect IoU on the training split.")


@dataclass
class FullBench:
    """One run of the full bench: its options, and what the steps hand on to each other."""

    dataset: Path
    quick: bool
    out: Path
    seed: int
    classifier_path: Path | None
    as_json: bool
    rounds: int
    segmenter: dict[str, Any]
    method: str | None
    reviewer: SimulatedReviewer
    upper_bound: bool = True
    keep_project: Path | None = None
    app_defaults: bool = False  # propose as a new project does: no threshold chosen on ground truth
    train: list[DatasetSample] = field(default_factory=list)
    test: list[DatasetSample] = field(default_factory=list)
    clock: StageClock = field(default_factory=StageClock)
    show: Callable[[Progress], None] = print
    classifier_note: str = ""
    cam_settings: dict[str, Any] = field(default_factory=dict)
    pseudo: dict[str, Any] = field(default_factory=dict)


def _write_train_labels(bench: FullBench, work: Path) -> Path:
    """The training split's tags as a CSV the importer reads (test images stay untagged)."""
    labels_csv = work / "train-labels.csv"
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stem", "label"])
        writer.writerows((s.stem, s.label) for s in bench.train)
    return labels_csv


def _classifier_step(bench: FullBench, project: Project) -> dict[str, Any]:
    """Train the classifier (or reuse --classifier) and score it on the test split."""
    from defect_studio.bench.classifier import DEFAULT_CANDIDATE, candidate_config
    from defect_studio.ml.classifier import train_project_classifier_job

    if bench.classifier_path is None:
        config = candidate_config(DEFAULT_CANDIDATE, bench.seed, bench.quick, **({} if bench.quick else FULL_CLASSIFIER))
        bench.clock.run("classifier", lambda: run_job(train_project_classifier_job(project, config, CancelToken()), bench.show))
        bench.classifier_path = Path(project.latest_run("classifier").checkpoint_path)
        bench.classifier_note = f"trained here ({DEFAULT_CANDIDATE})"
    else:
        if not bench.classifier_path.is_file():
            raise SystemExit(f"--classifier {bench.classifier_path}: no such file.")
        bench.clock.seconds["classifier"] = 0.0
        bench.classifier_note = f"reused {bench.classifier_path.name} (not timed)"
        if bench.method in (None, "affinity-walk"):
            _add_missing_affinity_head(bench, project)
    bench.reviewer.classifier_path = bench.classifier_path
    path = bench.classifier_path
    return bench.clock.run("classifier evaluation", lambda: _classifier_scores(path, bench.test))


def _add_missing_affinity_head(bench: FullBench, project: Project) -> None:
    """A reused classifier from before the affinity head gets one (a copy in the bench's project; timed)."""
    from defect_studio.ml.affinity import add_affinity_head
    from defect_studio.ml.classifier import load_classifier

    if load_classifier(bench.classifier_path).affinity is not None:
        return
    source = bench.classifier_path
    target = project.models_dir / f"{source.stem}-affinity.pt"
    images = project.images()
    bench.classifier_path = bench.clock.run("affinity head", lambda: run_job(add_affinity_head(
        source, target, [Path(i.path) for i in images if i.tag == "defect"], [Path(i.path) for i in images if i.tag == "good"],
        CancelToken()), bench.show))
    bench.classifier_note += "; its affinity head trained here (timed)"


def _cam_step(bench: FullBench, project: Project) -> list[dict[str, Any]]:
    """CAMs of the defect-tagged images for every method (or --method); the method and thresholds are
    chosen on the training split against its ground truth (method.md: defaults are chosen by the
    benchmark on the training split). Only the chosen method's CAM time counts in the weak loop.
    Returns the threshold ablation."""
    from defect_studio.ml.cam_cache import cam_job
    from defect_studio.ml.cams import CAM_METHODS, DEFAULT_CAM_METHOD, resolve_settings

    defect_ids = [image.id for image in project.images("defect")]
    methods = [bench.method] if bench.method else [DEFAULT_CAM_METHOD] if bench.app_defaults else list(CAM_METHODS)
    cam_seconds: dict[str, float] = {}
    ablation: list[dict[str, Any]] = []
    for name in methods:
        started = time.monotonic()
        cams = run_job(cam_job(project, name, resolve_settings(name, None), CancelToken(),
                               classifier_path=bench.classifier_path, image_ids=defect_ids), bench.show)
        cam_seconds[name] = time.monotonic() - started
        ablation += _pseudo_ablation(project, cams["checkpoint_sha256"], name, resolve_settings(name, None), bench.train)
    if bench.app_defaults:  # the method asked for (methods holds just it), the thresholds a new project has
        bench.method = methods[0]
        bench.pseudo = PseudoLabelSettings().to_dict()
    else:
        # By mIoU, not defect IoU: on MT a labelling that marks nearly every pixel of a defect image
        # has the best defect IoU, and a segmenter trained on it flags every good image too.
        best = max(ablation, key=lambda row: (np.nan_to_num(row["mIoU"], nan=-1.0), row["defect IoU"]))
        bench.method = best["method"]
        bench.pseudo = PseudoLabelSettings.from_dict(PSEUDO_ABLATION[best["thresholds"]]).to_dict()
    bench.cam_settings = resolve_settings(bench.method, None)
    bench.clock.seconds["CAMs"] = cam_seconds[bench.method]
    bench.clock.seconds["CAM selection (all methods, not in the loop)"] = sum(cam_seconds.values())
    return ablation


def _rounds_step(bench: FullBench, project: Project) -> dict[str, Any]:
    """The refinement rounds, reviewed by the simulated user (by default: every proposal used as it came)."""
    config = RefineConfig(method=str(bench.method), cam_settings=bench.cam_settings, pseudo=bench.pseudo,
                          segmenter=bench.segmenter, stop_change=0.0)
    return bench.clock.run("rounds", lambda: run_job(refine_job(
        project, bench.rounds, CancelToken(), bench.reviewer, bench.dataset, config, bench.classifier_path), bench.show))


def _round_rows(bench: FullBench, project: Project, summary: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each round's proposals against the training ground truth and its segmenter on the test split;
    (the rows, the last round's test metrics)."""
    rows = []
    final_metrics: dict[str, Any] = {}
    runs = list(zip(summary["rounds"], project.training_runs("segmenter")))
    for index, (entry, run_record) in enumerate(runs):
        model = load_segmenter(run_record.checkpoint_path)
        if index + 1 == len(runs):
            metrics = _evaluate_with_one_view(bench, model)
        else:
            metrics = bench.clock.run("evaluation", lambda: _evaluate_segmenter(model, bench.test))
        final_metrics = metrics
        truth = entry.get("ground_truth", {})
        rows.append({
            "round": entry["round"],
            "pseudo defect IoU (train)": truth.get("defect_iou", float("nan")),
            "pseudo type-mean IoU (train)": _type_mean(truth.get("per_type", {})),
            "pseudo mIoU (train)": truth.get("miou", float("nan")),
            "mask change": entry["mask_change"] if entry["mask_change"] is not None else float("nan"),
            "flagged empty": entry["review"]["flagged"],
            "edited": entry["review"]["states"]["edited"],
            "rejected": entry["review"]["states"]["rejected"],
            "segmenter test defect IoU": metrics["defect_iou"],
            "segmenter test mIoU": metrics["miou"],
            "det. F1": metrics["detection_f1"],
            "pseudo s": entry.get("pseudo_s", 0.0),
            "train s": entry.get("train_s", 0.0),
            "s/epoch": entry.get("segmenter", {}).get("seconds_per_epoch", float("nan")),
        })
    return rows, final_metrics


def _weak_loop_seconds(bench: FullBench, round_rows: list[dict[str, Any]]) -> dict[str, float]:
    seconds = bench.clock.seconds
    weak = {
        "classifier": seconds.get("classifier", 0.0),
        "CAMs": seconds["CAMs"],
        "pseudo-labels": sum(r["pseudo s"] for r in round_rows),
        "segmenter training": sum(r["train s"] for r in round_rows),
    }
    if "affinity head" in seconds:  # trained here for a reused classifier (a classifier trains its own)
        weak["affinity head"] = seconds["affinity head"]
    if bench.reviewer.ordering_seconds:
        weak["edit-first order"] = bench.reviewer.ordering_seconds
    weak["other (review, metrics, I/O)"] = (seconds["CAMs"] + seconds["rounds"] + seconds.get("classifier", 0.0)
                                            + seconds.get("affinity head", 0.0) - sum(weak.values()))
    return weak


def _upper_bound_step(bench: FullBench, work: Path, trained_epochs: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The same segmenter on the ground-truth masks of the same images, for as many training steps from
    random init as the weak loop's rounds took together; (test metrics, training metrics), or
    (None, {}) with --no-upper-bound."""
    if not bench.upper_bound:
        return None, {}
    upper_bound = {**bench.segmenter, "epochs": trained_epochs}

    def gt_samples() -> list[SegmentationSample]:
        samples = []
        for sample in bench.train:
            image = read_image(sample.image_path)
            truth = sample.truth(image.shape[:2])
            samples.append(SegmentationSample(sample.stem, image.astype(np.float16), make_target(truth)))
        return samples

    full_path = work / "segmenter-gt.pt"
    result = bench.clock.run("upper bound training", lambda: run_job(
        train_segmenter_job(gt_samples(), SegmenterConfig.from_dict(upper_bound), full_path, CancelToken(),
                            classifier_path=bench.classifier_path), bench.show))
    return _evaluate_with_one_view(bench, load_segmenter(full_path)), result.metrics


def report_name(dataset: Path, bench_options: dict[str, Any]) -> str:
    """full-mt, full-mt-edit30-reject, full-mt-edit30-reject-ranked, ... (docs/benchmarks/)."""
    short = DATASET_SHORT_NAMES.get(dataset.resolve().name, dataset.resolve().name)
    edits = bench_options.get("edits_per_round", 0)
    return (f"full-{short}" + (f"-edit{edits}" if edits else "")
            + ("-reject" if bench_options.get("reject_unedited") else "")
            + ("-ranked" if edits and bench_options.get("edit_order") == "ranked" else "")
            + ("-quick" if bench_options.get("quick") else ""))


def _report(bench: FullBench, summary: dict[str, Any], round_rows: list[dict[str, Any]], final_metrics: dict[str, Any],
            full_metrics: dict[str, Any] | None, full_training: dict[str, Any], weak_seconds: dict[str, float],
            ablation: list[dict[str, Any]], classifier_metrics: dict[str, Any], trained_epochs: int,
            load_at_start: float, device: Any) -> tuple[str, float]:
    """Write the report's tables and notes; (the markdown, weak/full ratio)."""
    import os

    clock, reviewer = bench.clock, bench.reviewer
    weak_total = sum(weak_seconds.values())
    full_iou = full_metrics["defect_iou"] if full_metrics else float("nan")
    ratio = final_metrics["defect_iou"] / full_iou if full_metrics and full_iou else float("nan")
    summary_rows = [summary_row(f"weak: CAM ({bench.method}) + {bench.rounds} rounds, {reviewer.describe()}", final_metrics)]
    if full_metrics:
        summary_rows.append(summary_row(f"upper bound: same segmenter on ground-truth masks, {trained_epochs} epochs", full_metrics))
    for name, metrics in (("weak", final_metrics), ("upper bound", full_metrics or {})):
        if "one_view" in metrics:
            summary_rows.append(summary_row(f"{name}, one view (no test-time flips; same threshold and gate)",
                                            metrics["one_view"]))
    full_types = full_metrics["per_type"] if full_metrics else {}
    kinds = sorted(set(final_metrics["per_type"]) | set(full_types))
    type_rows = [
        {"type": kind,
         "weak defect IoU": final_metrics["per_type"].get(kind, {}).get("defect_iou", float("nan")),
         "full defect IoU": full_types.get(kind, {}).get("defect_iou", float("nan")),
         "images": final_metrics["per_type"].get(kind, {}).get("images", 0)}
        for kind in kinds
    ]
    time_rows = [{"stage": k, "seconds": v, "share %": 100.0 * v / weak_total if weak_total else float("nan")}
                 for k, v in weak_seconds.items()]
    time_rows.append({"stage": "weak loop total", "seconds": weak_total, "share %": 100.0})
    if full_metrics:
        time_rows.append({"stage": "upper bound training (not in the loop)", "seconds": clock.seconds["upper bound training"],
                          "share %": float("nan")})
    time_rows.append({"stage": "test evaluation (not in the loop)", "seconds": clock.seconds["evaluation"], "share %": float("nan")})
    time_rows.append({"stage": "CAMs of every method, for the choice (not in the loop)",
                      "seconds": clock.seconds["CAM selection (all methods, not in the loop)"], "share %": float("nan")})
    time_rows.append({"stage": "import (not in the loop)", "seconds": clock.seconds["import"], "share %": float("nan")})
    classifier_rows = [{"classifier": bench.classifier_note, **classifier_metrics}]
    train, test = bench.train, bench.test
    bound = (f"full {full_iou:.3f} (target >= 0.55); " if full_metrics else "no upper bound trained (--no-upper-bound); ")
    notes = [
        f"{len(train)} training images ({sum(s.label == 'defect' for s in train)} defect), {len(test)} test images"
        + (" — quick subset" if bench.quick else "") + f"; seed {bench.seed}; device {describe_device(device)}.",
        f"Round-0 proposals on the training split: pooled defect IoU {round_rows[0]['pseudo defect IoU (train)']:.3f} "
        f"(target >= 0.35), mean over defect types {round_rows[0]['pseudo type-mean IoU (train)']:.3f} (target >= 0.25). "
        + (f"Weak / full test defect IoU: {ratio:.2f} (target >= 0.70); " if full_metrics else "")
        + f"Weak defect IoU {final_metrics['defect_iou']:.3f} "
        f"(target >= 0.35); {bound}weak loop {weak_total / 60:.1f} min (target <= 20 min on MT).",
        f"Segmenter: {SegmenterConfig.from_dict(bench.segmenter).to_dict()}; round 0 from random init, later rounds warm-started "
        f"from the previous round" + (f"; the upper bound from random init for the {trained_epochs} epochs of all rounds together."
                                      if full_metrics else "."),
        (f"The app's defaults, nothing chosen on ground truth (--app-defaults): CAM {bench.method} {bench.cam_settings}; "
         f"pseudo-labels {bench.pseudo}." if bench.app_defaults else
         f"Chosen on the training split: CAM {bench.method} {bench.cam_settings}; pseudo-labels {bench.pseudo}."),
        _app_defaults_note(ablation),
        f"Review: {reviewer.describe()}. {reviewer.note()}",
        f"Peak memory (max RSS of the process): {peak_memory_mb(device):.0f} MiB. Load average at start/end: "
        f"{load_at_start:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings include any contention).",
    ]
    tables = [
        ("Test split: weak loop vs full supervision", summary_rows, SUMMARY_COLUMNS),
        ("Per defect type (test split)", type_rows, ["type", "weak defect IoU", "full defect IoU", "images"]),
        ("Per round", round_rows, list(round_rows[0]) if round_rows else ["round"]),
        ("Where the time goes (weak loop)", time_rows, ["stage", "seconds", "share %"]),
        ("CAM method and pseudo-label thresholds on the training split (vs ground truth; the best mIoU is used)", ablation,
         ["method", "thresholds", "defect IoU", "mIoU", "Dice", "ignored px %", "empty masks", "images"]),
        ("Classifier (test split)", classifier_rows,
         ["classifier", "test_auroc", "test_f1", "test_precision", "test_recall", "test_accuracy"]),
    ]
    name = report_name(bench.dataset, {"edits_per_round": reviewer.edits_per_round, "reject_unedited": reviewer.reject_unedited,
                                       "edit_order": reviewer.edit_order, "quick": bench.quick})
    markdown = write_report(bench.out, name, "Full benchmark: weak loop vs full supervision", tables, notes,
                            extra={"weak": final_metrics, "full": full_metrics, "ratio": ratio,
                                   "seconds": clock.seconds, "weak_seconds": weak_seconds, "rounds": summary["rounds"],
                                   "upper_bound_training": full_training, "quick": bench.quick, "seed": bench.seed,
                                   "edits_per_round": reviewer.edits_per_round, "reject_unedited": reviewer.reject_unedited,
                                   "edit_order": reviewer.edit_order, "edited_images": sorted(reviewer.edited),
                                   "peak_memory_mb": peak_memory_mb(device), "method": bench.method, "pseudo": bench.pseudo})
    return markdown, ratio


def run(dataset: Path, quick: bool, out: Path, seed: int, classifier_path: Path | None, as_json: bool,
        rounds: int | None = None, segmenter_overrides: dict[str, Any] | None = None,
        method: str | None = None, edits_per_round: int = 0, reject_unedited: bool = False,
        keep_project: Path | None = None, edit_order: str = "random", upper_bound: bool = True,
        app_defaults: bool = False) -> dict[str, Any]:
    from defect_studio.project import Project
    from defect_studio.project.importer import import_job

    import os

    torch.manual_seed(seed)
    load_at_start = os.getloadavg()[0]
    device = select_device("auto")
    train, test = _subset(load_dataset(dataset, seed), quick, seed)
    bench = FullBench(
        dataset=dataset, quick=quick, out=out, seed=seed, classifier_path=classifier_path, as_json=as_json,
        rounds=rounds or (QUICK_ROUNDS if quick else ROUNDS),
        segmenter={**(QUICK_SEGMENTER if quick else FULL_SEGMENTER), "seed": seed, **(segmenter_overrides or {})},
        method=method, reviewer=SimulatedReviewer(train, edits_per_round, reject_unedited, seed, edit_order),
        upper_bound=upper_bound, keep_project=keep_project, app_defaults=app_defaults, train=train, test=test,
        show=_printer(as_json))
    # A kept project is made where it stays: it finds its images by a path relative to its own folder.
    if keep_project is not None and keep_project.exists() and any(keep_project.iterdir()):
        raise SystemExit(f"--keep-project {keep_project}: the folder is not empty; name a new one.")
    work = Path(tempfile.mkdtemp(prefix="ds-bench-full-"))
    try:
        labels_csv = _write_train_labels(bench, work)
        project_dir = keep_project if keep_project is not None else work / "project"
        with Project.create(project_dir, dataset / "images") as project:
            print(f"full bench: {len(train)} training images ({sum(s.label == 'defect' for s in train)} defect), "
                  f"{len(test)} test images, {bench.rounds} rounds, device {describe_device(device)}", file=sys.stderr)
            bench.clock.run("import", lambda: run_job(import_job(project, dataset / "images", labels_csv, CancelToken()),
                                                      bench.show))
            classifier_metrics = _classifier_step(bench, project)
            ablation = _cam_step(bench, project)
            summary = _rounds_step(bench, project)
            round_rows, final_metrics = _round_rows(bench, project, summary)
            weak_seconds = _weak_loop_seconds(bench, round_rows)
            trained_epochs = sum(int(r["segmenter"]["epochs_run"]) for r in summary["rounds"] if "segmenter" in r)
            full_metrics, full_training = _upper_bound_step(bench, work, trained_epochs)
    finally:
        if keep_project is not None:
            print(f"kept the project in {keep_project}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    markdown, ratio = _report(bench, summary, round_rows, final_metrics, full_metrics, full_training, weak_seconds,
                              ablation, classifier_metrics, trained_epochs, load_at_start, device)
    print(markdown)
    return {"weak": final_metrics, "full": full_metrics, "ratio": ratio, "weak_seconds": sum(weak_seconds.values()),
            "edited_images": sorted(bench.reviewer.edited)}


def main(args: argparse.Namespace) -> int:
    out = Path(args.out) if getattr(args, "out", None) else Path("bench-results")
    overrides = {k: v for k, v in {"epochs": getattr(args, "segmenter_epochs", None),
                                   "steps_per_epoch": getattr(args, "steps_per_epoch", None)}.items() if v is not None}
    overrides.update(parse_key_values(getattr(args, "segmenter_set", None), "--segmenter-set", as_json=True))
    run(Path(args.dataset), bool(args.quick), out, int(getattr(args, "seed", 0)),
        getattr(args, "classifier", None), bool(getattr(args, "json", False)), getattr(args, "rounds", None), overrides,
        getattr(args, "method", None), int(getattr(args, "edits_per_round", 0) or 0),
        bool(getattr(args, "reject_unedited", False)), getattr(args, "keep_project", None),
        getattr(args, "edit_order", None) or "random", not bool(getattr(args, "no_upper_bound", False)),
        bool(getattr(args, "app_defaults", False)))
    return 0


if __name__ == "__main__":
    from defect_studio.bench.options import add_bench_arguments

    parser = argparse.ArgumentParser(description=__doc__)
    add_bench_arguments(parser)
    sys.exit(main(parser.parse_args()))
