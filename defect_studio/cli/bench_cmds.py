"""`defect-studio bench [classifier|cams|segmenter|full|...|large-project]`: benchmarks that print a table and save JSON + markdown."""

from __future__ import annotations

import argparse
import importlib

from defect_studio.bench.options import BENCH_NAMES, add_bench_arguments, dataset_problem


def run_bench(args: argparse.Namespace) -> int:
    problem = dataset_problem(args.which, args.dataset)
    if problem is not None:
        print(problem)
        return 2
    module = importlib.import_module(f"defect_studio.bench.{args.which.replace('-', '_')}")
    return int(module.main(args) or 0)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmarks on a dataset in the README layout",
        description="classifier: candidate architectures; cams: every CAM method and ablation; "
        "segmenter: segmenter recipes on ground-truth masks, with CPU time per step; "
        "full (default): the whole weak loop against full supervision; "
        "mislabels: flip 5 % of the train tags, how many the mislabel queue puts in its top 50; "
        "assist: actions per ground-truth mask for a scripted user with the brush and with the assist tool; "
        "scale: time and peak memory of import, predict and a brush stroke on synthetic 1-100 MP images (no --dataset); "
        "large-project: import speed, open time and the gallery's event-loop stalls on a synthetic 100 000-image "
        "project (no --dataset).",
    )
    parser.add_argument("which", nargs="?", choices=BENCH_NAMES, default="full")
    add_bench_arguments(parser, dataset_required=False)
    parser.set_defaults(handler=run_bench)
