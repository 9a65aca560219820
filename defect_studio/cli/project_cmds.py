"""Commands on the project store: import, status, tag, demo, open."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from defect_studio.cli.progress import add_progress_arguments, drive
from defect_studio.jobs import CancelToken
from defect_studio.project import Project
from defect_studio.project.importer import import_job, set_import_megapixels
from defect_studio.project.location import default_project_dir

EXIT_PARTIAL = 4  # finished, but some input was skipped: the listing says which and why


def run_import(args: argparse.Namespace) -> int:
    images = Path(args.images)
    project_dir = Path(args.project) if args.project else default_project_dir(images)
    with Project.open_or_create(project_dir, images) as project:
        # A stale lock taken over is reported by the store's log warning, for every command alike.
        if args.max_megapixels is not None:  # remembered: a re-import applies the same limit
            set_import_megapixels(project, args.max_megapixels)
        cancel = CancelToken()
        report = drive(import_job(project, images, args.labels, cancel), args, cancel)
        for line in report.lines():
            print(line)
        print(f"project: {project.path}")
        _print_tags(project)
    return EXIT_PARTIAL if report.skipped else 0


def _print_tags(project: Project) -> None:
    counts = project.tag_counts()
    print(f"tags: {counts['good']} good, {counts['defect']} defect, {counts['untagged']} untagged")


def run_status(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        if args.json:
            print(json.dumps(project.summary(), indent=2))
            return 0
        print(f"project: {project.path}")
        print(f"images:  {project.image_root} ({sum(project.tag_counts().values())} images)")
        _print_tags(project)
        rounds = {r.index: r for r in project.rounds()}
        for index, states in sorted(project.mask_state_counts().items()):
            status = rounds[index].status if index in rounds else "?"
            flagged = states.pop("flagged", 0)
            parts = ", ".join(f"{count} {state}" for state, count in states.items())
            print(f"round {index} ({status}): {parts}, {flagged} flagged")
        for kind in ("classifier", "segmenter"):
            run = project.latest_run(kind)
            if run is not None:
                metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(run.metrics.items()) if isinstance(v, (int, float)))
                print(f"{kind}: {len(project.training_runs(kind))} run(s); latest {run.checkpoint_path.name}: {metrics}")
    return 0


def run_tag(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        records = project.find_images(args.images)
        changed = project.set_tags([r.id for r in records], args.tag, source="user")
        print(f"{changed} image(s) tagged {args.tag}.")
        _print_tags(project)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from defect_studio.project.demo_project import default_demo_dir, demo_project_job

    cancel = CancelToken()
    project_dir = drive(demo_project_job(args.out or default_demo_dir(), cancel, count=args.count), args, cancel)
    print(f"demo project: {project_dir}")
    if args.no_gui:
        return 0
    from defect_studio.gui.app import run_app

    return run_app(project_path=project_dir, whole_process=True)


def run_open(args: argparse.Namespace) -> int:
    from defect_studio.gui.app import run_app

    return run_app(project_path=Path(args.project) if args.project else None, whole_process=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="import an image folder into a project (creating it)",
                                   description="Import every image under DIR (recursively). Tags come from "
                                   "sub-folder names (good/ok/normal, defect/ng/bad) or from a stem,label CSV. "
                                   "Exit code 4 means some files were skipped (listed with the reason).")
    parser.add_argument("project", nargs="?", help="project folder (default: DIR/.defect-studio)")
    parser.add_argument("--images", required=True, metavar="DIR", help="the image folder")
    parser.add_argument("--labels", metavar="FILE.csv", help="stem,label rows with label good or defect")
    parser.add_argument("--max-megapixels", type=float, metavar="MP",
                        help="refuse images over MP megapixels, from their header (the project remembers it; "
                             "default 300, the most any reader accepts)")
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_import)

    parser = subparsers.add_parser("status", help="counts per tag, round and review state")
    parser.add_argument("project")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=run_status)

    parser = subparsers.add_parser("tag", help="tag images good, defect or untagged")
    parser.add_argument("project")
    parser.add_argument("tag", choices=["good", "defect", "untagged"])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image id, stem or relative path")
    parser.set_defaults(handler=run_tag)

    parser = subparsers.add_parser("demo", help="make the synthetic demo project and open the app on it")
    parser.add_argument("--out", type=Path, help="folder for the demo (default ~/defect-studio-demo)")
    parser.add_argument("--count", type=int, default=240, help="number of demo images")
    parser.add_argument("--no-gui", action="store_true", help="only prepare the project")
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_demo)

    parser = subparsers.add_parser("open", help="open the desktop app (on PROJECT if given)")
    parser.add_argument("project", nargs="?")
    parser.set_defaults(handler=run_open)
