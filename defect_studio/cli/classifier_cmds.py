"""`defect-studio train PROJECT`: train the image-level classifier on the project's tagged images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defect_studio.cli.progress import add_progress_arguments, drive
from defect_studio.cli.workers import launch_workers, run_quietly, without_nproc
from defect_studio.jobs import CancelToken
from defect_studio.ml.classifier_options import ClassifierConfig

if TYPE_CHECKING:
    from defect_studio.project import Project


def _chosen_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The classifier settings the command's options set (the rest come from the project)."""
    settings: dict[str, Any] = {}
    for name in ("arch", "epochs", "width", "output_stride", "pooling", "input_size", "seed", "learning_rate", "batch_size",
                 "threads", "tiling", "tile_size", "tile_overlap"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if args.pretrained is not None:
        settings["pretrained"] = str(Path(args.pretrained).resolve())
    if args.no_augment:
        settings["augment"] = False
    if args.max_minutes is not None:
        settings["max_train_seconds"] = float(args.max_minutes) * 60.0 if args.max_minutes > 0 else None
    return settings


def _make_config(settings: dict[str, Any]) -> ClassifierConfig:
    from defect_studio.errors import ModelError

    config = ClassifierConfig.from_settings(settings)
    if config.pretrained and config.arch not in ("resnet18", "resnet34"):
        raise ModelError(f"--pretrained names torchvision ResNet weights, and {config.arch} does not take them "
                         "(EfficientNet-Lite0 has its own ImageNet weights): add --arch resnet18 or --arch resnet34.")
    return config


def _project_config(project: Project, args: argparse.Namespace) -> ClassifierConfig:
    """The project's classifier settings (chosen in the app or by an earlier `train`) with the options over
    them; the options are kept in the project for the next training, from either face."""
    from defect_studio.dataset_layout import LABELS
    from defect_studio.ml.classifier_options import ARCH_DEFAULTS, choose_classifier_tiling
    from defect_studio.workflow_settings import load_workflow_settings, save_workflow_settings

    chosen = _chosen_settings(args)
    record = load_workflow_settings(project)
    stored = dict(record.classifier)
    if "arch" in chosen and chosen["arch"] != stored.get("arch", chosen["arch"]):
        # another backbone brings its own input size, learning rate and epochs (as the Train tab does)
        stored = {k: v for k, v in stored.items() if k not in ARCH_DEFAULTS[chosen["arch"]]}
    config = _make_config({**stored, **chosen})
    # A tiling these images cannot take is refused before it is kept for the next training.
    choose_classifier_tiling(config, [(r.height, r.width) for r in project.images() if r.tag in LABELS])
    record.classifier = {k: v for k, v in {**stored, **chosen}.items() if k != "threads"}
    save_workflow_settings(project, record)
    return config


def run_train(args: argparse.Namespace) -> int:
    from defect_studio.ml.distributed import launched_by_torchrun

    ClassifierConfig.from_settings(_chosen_settings(args))  # refuse bad options before anything starts
    if launched_by_torchrun():
        return _run_train_rank(args)
    if args.nproc is not None and args.nproc > 1:
        return launch_workers(args.nproc, without_nproc(args.argv))
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.project import Project

    cancel = CancelToken()
    with Project.open(args.project) as project:
        config = _project_config(project, args)
        result = drive(train_project_classifier_job(project, config, cancel, device=args.device), args, cancel)
    _print_summary(result, args)
    return 0


def _print_summary(result, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    summary = {
        "checkpoint": str(result.checkpoint_path),
        "device": result.device,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1),
        **{k: round(v, 4) for k, v in result.metrics.items() if k in ("val_auroc", "val_f1", "train_auroc", "val_loss")},
        "decision_threshold": round(result.decision_threshold, 4),
    }
    if args.json:
        print(json.dumps({"result": summary}))
    else:
        print(
            f"Classifier saved to {result.checkpoint_path}\n"
            f"  validation AUROC {summary.get('val_auroc', float('nan')):.4f}, F1 {summary.get('val_f1', float('nan')):.4f}; "
            f"train AUROC {summary.get('train_auroc', float('nan')):.4f}\n"
            f"  best epoch {result.best_epoch} of {result.epochs_run}, {result.seconds:.0f} s on {result.device}"
        )


def _run_train_rank(args: argparse.Namespace) -> int:
    """One rank of `torchrun ... -m defect_studio train PROJECT`: rank 0 opens the project, reads the plan
    and sends it; every rank checks it sees the project folder and the images; all train; rank 0 alone
    writes the checkpoint and records the run."""
    from defect_studio.errors import DefectStudioError
    from defect_studio.ml.classifier import begin_project_training, plan_project_training, record_project_training, train_classifier_job
    from defect_studio.ml.distributed import check_shared_folder, process_group
    from defect_studio.project import Project

    cancel = CancelToken()
    with process_group(args.device) as (ranks, rank_device):
        project = None
        try:
            plan_or_error = None
            if ranks.is_writer:
                try:
                    project = Project.open(args.project)
                    plan_or_error = plan_project_training(project, _project_config(project, args))
                except DefectStudioError as error:
                    plan_or_error = error
            # Rank 0's refusal reaches every rank: none is left waiting for a plan that never comes.
            plan = ranks.from_rank0(plan_or_error)
            if isinstance(plan, DefectStudioError):
                if ranks.is_writer:
                    raise plan
                return plan.exit_code  # rank 0 says why
            check_shared_folder(ranks, plan.project_dir, [path for path, _, _ in plan.samples])
            checkpoint_path = ranks.from_rank0(begin_project_training(project, plan) if ranks.is_writer else None)
            job = train_classifier_job(plan.samples, plan.config, checkpoint_path, cancel, rank_device,
                                       validation_keys=plan.held_out, ranks=ranks)
            if not ranks.is_writer:
                run_quietly(job, cancel)
                return 0
            result = drive(job, args, cancel)
            record_project_training(project, plan, checkpoint_path, result)
        finally:
            if project is not None:
                project.close()
    _print_summary(result, args)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from defect_studio.ml.classifier_options import ARCHITECTURES, POOLINGS
    from defect_studio.ml.tiling import TILING_MODES

    parser = subparsers.add_parser(
        "train", help="train the defect classifier on the project's tagged images",
        description="Trains the image-level good/defect classifier on the tagged images of PROJECT, "
        "with a fixed validation split, early stopping and the best epoch saved under PROJECT/models/.",
    )
    parser.add_argument("project", type=Path, help="project folder")
    parser.add_argument("--arch", choices=ARCHITECTURES, help="backbone (default: efficientnet-lite0 with ImageNet weights; compact: trained from scratch)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--width", type=int, help="channels of the first stage (compact)")
    parser.add_argument("--output-stride", dest="output_stride", type=int, choices=[8, 16, 32])
    parser.add_argument("--pooling", choices=POOLINGS)
    parser.add_argument("--input-size", dest="input_size", type=int, help="side of the square network input")
    parser.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float,
                        help="peak learning rate (default: the backbone's)")
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-augment", dest="no_augment", action="store_true",
                        help="train without augmentation (reproducible comparisons, e.g. one process against several)")
    parser.add_argument("--max-minutes", dest="max_minutes", type=float, help="time budget of the whole job (default 10; 0: no limit); the epoch plan shrinks to fit it")
    parser.add_argument("--pretrained", type=Path, metavar="FILE",
                        help="local torchvision ImageNet weights for --arch resnet18/resnet34 (never downloaded)")
    parser.add_argument("--threads", type=int, help="CPU threads for training (default: torch's choice)")
    parser.add_argument("--tiling", choices=TILING_MODES,
                        help="tiles: learn from tiles of each image at native resolution (an image is defect when some tile is); "
                        "whole: letterbox every image into the input; auto: tiles for images over 1024 x 1024 pixels "
                        "(default: whole when every image is that small, else auto; kept in the project)")
    parser.add_argument("--tile-size", dest="tile_size", type=int, metavar="N", help="tile side in px (default: the input size)")
    parser.add_argument("--overlap", dest="tile_overlap", type=int, metavar="N",
                        help="px that neighbouring tiles share (default: a quarter of the tile)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train with N processes on this machine (torch.distributed: one per GPU, or gloo on the CPU); "
                        "for several machines run `torchrun ... -m defect_studio train PROJECT` (README)")
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_train)
