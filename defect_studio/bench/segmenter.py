"""`defect-studio bench segmenter`: which segmenter recipe learns a dataset, per CPU second.

Every candidate trains on the ground-truth masks of the training split (this benchmark measures the
network and the recipe, not the pseudo-labels) for a fixed number of steps, then is scored on the
test split: defect IoU, background IoU, per defect type. Separately, each candidate's training step
is timed on this machine's CPU with one torch thread, side by side in one run, so that a step
budget converts into CPU minutes. Accuracy per step does not depend on the device: the sweep may
train on a GPU (`--steps` and CUDA) while the CPU timing still describes the workstation.

Candidates: our U-Net variants, and segmentation-models-pytorch's Unet with random-init encoders
when that package is installed (it is not a dependency of the app).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defect_studio.bench.report import write_report
from defect_studio.dataset_layout import DatasetSample, load_dataset
from defect_studio.imageio import read_image
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.device import torch_threads
from defect_studio.ml.encoded_crops import EncodedCropSampler, encode_samples
from defect_studio.ml.evaluate import evaluate_pairs
from defect_studio.ml.segmenter import (
    CropSampler,
    SegmentationSample,
    SegmenterConfig,
    build_segmenter,
    load_segmenter,
    make_target,
    segmentation_loss,
    train_segmenter_job,
)

STEPS_PER_EPOCH = 40
# name -> SegmenterConfig overrides on top of the app's defaults ("default" is the app's recipe)
UNET = dict(architecture="unet")  # the compact U-Net, random init: the recipes measured before the pretrained encoder
CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    "efficientnet-lite0-unet, ImageNet encoder": dict(encoder_weights="imagenet"),
    "efficientnet-lite0-unet, encoder fine-tuned from stride 16": dict(frozen_stages=2, encoder_weights="imagenet"),
    "unet": UNET,
    "unet, old default: full res, 96 crops, lr 1e-2": dict(**UNET, stem_stride=1, crop_size=96, learning_rate=1e-2,
                                                           defect_crop_fraction=0.6),
    "unet, full-res branch, lr 3e-3": dict(**UNET, detail_branch=True, learning_rate=3e-3),
    "unet, lr 3e-3": dict(**UNET, learning_rate=3e-3),
    "unet, crops 128, lr 3e-3": dict(**UNET, crop_size=128, learning_rate=3e-3),
    "unet, crops 160": dict(**UNET, crop_size=160),
    "unet, crops 256, batch 8, lr 3e-3": dict(**UNET, crop_size=256, batch_size=8, learning_rate=3e-3),
    "unet, crops 320, batch 8, lr 3e-3": dict(**UNET, crop_size=320, batch_size=8, learning_rate=3e-3),
    "unet, defect crops 30 %, lr 3e-3": dict(**UNET, defect_crop_fraction=0.3, learning_rate=3e-3),
    "unet, width 12": dict(**UNET, channels=(12, 24, 48, 96, 192)),
    "unet, width 16": dict(**UNET, channels=(16, 32, 64, 128, 256)),
    "smp Unet resnet18": dict(architecture="smp-unet:resnet18"),
    "smp Unet mobilenet_v2": dict(architecture="smp-unet:mobilenet_v2"),
}
QUICK_CANDIDATES = ["default", "unet"]
QUICK_SIZES = dict(train=24, test=12)
QUICK_CONFIG = dict(channels=(8, 16, 32), crop_size=64, batch_size=4)
COLUMNS = ["candidate", "steps", "test defect IoU", "test background IoU", "cpu s/step", "cpu min for the steps",
           "params k", "train s (this run)"]


def _needs_missing_package(overrides: dict[str, Any]) -> bool:
    return str(overrides.get("architecture", "")).startswith("smp-") and importlib.util.find_spec(
        "segmentation_models_pytorch") is None


def _samples(items: list[DatasetSample]) -> list[tuple[DatasetSample, np.ndarray, np.ndarray]]:
    loaded = []
    for sample in items:
        image = read_image(sample.image_path)
        truth = sample.truth(image.shape[:2])
        loaded.append((sample, image, truth))
    return loaded


def cpu_seconds_per_step(config: SegmenterConfig, samples: list[SegmentationSample], steps: int = 4) -> float:
    """Median wall time of one training step on the CPU, one torch thread, after one warm-up step."""
    with torch_threads(1):
        torch.manual_seed(config.seed)
        model = build_segmenter(samples[0].image.shape[2], config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
        if getattr(model, "encoder_frozen", False):  # training decodes features encoded once per image
            some = samples[:: max(1, len(samples) // 32)]
            encoded, _ = run_job(encode_samples(model, [s.key for s in some], [s.image for s in some],
                                                [s.target for s in some], torch.device("cpu"), CancelToken()))
            sampler = EncodedCropSampler(encoded, config.crop_size, config.batch_size, config.defect_crop_fraction,
                                         config.seed, model.size_multiple)
            network = model.decode
        else:
            sampler, network = CropSampler(samples, config, model.in_channels), model
        times = []
        for _ in range(steps + 1):
            images, targets = sampler.batch()
            started = time.perf_counter()
            loss = segmentation_loss(network(images), targets, config.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        return float(np.median(times[1:]))


def main(args: argparse.Namespace) -> int:
    dataset = Path(args.dataset)
    out = Path(args.out) if getattr(args, "out", None) else Path("bench-results")
    quick = bool(args.quick)
    samples = load_dataset(dataset, seed=args.seed)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    if quick:
        train = [s for s in train if s.label == "defect"][: QUICK_SIZES["train"] // 2] + [
            s for s in train if s.label == "good"][: QUICK_SIZES["train"] // 2]
        test = test[: QUICK_SIZES["test"]]
    names = getattr(args, "candidates", None) or (QUICK_CANDIDATES if quick else list(CANDIDATES))
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    step_budgets = getattr(args, "steps", None) or ([16] if quick else [1200])
    training = [SegmentationSample(s.stem, image, make_target(truth)) for s, image, truth in _samples(train)]
    testing = _samples(test)
    work = out / "segmenter-checkpoints"
    rows: list[dict[str, Any]] = []
    for name in names:
        overrides = {**(QUICK_CONFIG if quick else {}), **CANDIDATES[name], "seed": args.seed}
        if _needs_missing_package(overrides):
            print(f"  {name}: skipped, segmentation-models-pytorch is not installed", file=sys.stderr)
            continue
        per_step = cpu_seconds_per_step(SegmenterConfig.from_dict({**overrides, "device": "cpu"}), training)
        for steps in step_budgets:
            epochs = max(1, steps // STEPS_PER_EPOCH)
            config = SegmenterConfig.from_dict({**overrides, "epochs": epochs, "steps_per_epoch": min(steps, STEPS_PER_EPOCH)})
            started = time.monotonic()
            result = run_job(train_segmenter_job(training, config, work / f"{len(rows)}.pt", CancelToken()))
            train_s = time.monotonic() - started
            model = load_segmenter(result.checkpoint_path)
            metrics = evaluate_pairs((truth, model.mask(image), s.label == "defect", s.defect_type)
                                     for s, image, truth in testing)
            row = {
                "candidate": name, "steps": config.epochs * config.steps_per_epoch,
                "test defect IoU": metrics["defect_iou"], "test background IoU": metrics["background_iou"],
                "cpu s/step": per_step, "cpu min for the steps": per_step * config.epochs * config.steps_per_epoch / 60,
                "params k": sum(p.numel() for p in model.model.parameters()) / 1000, "train s (this run)": train_s,
                "settings": config.to_dict(),
            }
            for kind, values in sorted(metrics["per_type"].items()):
                row[f"IoU {kind}"] = values["defect_iou"]
            rows.append(row)
            print(f"  {name:40s} {row['steps']:5d} steps  test defect IoU {row['test defect IoU']:.3f}  "
                  f"{per_step:.2f} CPU s/step", file=sys.stderr, flush=True)
    type_columns = sorted({k for row in rows for k in row if k.startswith("IoU ")})
    name = f"segmenter-{dataset.name}{'-quick' if quick else ''}"
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    markdown = write_report(
        out, name, f"Segmenter recipes on {dataset.name}: trained on ground-truth masks, scored on the test split",
        [("Candidates", rows, COLUMNS), ("Test defect IoU per defect type", rows, ["candidate", "steps", *type_columns])],
        [f"{len(training)} training images, {len(testing)} test images; trained on {device}; one seed ({args.seed}).",
         "cpu s/step: median of 4 training steps on this machine's CPU with one torch thread, all candidates in one run "
         "(a frozen encoder's candidate: decoder steps on features encoded once per image, as it trains).",
         f"Every candidate is the app's default recipe with the named change; {STEPS_PER_EPOCH} steps per epoch, "
         "best epoch chosen on 10 % of the training images."],
        extra={"candidates": {n: CANDIDATES[n] for n in names}},
    )
    print(markdown)
    return 0


if __name__ == "__main__":
    from defect_studio.bench.options import add_bench_arguments

    parser = argparse.ArgumentParser(description=__doc__)
    add_bench_arguments(parser)
    sys.exit(main(parser.parse_args()))
