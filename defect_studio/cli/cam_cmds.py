"""`defect-studio cam PROJECT [--method NAME] [--set key=value ...]`: CAM maps for a project's images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from defect_studio.cli.progress import add_progress_arguments, drive
from defect_studio.jobs import CancelToken
from defect_studio.key_values import parse_key_values
from defect_studio.ml.cams.registry import CAM_REGISTRY, CamSpec


def run_cam(args: argparse.Namespace) -> int:
    from defect_studio.ml.cam_cache import cam_job
    from defect_studio.predict import parse_shard, shard_items
    from defect_studio.project import Project
    from defect_studio.workflow_settings import load_workflow_settings, save_workflow_settings

    settings = parse_key_values(args.set, "--set")
    if args.method is not None:
        CamSpec.resolve(args.method, settings)  # refuse bad settings before the project is opened
    shard = parse_shard(args.shard) if args.shard else None
    # A shard only reads the project (its maps go to the content-addressed cache, one atomic file each), so the
    # N shards of an array job run side by side, beside the app even; the next `pseudo` finds every map cached.
    with (Project.open_for_reading(args.project) if shard else Project.open(args.project)) as project:
        record = load_workflow_settings(project)
        # The project's settings of the method (chosen in the app's CAM tab, or here before), --set over them;
        # what --set changes is kept, as the CAM tab keeps what its form changes (a shard keeps nothing).
        spec = CamSpec.resolve(record.cam_spec(args.method), settings)
        if settings and shard is None:
            save_workflow_settings(project, record.with_cam_spec(spec))
        image_ids = [r.id for r in shard_items(project.images(), shard, key=lambda r: str(r.rel_path))] if shard else None
        cancel = CancelToken()
        result = drive(
            cam_job(project, spec, None, cancel, classifier_path=args.classifier, write_png_dir=args.png_dir,
                    image_ids=image_ids),
            args,
            cancel,
        )
    if args.json:
        print(json.dumps({"result": result}, default=str))
    else:
        of_shard = f" (shard {shard[0]} of {shard[1]})" if shard else ""
        print(
            f"{result['method']}: {result['images']} maps{of_shard} ({result['computed']} computed, {result['cached']} from "
            f"the cache) in {result['seconds']:.1f} s with {Path(result['classifier']).name}"
        )
        print("settings: " + json.dumps(result["settings"], sort_keys=True))
        if result["png_dir"]:
            print(f"16-bit PNG heatmaps: {result['png_dir']}")
    return 0


def _settings_help() -> str:
    lines = []
    for method in CAM_REGISTRY.values():
        specs = ", ".join(f"{spec.name}={json.dumps(spec.default)}" for spec in method.settings)
        lines.append(f"  {method.name}: {specs}")
    return "settings (--set key=value) and their defaults:\n" + "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cam",
        help="compute class activation maps for a project's images (cached)",
        description="Compute CAM heatmaps with the project's latest classifier (or --classifier) for every "
        "image; maps are cached so the app shows them at once, and can be written as 16-bit PNGs.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("project", type=Path, help="project folder")
    parser.add_argument("--method", choices=tuple(CAM_REGISTRY),
                        help="CAM method (default: the project's, the one its proposals come from)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method setting; repeatable")
    parser.add_argument("--classifier", type=Path, help="classifier checkpoint (default: the project's latest)")
    parser.add_argument("--png-dir", type=Path, help="also write each map as a 16-bit PNG <stem>.png here")
    parser.add_argument("--shard", metavar="I/N",
                        help="compute only shard I of N (counted from 1, e.g. $SLURM_ARRAY_TASK_ID/8): every N-th image "
                             "by path; shards open the project read-only and run side by side, a killed one is run "
                             "again alone, and the next pseudo or refine finds every map cached. --set is not saved")
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_cam)
