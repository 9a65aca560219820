"""The options of every benchmark, shared by `defect-studio bench` and `python -m defect_studio.bench.<name>`.

The benchmarks read their options from here, never from the CLI: the CLI launches the benchmarks, and
nothing in `bench` imports `defect_studio.cli`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# What `defect-studio bench WHICH` runs: each a module defect_studio.bench.<name> with main(args) (- becomes _).
BENCH_NAMES = ("classifier", "cams", "segmenter", "full", "mislabels", "assist", "scale", "large-project")
BENCHES_WITHOUT_DATASET = ("scale", "large-project")  # they make their own synthetic images


def add_bench_arguments(parser: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    """The options of every benchmark (also used by `python -m defect_studio.bench.<name>`); the CLI,
    which also runs the benchmarks without a dataset, checks --dataset itself (`dataset_problem`)."""
    parser.add_argument("--dataset", type=Path, required=dataset_required, help="dataset folder (images/, labels.csv, ...)")
    parser.add_argument("--quick", action="store_true", help="a small subset and few epochs (minutes)")
    parser.add_argument("--out", type=Path, help="where to write the JSON and markdown tables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", type=Path, help="reuse this classifier checkpoint instead of training one")
    parser.add_argument("--ablations", action="store_true",
                        help="cams: also every ablation of FGBP and the region-aware CAM on the whole split (--quick has them)")
    parser.add_argument("--rounds", type=int, help="full: refinement rounds (default 3)")
    parser.add_argument("--method", help="full: the CAM method for round 0 (default: the best on the training split)")
    parser.add_argument("--segmenter-epochs", type=int, help="full: segmenter epochs per round")
    parser.add_argument("--steps-per-epoch", type=int, help="full: segmenter training steps per epoch")
    parser.add_argument("--edits-per-round", type=int, default=0, metavar="K",
                        help="full: a simulated user draws the ground-truth mask of K more defect images each round")
    parser.add_argument("--reject-unedited", action="store_true",
                        help="full: the simulated user rejects every defect proposal it did not edit")
    parser.add_argument("--edit-order", choices=("random", "ranked"), default="random",
                        help="full: which K images the simulated user edits: random (the default of earlier runs) or "
                             "ranked (the head of each round's edit-first order, ml.review_order)")
    parser.add_argument("--app-defaults", action="store_true",
                        help="full: propose with the app's default CAM method (or --method) and pseudo-label thresholds "
                             "instead of choosing them on the training split's ground truth: what a new project gets")
    parser.add_argument("--no-upper-bound", action="store_true",
                        help="full: skip the upper bound (the segmenter on all ground truth): for comparing reviewers")
    parser.add_argument("--segmenter-set", action="append", default=[], metavar="KEY=VALUE",
                        help="full: a segmenter setting for every round and the bound (JSON value), e.g. "
                             "architecture=efficientnet-lite0-unet; repeatable")
    parser.add_argument("--keep-project", type=Path, metavar="DIR",
                        help="full: keep the benchmark's project (models, masks, rounds) in DIR to open in the app")
    parser.add_argument("--candidates", nargs="+", metavar="NAME", help="segmenter: the recipes to compare (default: all)")
    parser.add_argument("--steps", nargs="+", type=int, metavar="N", help="segmenter: training steps per candidate")
    parser.add_argument("--json", action="store_true", help="print progress events as JSON lines")
    parser.add_argument("--sizes", nargs="+", type=float, metavar="MP",
                        help="scale: image sizes in megapixels (default 1 4 16 64 100; --quick: 1 4)")
    parser.add_argument("--scale-steps", nargs="+", choices=("import", "predict", "cams", "brush"), metavar="STEP",
                        help="scale: only these steps (import, predict, cams, brush; default all)")
    parser.add_argument("--images", type=int, default=100_000, help="large-project: synthetic images (default 100000)")
    parser.add_argument("--opens", type=int, default=5, help="large-project: times the project is opened (median)")
    parser.add_argument("--scroll-steps", type=int, default=2000,
                        help="large-project: steps in which the gallery scrolls from top to bottom")
    parser.add_argument("--workdir", type=Path, help="large-project: where to write the images and the project "
                        "(in a temporary folder, removed at the end; default: the system's)")


def dataset_problem(which: str, dataset: Path | None) -> str | None:
    """Why `bench WHICH` cannot run with this --dataset, or None."""
    if dataset is None and which not in BENCHES_WITHOUT_DATASET:
        return f"bench {which} needs --dataset DATASET (a folder in the README layout)."
    return None
