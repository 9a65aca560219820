"""`defect-studio bench mislabels`: does the mislabel queue find wrong tags?

Flips a seeded random 5 % of the training split's tags (good <-> defect), makes a project whose
training images carry the flipped tags (the test images stay untagged), trains the default
classifier on them with the app's own job, ranks the tags with the app's mislabel queue, and reports
how many of the flipped images the queue puts in its top 50 (and top K, K = the number flipped),
against what random order would give, per direction of the flip, and for each signal alone.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from defect_studio.bench.report import write_report
from defect_studio.dataset_layout import load_dataset
from defect_studio.jobs import CancelToken, Progress, ProgressKind, run_job
from defect_studio.ml.classifier import train_project_classifier_job
from defect_studio.ml.metrics import auroc
from defect_studio.ml.mislabels import mislabel_job
from defect_studio.ml.models import ClassifierConfig
from defect_studio.project import Project
from defect_studio.project.importer import import_job

FLIP_FRACTION = 0.05
TOP = 50
BENCH_THREADS = 1  # as the classifier bench: one thread per training on a shared CPU
QUICK_OVERRIDES = dict(epochs=30, min_epochs=30, max_train_seconds=50.0)
COLUMNS = ["ranking", "flipped", "in top N", "in top K", "recall@K", "random@N", "AUROC"]
DIRECTION_COLUMNS = ["flip", "flipped", "in top N", "in top K"]


def flip_tags(labels: dict[str, str], fraction: float, seed: int) -> dict[str, str]:
    """A seeded random `fraction` of the stems (at least one) with the other tag."""
    stems = sorted(labels)
    count = max(1, int(round(fraction * len(stems))))
    chosen = np.random.default_rng(seed).choice(len(stems), size=count, replace=False)
    flipped = {stems[i]: ("good" if labels[stems[i]] == "defect" else "defect") for i in sorted(chosen)}
    return flipped


def _log(event: Progress) -> None:
    if event.kind in (ProgressKind.EPOCH, ProgressKind.RESULT) or (event.total and event.step == event.total):
        print(f"  {event.stage} {event.step}/{event.total} {event.message}", file=sys.stderr, flush=True)


def _ranking_row(name: str, order: list[str], flipped: set[str], top: int) -> dict[str, Any]:
    k = len(flipped)
    position = {stem: rank for rank, stem in enumerate(order)}
    scores = np.array([-position[stem] for stem in order], dtype=float)
    truth = np.array([stem in flipped for stem in order])
    return {
        "ranking": name,
        "flipped": k,
        "in top N": sum(stem in flipped for stem in order[:top]),
        "in top K": sum(stem in flipped for stem in order[:k]),
        "recall@K": sum(stem in flipped for stem in order[:k]) / k if k else float("nan"),
        "random@N": k * min(top, len(order)) / len(order) if order else float("nan"),
        "AUROC": auroc(truth, scores) if 0 < truth.sum() < len(truth) else float("nan"),
    }


def run(dataset: Path, quick: bool, out: Path, seed: int = 0, overrides: dict[str, Any] | None = None,
        top: int = TOP, fraction: float = FLIP_FRACTION, report_name: str | None = None) -> dict[str, Any]:
    samples = [s for s in load_dataset(dataset, seed=seed) if s.split == "train"]
    labels = {s.stem: s.label for s in samples}
    flipped = flip_tags(labels, fraction, seed)
    tags = {**labels, **flipped}
    settings: dict[str, Any] = dict(seed=seed, threads=BENCH_THREADS)
    if quick:
        settings.update(QUICK_OVERRIDES)
    settings.update(overrides or {})
    config = ClassifierConfig(**settings)
    with tempfile.TemporaryDirectory(prefix="ds-bench-mislabels-") as temporary:
        labels_csv = Path(temporary) / "flipped-labels.csv"
        with labels_csv.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["stem", "label"])
            writer.writerows(sorted(tags.items()))
        with Project.create(Path(temporary) / "project", dataset / "images") as project:
            run_job(import_job(project, dataset / "images", labels_csv, CancelToken()))
            for image in project.images():  # the test split stays out: untagged
                if image.stem not in tags and image.tag != "untagged":
                    project.set_tags([image.id], "untagged")
            print(f"== {len(flipped)} of {len(tags)} train tags flipped; classifier {config.arch}", file=sys.stderr)
            result = run_job(train_project_classifier_job(project, config, CancelToken()), _log)
            queue = run_job(mislabel_job(project, CancelToken(), use_segmenter=False, seed=seed), _log)
    ranked = queue["ranked"]
    order = [entry["stem"] for entry in ranked]
    flipped_set = set(flipped)
    rows = [_ranking_row("mislabel queue", order, flipped_set, top)]
    for signal in ("classifier", "good_prior"):  # each signal alone, as the queue calibrates it
        def suspicion(entry: dict[str, Any], signal: str = signal) -> float:
            value = entry["evidence"][f"calibrated_{signal}"]
            return value if entry["tag"] == "good" else 1.0 - value
        alone = sorted(ranked, key=lambda e: (-suspicion(e), e["image_id"]))
        rows.append(_ranking_row(f"{signal.replace('_', '-')} alone", [e["stem"] for e in alone], flipped_set, top))
    directions = []
    for original, now in (("good", "defect"), ("defect", "good")):
        members = {stem for stem in flipped if labels[stem] == original}
        directions.append({
            "flip": f"{original} tagged {now}",
            "flipped": len(members),
            "in top N": sum(stem in members for stem in order[:top]),
            "in top K": sum(stem in members for stem in order[: len(flipped)]),
        })
    notes = [
        f"Dataset {dataset.name}: {len(tags)} training images, {len(flipped)} tags flipped at random (seed {seed}, "
        f"{fraction:.0%}); the test split is not used. N = {top} (the top of the queue looked at) of {len(order)} "
        f"ranked images; K = {len(flipped)} (the number flipped).",
        f"Classifier: {config.arch}, trained on the flipped tags by the app's job "
        f"({result.epochs_run} epochs, {result.seconds:.0f} s, validation AUROC against the flipped tags "
        f"{result.metrics.get('val_auroc', float('nan')):.3f})" + (" (quick settings)" if quick else "") + ".",
        "The queue's signals: the classifier's defect probability and the leave-fold-out good-image prior (no "
        "segmenter: none is trained here). 'random@N' is the number of flipped images random order would put in "
        "the top N; AUROC: flipped vs not, by rank.",
    ]
    markdown = write_report(out, report_name or f"mislabels-{dataset.name}" + ("-quick" if quick else ""),
                            f"Mislabel queue on {dataset.name}: {fraction:.0%} of the train tags flipped",
                            [("Flipped images found", rows, COLUMNS), ("By direction of the flip", directions,
                                                                        DIRECTION_COLUMNS)],
                            notes, extra={"flipped": sorted(flipped), "ranked": ranked[: max(top, len(flipped))],
                                          "config": config.to_dict(), "quick": quick, "seed": seed})
    print(markdown)
    return {"rows": rows, "directions": directions, "flipped": sorted(flipped), "order": order}


def main(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("bench-results")
    run(Path(args.dataset), bool(args.quick), out, int(args.seed))
    return 0


if __name__ == "__main__":
    from defect_studio.bench.options import add_bench_arguments

    parser = argparse.ArgumentParser(description=__doc__)
    add_bench_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
