"""Commands on the trained models: list them with their provenance, make an earlier segmenter current."""

from __future__ import annotations

import argparse
import json

from defect_studio.project import Project
from defect_studio.project.provenance import (
    describe_run_lines,
    model_rows,
    run_details,
    use_newest_segmenter,
    use_segmenter,
)


def _metric_text(row: dict) -> str:
    metrics = row["metrics"]
    for key in ("best_val_defect_iou", "val_auroc", "test_auroc"):
        if key in metrics:
            return f"{key.replace('_', ' ')} {metrics[key]:.3f}"
    return ""


def run_models(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        if args.run is not None:
            details = run_details(project, project.training_run(args.run))
            if args.json:
                print(json.dumps(details, indent=2, default=str))
            else:
                print("\n".join(describe_run_lines(details)))
            return 0
        rows = model_rows(project)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no trained model yet (defect-studio train, then refine).")
        return 0
    for row in rows:
        marker = "*" if row["current"] else " "
        round_text = "–" if row["round"] is None else str(row["round"])
        file_text = "" if row["file"] == "ok" else f"  [checkpoint {row['file'].upper()}]"
        print(f"{marker} run {row['run']:>3}  {row['kind']:<10}  round {round_text:>2}  {row['created_at'][:19]}  "
              f"{row['trained_on_text']}  {_metric_text(row)}  {row['checkpoint']}{file_text}")
    print("* the current segmenter (export, evaluate and the next round's proposals use it); "
          "`defect-studio models PROJECT --run N` shows everything run N was trained on.")
    return 0


def run_use_segmenter(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        if args.latest:
            run = use_newest_segmenter(project)
            message = ("the newest segmenter is current again" + (f": run {run.id} (round {run.round_index})." if run else
                       "; there is none yet."))
        else:
            run = use_segmenter(project, round_index=args.round, run_id=args.run)
            message = (f"segmenter run {run.id} (round {run.round_index}) is now current: export, evaluate and the "
                       "next round's proposals use it. Later rounds, masks and models are kept; "
                       "`use-segmenter --latest` goes back to the newest.")
    if args.json:
        print(json.dumps({"current_run": run.id if run else None, "round": run.round_index if run else None}))
    else:
        print(message)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="the trained models, what each was trained on, which is current")
    parser.add_argument("project")
    parser.add_argument("--run", type=int, metavar="N", help="everything run N was trained on: settings, masks, hashes")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run_models)

    parser = subparsers.add_parser("use-segmenter", help="make an earlier round's segmenter the current one (keeps later work)")
    parser.add_argument("project")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--round", type=int, metavar="K", help="the newest segmenter trained on round K's masks")
    which.add_argument("--run", type=int, metavar="N", help="segmenter run N (see defect-studio models)")
    which.add_argument("--latest", action="store_true", help="back to the newest segmenter")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run_use_segmenter)
