"""`defect-studio mislabels`: the images whose tag the models contradict, ranked with a reason; confirm
or flip a tag (undoable)."""

from __future__ import annotations

import argparse
import json

from defect_studio.cli.progress import add_progress_arguments, drive
from defect_studio.jobs import CancelToken
from defect_studio.project import Project
from defect_studio.project.mislabels import (
    SUSPECT_THRESHOLD,
    confirm_tags,
    flip_tags,
    load_queue,
    open_suspects,
    stale_reason,
    undo_last,
)


def _ids(project: Project, values: list[str]) -> list[int]:
    names = [part for value in values for part in value.split(",") if part.strip()]
    return [record.id for record in project.find_images(names)]


def run_mislabels(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        if args.confirm or args.flip or args.undo:
            if args.undo:
                decision = undo_last(project)
                lines = decision.messages
            elif args.flip:
                decision = flip_tags(project, _ids(project, args.flip), force=args.force)
                lines = [*decision.messages, decision.summary()]
            else:
                decision = confirm_tags(project, _ids(project, args.confirm))
                lines = [decision.summary()]
            payload = {"reviews": [r.__dict__ for r in decision.reviews], "messages": decision.messages}
            print(json.dumps(payload, indent=2) if args.json else "\n".join(lines))
            return 0
        queue = load_queue(project)
        reason = stale_reason(project, queue)
        if args.recompute or reason is not None:
            from defect_studio.ml.mislabels import mislabel_job

            if not args.json and reason is not None and not args.recompute:
                print(f"ranking the tags ({reason})...")
            cancel = CancelToken()
            queue = drive(mislabel_job(project, cancel, args.classifier, use_segmenter=not args.no_segmenter,
                                       seed=args.seed), args, cancel)
        suspects = open_suspects(project, queue, args.min_suspicion)
    shown = suspects[: args.top]
    if args.json:
        print(json.dumps({"signals": queue["signals"], "suspects": shown, "open": len(suspects)}, indent=2, default=float))
        return 0
    if not shown:
        print(f"no suspect tag: the models agree with every open tag (suspicion below {args.min_suspicion:g}).")
        return 0
    print(f"{len(suspects)} suspect tag(s) (signals: {', '.join(queue['signals'])}); the {len(shown)} most suspect:")
    for entry in shown:
        print(f"{entry['rank']:>4}. {entry['stem']} (id {entry['image_id']}) tagged {entry['tag']}, "
              f"suspicion {entry['suspicion']:.2f}: {entry['reason']}")
    print("Confirm a tag with --confirm IMAGE..., flip it with --flip IMAGE...; --undo takes the last one back.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mislabels", help="images whose tag the models contradict, ranked with a reason; confirm or flip tags",
        description="Rank the tagged images by how strongly the classifier, the leave-fold-out good-image prior "
        "and the current segmenter contradict their tags (computed when the models changed, else read from "
        "the project's cache); or confirm / flip tags (one undoable action each).")
    parser.add_argument("project")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--confirm", nargs="+", metavar="IMAGE", help="keep these tags: they leave the queue")
    action.add_argument("--flip", nargs="+", metavar="IMAGE", help="flip these tags (good <-> defect)")
    action.add_argument("--undo", action="store_true", help="take back the last confirm or flip")
    parser.add_argument("--force", action="store_true",
                        help="--flip: flip a defect image to good even though you edited its mask (the mask is kept)")
    parser.add_argument("--top", type=int, default=50, help="list this many suspects (default 50)")
    parser.add_argument("--min-suspicion", type=float, default=SUSPECT_THRESHOLD,
                        help=f"list images from this suspicion on (0-1, default {SUSPECT_THRESHOLD})")
    parser.add_argument("--recompute", action="store_true", help="rank again even if the models have not changed")
    parser.add_argument("--no-segmenter", action="store_true", help="leave the segmenter out of the evidence")
    parser.add_argument("--classifier", help="classifier checkpoint (default: the project's latest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds of the good-image prior")
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_mislabels)
