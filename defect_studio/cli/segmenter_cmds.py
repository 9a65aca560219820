"""Commands of the segmentation loop: pseudo, review, refine, evaluate, export, predict."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from defect_studio.cli.progress import add_progress_arguments, drive
from defect_studio.errors import DataError, ModelError
from defect_studio.jobs import CancelToken
from defect_studio.ml.cams.registry import CAM_METHODS
from defect_studio.project import Project


def _print_json_or(args: argparse.Namespace, payload: Any, lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=float))
    else:
        for line in lines:
            print(line)


def _pseudo_settings(args: argparse.Namespace) -> dict[str, Any]:
    names = ("mode", "high", "low", "high_percentile", "low_percentile", "min_area", "segmenter_weight", "ignore_disagreement")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _add_pseudo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=CAM_METHODS,
                        help="CAM method (default: the project's, chosen in the app or by an earlier command)")
    parser.add_argument("--mode", choices=["fixed", "percentile", "otsu"], help="threshold mode (default fixed)")
    parser.add_argument("--high", type=float, help="fixed mode: defect where the score >= HIGH")
    parser.add_argument("--low", type=float, help="fixed mode: background where the score <= LOW; ignored between")
    parser.add_argument("--high-percentile", type=float, help="percentile mode: HIGH as a percentile of the image's map")
    parser.add_argument("--low-percentile", type=float, help="percentile mode: LOW as a percentile")
    parser.add_argument("--min-area", type=int, help="drop defect components smaller than this many pixels")
    parser.add_argument("--segmenter-weight", type=float, help="round >= 1: weight of the segmenter vs the CAM")
    parser.add_argument("--train-on-disagreement", dest="ignore_disagreement", action="store_false", default=None,
                        help="round >= 1: also train where the fused mask and the CAM's own disagree (default: those "
                             "pixels are left out of the loss)")
    parser.add_argument("--classifier", type=Path, help="classifier checkpoint (default: the project's latest)")


# ------------------------------------------------------------------------------------------ pseudo
def _chosen_workflow(project: Project, args: argparse.Namespace) -> Any:
    """The project's workflow settings with this command's CAM method and pseudo-label options over them,
    saved: the app and the next command start from them (as the app's Review tab saves its choices)."""
    from defect_studio.workflow_settings import update_workflow_settings

    changes: dict[str, Any] = {"pseudo": _pseudo_settings(args)}
    if args.method is not None:
        changes["cam_method"] = args.method
    return update_workflow_settings(project, **changes)


def run_pseudo(args: argparse.Namespace) -> int:
    from defect_studio.ml.pseudo import PseudoLabelSettings, create_checked_round, pseudo_job

    PseudoLabelSettings.from_dict(_pseudo_settings(args))  # refuse bad values before the project is opened
    if args.shard:
        return _pseudo_maps_of_shard(args)
    with Project.open(args.project) as project:
        record = _chosen_workflow(project, args)
        settings = PseudoLabelSettings.from_dict(record.pseudo).to_dict()
        cam_spec = record.cam_spec()  # with the settings chosen in the app's CAM tab (or by `cam --set`)
        if args.round is None:
            round_index = create_checked_round(project, {**cam_spec.to_record(), "pseudo": settings}, args.classifier)
        else:
            round_index = project.round(args.round).index
        cancel = CancelToken()
        summary = drive(pseudo_job(project, round_index, cam_spec, settings, cancel, None, args.classifier), args, cancel)
    _print_json_or(
        args,
        summary,
        [
            f"round {round_index}: {summary['proposed']} proposal(s) from {summary['source']}, "
            f"{summary['carried_forward']} accepted/edited mask(s) carried forward, "
            f"{summary['flagged_empty']} defect image(s) flagged with an empty proposal."
        ],
    )
    return 0


def _pseudo_maps_of_shard(args: argparse.Namespace) -> int:
    """`pseudo --shard I/N`: the maps the proposals of shard I of the defect images need (CAMs, and the
    segmenter's from round 1 on), into the project's caches. The project is only read (no lock, nothing in
    its database, no mask), so the shards of an array job run side by side and beside the app; a killed
    shard is run again alone, and `pseudo` without --shard then proposes from the cached maps alone."""
    from defect_studio.ml.pseudo import pseudo_maps_job
    from defect_studio.predict import parse_shard, shard_items
    from defect_studio.workflow_settings import load_workflow_settings

    shard = parse_shard(args.shard)
    with Project.open_for_reading(args.project) as project:
        cam_spec = load_workflow_settings(project).cam_spec(args.method)
        rounds = project.rounds()
        round_index = project.round(args.round).index if args.round is not None else (rounds[-1].index + 1 if rounds else 0)
        defect = shard_items([r for r in project.images() if r.tag == "defect"], shard, key=lambda r: str(r.rel_path))
        cancel = CancelToken()
        maps = drive(pseudo_maps_job(project, round_index, cam_spec, [r.id for r in defect], cancel, args.classifier),
                     args, cancel)
    summary = {"round": round_index, "shard": args.shard, "images": len(defect), "cam": maps.counts["cam"],
               "segmenter_maps": maps.counts.get("segmenter_maps")}
    counts = ", ".join(f"{name}: {c['computed']} computed, {c['cached']} cached"
                       for name, c in (("CAM maps", maps.counts["cam"]), ("segmenter maps", maps.counts.get("segmenter_maps"))) if c)
    _print_json_or(args, summary, [f"round {round_index}, shard {args.shard}: {len(defect)} defect image(s); {counts}. "
                                   "Run `defect-studio pseudo` without --shard to propose the masks from them."])
    return 0


# ------------------------------------------------------------------------------------------ review
def run_review(args: argparse.Namespace) -> int:
    from defect_studio.project import review

    with Project.open(args.project) as project:
        if args.order:
            return _list_edit_first(project, args)
        if args.accept_all:
            result, verb = review.accept_all(project, args.round), "accepted"
        elif args.accept:
            result, verb = review.accept(project, _split_ids(args.accept), args.round), "accepted"
        elif args.reject:
            result, verb = review.reject(project, _split_ids(args.reject), args.round), "rejected"
        elif args.reject_rest:
            result, verb = review.reject_rest(project, args.round), "rejected"
        else:
            result, verb = review.import_masks(project, args.import_masks, args.round), "replaced by imported masks"
    _print_json_or(args, result.__dict__, [result.summary(verb)])
    return 0


def _list_edit_first(project: Project, args: argparse.Namespace) -> int:
    """`review --order edit-first`: the masks still to review, edit first at the top, each with its reason
    (the order is computed when the round has none yet, or again with --rerank)."""
    from dataclasses import asdict

    from defect_studio.ml.review_order import edit_first_queue, rank_for_review_job
    from defect_studio.project.review import latest_round

    index = latest_round(project) if args.round is None else project.round(args.round).index
    if args.rerank or not project.review_order(index):
        cancel = CancelToken()
        drive(rank_for_review_job(project, index, cancel), args, cancel)
    queue = edit_first_queue(project, index)
    lines = [f"round {index}: {len(queue)} mask(s) to review, edit first at the top"]
    for entry in queue:
        reason = entry.reason or "not in the order (proposed since it was computed; --rerank orders it)"
        lines.append(f"{entry.rank if entry.rank is not None else '-':>4}  {entry.stem}  {reason}")
    _print_json_or(args, {"round": index, "queue": [asdict(entry) for entry in queue]}, lines)
    return 0


def _split_ids(values: list[str]) -> list[str]:
    return [part for value in values for part in value.split(",") if part.strip()]


# ------------------------------------------------------------------------------------------ refine
def run_refine(args: argparse.Namespace) -> int:
    from defect_studio.ml.pseudo import PseudoLabelSettings
    from defect_studio.ml.segmenter_options import SegmenterConfig

    segmenter = {k: v for k, v in {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "seed": args.seed,
                                   "device": args.device}.items() if v is not None}
    PseudoLabelSettings.from_dict(_pseudo_settings(args))  # refuse bad values before the project is opened
    SegmenterConfig.from_dict(segmenter)
    if _on_several_processes(args):
        return _launch_or_run_rank(args, lambda ranks, cancel: _refine(args, segmenter, cancel, ranks), _print_refine)
    _print_refine(args, _refine(args, segmenter, CancelToken()))
    return 0


def _refine(args: argparse.Namespace, segmenter: dict[str, Any], cancel: CancelToken, ranks: Any = None) -> dict[str, Any]:
    from defect_studio.ml.refine import RefineConfig, refine_job
    from defect_studio.workflow_settings import update_workflow_settings

    with Project.open(args.project) as project:
        _chosen_workflow(project, args)
        update_workflow_settings(project, segmenter=segmenter)  # the Rounds tab shows them next
        config = RefineConfig.for_project(project, segmenter={"device": args.device} if args.device else None,
                                          stop_change=args.stop_change)
        return drive(refine_job(project, args.rounds, cancel, None, args.gt, config, args.classifier, ranks), args, cancel)


def _print_refine(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    lines = []
    for entry in summary["rounds"]:
        line = f"round {entry['round']}: mask change {entry['mask_change'] if entry['mask_change'] is not None else '–'}"
        if "segmenter" in entry:
            line += f", segmenter val defect IoU {entry['segmenter'].get('best_val_defect_iou', float('nan')):.3f}"
        if entry.get("ground_truth"):
            line += f", masks vs ground truth defect IoU {entry['ground_truth'].get('defect_iou', float('nan')):.3f}"
        if entry.get("stopped"):
            line += f" — stopped: {entry['stopped']}"
        lines.append(line)
    _print_json_or(args, summary, lines)


# ------------------------------------------------------------------------------------------ several processes
def _on_several_processes(args: argparse.Namespace) -> bool:
    from defect_studio.ml.distributed import launched_by_torchrun

    return launched_by_torchrun() or (args.nproc is not None and args.nproc > 1)


def _launch_or_run_rank(args: argparse.Namespace, run_on_rank0: Any, report: Any) -> int:
    """`--nproc N`: this command under torchrun; in a torchrun worker: its rank (rank 0 reports)."""
    from defect_studio.cli.workers import launch_workers, run_segmenter_ranks, without_nproc
    from defect_studio.ml.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return launch_workers(args.nproc, without_nproc(args.argv))
    result = run_segmenter_ranks(args, run_on_rank0)
    if result is not None:
        report(args, result)
    return 0


# ------------------------------------------------------------------------------------------ next-round
def run_next_round(args: argparse.Namespace) -> int:
    if _on_several_processes(args):
        return _launch_or_run_rank(args, lambda ranks, cancel: _next_round(args, cancel, ranks), _print_next_round)
    _print_next_round(args, _next_round(args, CancelToken()))
    return 0


def _next_round(args: argparse.Namespace, cancel: CancelToken, ranks: Any = None) -> tuple[int, dict[str, Any]]:
    from defect_studio.ml.refine import ground_truth_dir, next_round_job

    with Project.open(args.project) as project:
        round_index = project.round(args.round).index if args.round is not None else _latest_round(project)
        gt_dir = args.gt if args.gt is not None else ground_truth_dir(project)
        machine = {"device": args.device} if args.device else None
        summary = drive(next_round_job(project, round_index, cancel, machine, gt_dir, args.classifier, ranks), args, cancel)
    return round_index, summary


def _print_next_round(args: argparse.Namespace, outcome: tuple[int, dict[str, Any]]) -> None:
    round_index, summary = outcome
    if "next_round" in summary:
        proposals = summary["proposals"]
        line = (f"round {round_index} trained; round {summary['next_round']}: {proposals['proposed']} proposal(s) from "
                f"{proposals['source']}, {proposals['carried_forward']} accepted/edited mask(s) carried forward; "
                f"{summary['review_order']}")
    else:
        line = f"round {round_index}: the masks stopped changing; no new round"
    _print_json_or(args, summary, [line])


def _latest_round(project: Project) -> int:
    rounds = project.rounds()
    if not rounds:
        raise DataError("this project has no round yet; make the round-0 proposals first (defect-studio pseudo).")
    return rounds[-1].index


# ------------------------------------------------------------------------------------------ evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    from defect_studio.markdown import markdown_table
    from defect_studio.imageio import read_image
    from defect_studio.ml.evaluate import (
        SUMMARY_COLUMNS, evaluate_pairs, iterate_against_truth, load_ground_truth, per_type_rows, summary_row,
    )

    truth = load_ground_truth(args.gt)
    stems = truth.stems(args.split)
    with Project.open(args.project) as project:
        images = {image.stem: image for image in project.images()}
        if args.segmenter or args.round is None:
            from defect_studio.ml.segmenter import load_segmenter

            path = args.segmenter_path or _latest_segmenter(project)
            model = load_segmenter(path)
            what = f"segmenter {Path(path).name}"

            def image_path(stem: str) -> Path | None:
                return images[stem].path if stem in images else truth.image_paths.get(stem)

            stems = [s for s in stems if image_path(s) is not None]
            metrics = evaluate_pairs(iterate_against_truth(truth, stems, lambda stem, shape: model.mask(read_image(image_path(stem)))))
        else:
            records = {project.image(r.image_id).stem: r for r in project.mask_records(round_index=args.round)}
            if not records:
                raise DataError(f"round {args.round} has no masks.")
            stems = [s for s in stems if s in records]
            what = f"round {args.round} masks"
            metrics = evaluate_pairs(iterate_against_truth(truth, stems, lambda stem, shape: project.load_mask(records[stem])))
    metrics["what"] = what
    if args.json:
        print(json.dumps(metrics, indent=2, default=float))
    else:
        print(markdown_table([summary_row(what, metrics)], SUMMARY_COLUMNS))
        print()
        print(markdown_table(per_type_rows(metrics), ["type", "defect IoU", "Dice", "images"]))
    return 0


def _latest_segmenter(project: Project) -> Path:
    run = project.current_segmenter()  # the newest, or the one made current with use-segmenter
    if run is None:
        raise ModelError("this project has no trained segmenter yet; run defect-studio refine first.")
    return Path(run.checkpoint_path)


# ------------------------------------------------------------------------------------------ export
def run_export(args: argparse.Namespace) -> int:
    from defect_studio.ml.export import export_project_job
    from defect_studio.project.provenance import resolve_segmenter

    with Project.open(args.project) as project:
        run_id = args.run
        if args.round is not None:
            run_id = resolve_segmenter(project, round_index=args.round).id
        cancel = CancelToken()
        result = drive(export_project_job(project, args.out, cancel, args.segmenter, args.parity_images, run_id=run_id),
                       args, cancel)
    parity = result["parity"]
    _print_json_or(
        args,
        {"out": result["out_dir"], "parity": parity},
        [
            f"exported to {result['out_dir']}: model.onnx, model.torchscript.pt, model-card.json",
            f"parity on {parity['images']} held-out image(s): ONNX max |Δp| {parity['onnx_max_abs_diff']:.2g}, "
            f"mask IoU {parity['onnx_min_mask_iou']:.4f}; TorchScript max |Δp| {parity['torchscript_max_abs_diff']:.2g}, "
            f"mask IoU {parity['torchscript_min_mask_iou']:.4f}",
        ],
    )
    return 0


# ------------------------------------------------------------------------------------------ predict
def run_predict(args: argparse.Namespace) -> int:
    from defect_studio.predict import parse_shard, predict_images

    shard = parse_shard(args.shard) if args.shard else None
    written = predict_images(args.model_dir, args.images, args.out, shard=shard)
    of_shard = f" (shard {shard[0]} of {shard[1]}: {len(written)} of {len(args.images)} image(s))" if shard else ""
    _print_json_or(args, [str(p) for p in written], [f"{len(written)} mask(s) written to {args.out}{of_shard}"])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pseudo", help="propose round masks from CAMs (or the last segmenter + CAMs)")
    parser.add_argument("project", type=Path)
    parser.add_argument("--round", type=int, help="re-propose this existing round (default: start a new round)")
    parser.add_argument("--shard", metavar="I/N",
                        help="only compute the maps of shard I of N of the defect images (CAMs; from round 1 the "
                             "segmenter's too) into the project's caches: the project is only read, shards run side by "
                             "side, and `pseudo` without --shard then proposes from the cached maps")
    _add_pseudo_arguments(parser)
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_pseudo)

    parser = subparsers.add_parser("review", help="accept, reject or replace a round's masks")
    parser.add_argument("project", type=Path)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--accept-all", action="store_true", help="accept every proposed mask")
    action.add_argument("--accept", nargs="+", metavar="IDS", help="image ids, stems or paths (comma or space separated)")
    action.add_argument("--reject", nargs="+", metavar="IDS", help="image ids, stems or paths to leave out of training")
    action.add_argument("--reject-rest", action="store_true",
                        help="reject every defect image's mask still proposed (train on your edits and accepts only)")
    action.add_argument("--import-masks", type=Path, metavar="DIR", help="<stem>.png masks that replace the proposals")
    action.add_argument("--order", choices=["edit-first"],
                        help="list the masks still to review, the ones worth editing first at the top, with the reason")
    parser.add_argument("--rerank", action="store_true", help="--order: compute the round's order again")
    parser.add_argument("--round", type=int, help="the round (default: the latest)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run_review)

    parser = subparsers.add_parser("refine", help="proposal -> review -> segmenter rounds")
    parser.add_argument("project", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gt", type=Path, help="ground truth (dataset folder or masks folder) for per-round metrics")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--stop-change", type=float, default=0.02, help="stop when fewer defect pixels change (fraction)")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train the segmenter with N processes on this machine (torch.distributed: one per GPU, or "
                        "gloo on the CPU); for several machines run `torchrun ... -m defect_studio refine PROJECT` (README)")
    _add_pseudo_arguments(parser)
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_refine)

    parser = subparsers.add_parser(
        "next-round", help="train the segmenter on a round's reviewed masks, then propose the next round's masks",
        description="What the app's Rounds tab does: the segmenter trains on the round's accepted, edited and "
        "unreviewed masks (the project's segmenter settings), and the next round's proposals come from it fused "
        "with the CAM, with the round's own CAM and thresholds.")
    parser.add_argument("project", type=Path)
    parser.add_argument("--round", type=int, help="the round to train on (default: the latest)")
    parser.add_argument("--gt", type=Path, help="ground-truth masks for the round metrics (default: masks/ beside the images)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train the segmenter with N processes on this machine (torch.distributed: one per GPU, or "
                        "gloo on the CPU); for several machines run `torchrun ... -m defect_studio next-round PROJECT` (README)")
    parser.add_argument("--classifier", type=Path, help="classifier checkpoint (default: the project's latest)")
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_next_round)

    parser = subparsers.add_parser("evaluate", help="score a round's masks or the segmenter against ground truth")
    parser.add_argument("project", type=Path)
    parser.add_argument("--gt", type=Path, required=True, help="dataset folder (with masks/) or a masks folder")
    parser.add_argument("--split", help="only images of this split (split.csv beside the ground truth)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--round", type=int, help="score this round's masks")
    which.add_argument("--segmenter", action="store_true", help="score the latest segmenter's predictions (default)")
    parser.add_argument("--segmenter-path", type=Path, help="score this segmenter checkpoint instead")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run_evaluate)

    parser = subparsers.add_parser("export", help="ONNX + TorchScript + model card, checked against the app")
    parser.add_argument("project", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--segmenter", type=Path, help="checkpoint to export (default: the current segmenter)")
    which.add_argument("--round", type=int, metavar="K", help="export the segmenter trained on round K's masks")
    which.add_argument("--run", type=int, metavar="N", help="export segmenter run N (see defect-studio models)")
    parser.add_argument("--parity-images", type=int, default=8, help="held-out images for the parity check")
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_export)

    parser = subparsers.add_parser("predict", help="run an exported model (onnxruntime only) and write PNG masks")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard", metavar="I/N",
                        help="predict only shard I of N (counted from 1, e.g. $SLURM_ARRAY_TASK_ID/8): every N-th image "
                             "sorted by path, so N array jobs split the images whatever order they list them in; "
                             "a killed shard is run again alone")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run_predict)
