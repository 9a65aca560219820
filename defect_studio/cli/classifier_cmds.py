"""`defect-studio train PROJECT`: train the image-level classifier on the project's tagged images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from defect_studio.cli.progress import add_progress_arguments, drive
from defect_studio.jobs import CancelToken


def run_train(args: argparse.Namespace) -> int:
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.ml.models import ClassifierConfig
    from defect_studio.project import Project

    settings = {}
    for name in ("arch", "epochs", "width", "output_stride", "pooling", "input_size", "seed", "lr", "batch_size", "threads"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if args.pretrained is not None:
        settings["pretrained"] = str(Path(args.pretrained).resolve())
    if args.max_minutes is not None:
        settings["max_train_seconds"] = float(args.max_minutes) * 60.0 if args.max_minutes > 0 else None
    try:
        config = ClassifierConfig(**settings)
    except ValueError as error:
        from defect_studio.errors import DataError

        raise DataError(str(error)) from error
    if config.pretrained and config.arch not in ("resnet18", "resnet34"):
        from defect_studio.errors import ModelError

        raise ModelError(f"--pretrained names torchvision ResNet weights, and {config.arch} does not take them "
                         "(EfficientNet-Lite0 has its own ImageNet weights): add --arch resnet18 or --arch resnet34.")
    cancel = CancelToken()
    with Project.open(args.project) as project:
        result = drive(train_project_classifier_job(project, config, cancel, device=args.device), args, cancel)
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
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from defect_studio.ml.classifier_options import ARCHITECTURES, POOLINGS

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
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-minutes", dest="max_minutes", type=float, help="time budget of the whole job (default 10; 0: no limit); the epoch plan shrinks to fit it")
    parser.add_argument("--pretrained", type=Path, metavar="FILE",
                        help="local torchvision ImageNet weights for --arch resnet18/resnet34 (never downloaded)")
    parser.add_argument("--threads", type=int, help="CPU threads for training (default: torch's choice)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_progress_arguments(parser)
    parser.set_defaults(handler=run_train)
