"""`defect-studio bench cams`: every CAM method and every ablation of ours, on the train split's defect images.

For each variant: defect IoU, background IoU and mIoU with intersections and unions summed over all
pixels of the split, at the best single global threshold and at the default threshold (0.5); defect
IoU per defect type (at the variant's best global threshold); the pointing game; and milliseconds
per image, side by side with pytorch-grad-cam's LayerCAM on the same model and images.

The classifier: `--classifier PATH`, else a checkpoint cached in the output folder from an earlier
run, else the default classifier is trained on the train split (`train_classifier_job`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

from defect_studio.bench.report import write_report
from defect_studio.dataset_layout import DatasetSample, load_dataset
from defect_studio.imageio import file_sha256, read_image, read_mask
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.cams import compute_cams, default_settings, minmax
from defect_studio.ml.device import torch_threads
from defect_studio.ml.metrics import ThresholdSweep

DEFAULT_THRESHOLD = 0.5
MIN_THRESHOLD = 0.05
POINTING_TOLERANCE_PX = 15  # the pointing game's usual tolerance (Zhang et al. 2016)
QUICK_IMAGES = 30
BATCH_SIZE = 8
PAIRED_BATCHES = 8  # batches per variant timed side by side with the reference
REFERENCE_NAME = "pytorch-grad-cam LayerCAM"

Variant = tuple[str, str, dict[str, Any], str]  # (name, method, settings, what it tests)


PRIOR_PRODUCT = "×good-prior"  # a method name ending so is that method's map times the good-image prior


def variants(ablations: bool = True) -> list[Variant]:
    """The methods at their defaults and the candidates for the defaults; then (with `ablations`) one
    component of FGBP and of the region-aware CAM switched off at a time."""
    rows: list[Variant] = [
        ("gradcam", "gradcam", {}, "baseline, stage 4"),
        ("gradcampp", "gradcampp", {}, "baseline, stage 4"),
        ("layercam", "layercam", {}, "baseline, stages 1-4 max-fused"),
        ("layercam s3", "layercam", {"stages": [3]}, "baseline, stage 3 (stride 16) only"),
        ("layercam s2-3", "layercam", {"stages": [2, 3]}, "baseline, stages 2-3"),
        ("layercam s3-4", "layercam", {"stages": [3, 4]}, "baseline, stages 3-4"),
        ("good-prior", "good-prior", {}, "distance to the good images' memory bank"),
        ("layercam s2-3 × good-prior", "layercam" + PRIOR_PRODUCT, {"stages": [2, 3]}, "product of the two maps"),
        ("fgbp", "fgbp", {}, "default: stages 2-3"),
        ("fgbp s3", "fgbp", {"stages": [3]}, "stage subset"),
        ("fgbp s1-4", "fgbp", {"stages": [1, 2, 3, 4]}, "method.md's stages for a ResNet"),
        ("fgbp × good-prior", "fgbp" + PRIOR_PRODUCT, {}, "product of the two maps"),
        ("region-aware", "region-aware", {}, "default: stages 2-3 in regions of stage 3, prior gates the regions"),
        ("region-aware prior off", "region-aware", {"good_prior": "off"}, "without the good-image prior"),
        ("region-aware prior multiply", "region-aware", {"good_prior": "multiply"}, "prior multiplies the fused map"),
        ("region-aware s1-3", "region-aware", {"stages": [1, 2, 3]}, "stage subset"),
        ("region-aware s3", "region-aware", {"stages": [3]}, "stage subset"),
        ("region-aware salient s3-4", "region-aware", {"salient_stages": [3, 4]}, "deep map from stages 3-4"),
        ("region-aware s1-4 salient s4", "region-aware", {"stages": [1, 2, 3, 4], "salient_stages": [4], "good_prior": "off"},
         "method.md's stages for a ResNet, no prior"),
        ("fgbp input ×1.5", "fgbp", {"input_scale": 1.5}, "the image 1.5× larger than the classifier trained on"),
        ("region-aware input ×1.5", "region-aware", {"input_scale": 1.5}, "the image 1.5× larger"),
        ("layercam s2-3 input ×1.5", "layercam", {"stages": [2, 3], "input_scale": 1.5}, "the image 1.5× larger"),
    ]
    if not ablations:
        return rows
    rows += [
        ("fgbp no guided gating", "fgbp", {"guided": False}, "ablation"),
        ("fgbp no magnitude filter", "fgbp", {"magnitude_filter": False}, "ablation"),
        ("fgbp no stage alignment", "fgbp", {"align_stages": False}, "ablation"),
        ("region-aware no guided gating", "region-aware", {"guided": False}, "ablation"),
        ("region-aware no magnitude filter", "region-aware", {"magnitude_filter": False}, "ablation"),
        ("region-aware no stage alignment", "region-aware", {"align_stages": False}, "ablation"),
        ("region-aware no per-region norm", "region-aware", {"per_region_normalisation": False}, "ablation"),
        ("region-aware no contrast weights", "region-aware", {"contrast_weights": False}, "ablation"),
        ("region-aware no deep gating", "region-aware", {"deep_gating": False}, "ablation"),
    ]
    rows += [(f"fgbp q={q}", "fgbp", {"fgbp_quantile": q}, "ablation") for q in (0.5, 0.8, 0.95)]
    rows += [(f"region-aware q={q}", "region-aware", {"fgbp_quantile": q}, "ablation") for q in (0.5, 0.8, 0.95)]
    return rows


def variant_maps(classifier: Any, images: list[np.ndarray], method: str, settings: dict[str, Any]) -> list[np.ndarray]:
    if not method.endswith(PRIOR_PRODUCT):
        return compute_cams(classifier, images, method, settings, BATCH_SIZE)
    base = compute_cams(classifier, images, method.removesuffix(PRIOR_PRODUCT), settings, BATCH_SIZE)
    prior = compute_cams(classifier, images, "good-prior", {}, BATCH_SIZE)
    return [minmax(a * b) for a, b in zip(base, prior)]


def percentile_ranks(score_map: np.ndarray) -> np.ndarray:
    """Each pixel's rank within its own map, in [0, 1]: a global threshold t on these is the per-image
    decision 'the top (1 - t) of this image's pixels'."""
    flat = score_map.ravel()
    ranks = np.empty(flat.size, dtype=np.float32)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size, dtype=np.float32) / max(1, flat.size - 1)
    return ranks.reshape(score_map.shape)


def otsu_mask(score_map: np.ndarray) -> np.ndarray:
    scaled = np.clip(score_map * 255.0 + 0.5, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(np.float32)


def _slug(dataset: Path) -> str:
    return {"magnetic-tile": "mt"}.get(dataset.name, dataset.name.lower().replace(" ", "-"))


def _pick_subset(samples: list[DatasetSample], count: int) -> list[DatasetSample]:
    """`count` samples spread evenly over the defect types (deterministic)."""
    by_type: dict[str, list[DatasetSample]] = defaultdict(list)
    for sample in samples:
        by_type[sample.defect_type or "defect"].append(sample)
    chosen: list[DatasetSample] = []
    while len(chosen) < count and any(by_type.values()):
        for kind in sorted(by_type):
            if by_type[kind] and len(chosen) < count:
                chosen.append(by_type[kind].pop(0))
    return sorted(chosen, key=lambda s: s.stem)


def obtain_classifier(args: argparse.Namespace, samples: list[DatasetSample], out: Path) -> Path:
    """--classifier, or the checkpoint cached in the output folder, or train the default one there."""
    explicit = getattr(args, "classifier", None)
    if explicit is not None:
        return Path(explicit)
    cached = out / f"cams-{_slug(args.dataset)}-classifier{'-quick' if args.quick else ''}.pt"
    if cached.is_file():
        return cached
    from defect_studio.ml.classifier import train_classifier_job
    from defect_studio.ml.models import ClassifierConfig

    train = [(s.image_path, s.label, file_sha256(s.image_path)) for s in samples if s.split == "train"]
    config = ClassifierConfig(seed=args.seed)
    if args.quick:
        config = ClassifierConfig(seed=args.seed, epochs=6, min_epochs=3, max_train_seconds=60.0)
    print(f"training the default classifier on {len(train)} images -> {cached}", flush=True)
    run_job(train_classifier_job(train, config, cached, CancelToken()))
    return cached


def _pointing_hit(cam_map: np.ndarray, truth: np.ndarray) -> bool:
    peak = np.unravel_index(int(np.argmax(cam_map)), cam_map.shape)
    radius = POINTING_TOLERANCE_PX
    top, left = max(0, peak[0] - radius), max(0, peak[1] - radius)
    window = truth[top : peak[0] + radius + 1, left : peak[1] + radius + 1]
    rows, cols = np.nonzero(window)
    return bool(np.any((rows + top - peak[0]) ** 2 + (cols + left - peak[1]) ** 2 <= radius**2))


def _timed(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def reference_layercam(classifier: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """pytorch-grad-cam's LayerCAM on all four stages, mapped back to the original pixels like ours."""
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class WithClassAxis(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)[:, None]

    maps: list[np.ndarray] = []
    wrapped = WithClassAxis(classifier.model)
    for start in range(0, len(images), BATCH_SIZE):
        batch, geometries = classifier.preprocessing.prepare_batch(images[start : start + BATCH_SIZE])
        with LayerCAM(wrapped, list(classifier.model.stages)) as cam:
            # frozen stages' outputs need no gradient, and the library then misses their gradient hooks
            cam.compute_input_gradient = True
            at_input = cam(batch.to(classifier.device), [ClassifierOutputTarget(0)] * len(batch))
        maps += [geometry.to_original(m) for geometry, m in zip(geometries, at_input)]
    classifier.model.eval()
    return maps


class VariantScore:
    def __init__(self) -> None:
        self.sweep = ThresholdSweep()
        self.by_type: dict[str, ThresholdSweep] = defaultdict(ThresholdSweep)
        self.percentile_sweep = ThresholdSweep(np.linspace(0.0, 1.0, 1001))  # per-image top x %, in 0.1 % steps
        self.otsu = ThresholdSweep(np.array([0.0, 0.5]))  # a 0/1 mask: the tally at 0.5
        self.hits = 0
        self.count = 0
        self.seconds = 0.0
        # the same batches timed with the reference right before or after: a ratio robust to a busy CPU
        self.paired_ours = 0.0
        self.paired_reference = 0.0

    def add(self, truth: np.ndarray, cam_map: np.ndarray, defect_type: str) -> None:
        self.sweep.add(truth, cam_map)
        self.by_type[defect_type].add(truth, cam_map)
        self.percentile_sweep.add(truth, percentile_ranks(cam_map))
        self.otsu.add(truth, otsu_mask(cam_map))
        self.hits += _pointing_hit(cam_map, truth)
        self.count += 1

    def row(self, name: str, method: str, what: str, settings: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        threshold, best = self.sweep.best()
        at_default = self.sweep.at(DEFAULT_THRESHOLD)
        # thresholds near 0 mark almost every pixel; the best threshold from MIN_THRESHOLD up shows the map itself
        nontrivial = [t for t, _ in zip(self.sweep.thresholds, self.sweep.tallies) if t >= MIN_THRESHOLD - 1e-9]
        nontrivial_t = max(nontrivial, key=lambda t: np.nan_to_num(self.sweep.at(t).defect_iou))
        best_nontrivial = self.sweep.at(nontrivial_t)
        row: dict[str, Any] = {
            "variant": name, "method": method, "what": what,
            "best_t": threshold, "defect_iou": best.defect_iou, "background_iou": best.background_iou, "miou": best.miou,
            "defect_iou@0.5": at_default.defect_iou, "miou@0.5": at_default.miou,
            "defect_iou_t>=0.05": best_nontrivial.defect_iou, "t>=0.05": float(nontrivial_t),
            "pointing": self.hits / max(1, self.count), "ms_per_image": 1000.0 * self.seconds / max(1, self.count),
            "time_vs_reference": self.paired_ours / self.paired_reference if self.paired_reference else float("nan"),
            "settings": json.dumps(overrides, sort_keys=True) if overrides else "defaults",
            "all_settings": settings,
        }
        for kind, sweep in sorted(self.by_type.items()):
            row[f"iou {kind}"] = sweep.at(nontrivial_t).defect_iou
        type_ious = [sweep.at(nontrivial_t).defect_iou for sweep in self.by_type.values()]
        row["mean_type_iou"] = float(np.nanmean(type_ious)) if type_ious else float("nan")
        top_t, top = self.percentile_sweep.best()
        row["defect_iou_per_image_top"] = top.defect_iou
        row["per_image_top_%"] = round(100.0 * (1.0 - top_t), 1)
        row["defect_iou_otsu"] = self.otsu.at(0.5).defect_iou
        return row


MASK_QUALITY_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("region-aware", "region-aware", {}),
    ("fgbp", "fgbp", {}),
    ("good-prior", "good-prior", {}),
]


def mask_quality(checkpoint: Path, samples: list[DatasetSample]) -> dict[str, float]:
    """How well a classifier's CAMs outline the defects of `samples` (defect images with masks): pooled
    defect IoU at the best global threshold and its mean over defect types, per method. Classifiers are
    chosen by this, not by AUROC alone (a classifier picked on AUROC gave maps no better than marking
    every pixel)."""
    from defect_studio.ml.classifier import load_classifier

    classifier = load_classifier(checkpoint, device="cpu")
    chosen = [s for s in samples if s.label == "defect" and s.mask_path is not None]
    scores = {name: VariantScore() for name, _, _ in MASK_QUALITY_METHODS}
    for start in range(0, len(chosen), BATCH_SIZE):
        batch = chosen[start : start + BATCH_SIZE]
        images = [read_image(s.image_path) for s in batch]
        truths = [read_mask(s.mask_path, image.shape[:2]) for s, image in zip(batch, images)]
        for name, method, settings in MASK_QUALITY_METHODS:
            for sample, truth, cam_map in zip(batch, truths, variant_maps(classifier, images, method, settings)):
                scores[name].add(truth, cam_map, sample.defect_type or "defect")
    out: dict[str, float] = {}
    for name, score in scores.items():
        row = score.row(name, name, "", {}, {})
        out[f"iou {name}"] = row["defect_iou"]
        out[f"type-mean {name}"] = row["mean_type_iou"]
    return out


def main(args: argparse.Namespace) -> int:
    from defect_studio.ml.classifier import load_classifier

    dataset = Path(args.dataset)
    out = Path(args.out) if getattr(args, "out", None) else Path("bench-results")
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(1):  # timings on a shared CPU are only comparable single-threaded
        samples = load_dataset(dataset, seed=getattr(args, "seed", 0))
        checkpoint = obtain_classifier(args, samples, out)
        classifier = load_classifier(checkpoint, device="cpu")
        chosen = [s for s in samples if s.split == "train" and s.label == "defect" and s.mask_path is not None]
        if args.quick:
            chosen = _pick_subset(chosen, QUICK_IMAGES)
        images = [read_image(s.image_path) for s in chosen]
        truths = [read_mask(s.mask_path, image.shape[:2]) for s, image in zip(chosen, images)]
        kinds = [s.defect_type or "defect" for s in chosen]
        print(f"{len(chosen)} defect images of the train split; classifier {checkpoint.name}", flush=True)
        rows = []
        reference = VariantScore()
        for start in range(0, len(images), BATCH_SIZE):  # warm-up, then timed
            if start == 0:
                reference_layercam(classifier, images[:2])
            maps, seconds = _timed(lambda: reference_layercam(classifier, images[start : start + BATCH_SIZE]))
            reference.seconds += seconds
            for offset, cam_map in enumerate(maps):
                reference.add(truths[start + offset], cam_map, kinds[start + offset])
        every_pixel = VariantScore()  # the trivial map: what any CAM must beat
        for truth, kind in zip(truths, kinds):
            every_pixel.add(truth, np.ones(truth.shape, np.float32), kind)
        rows.append(every_pixel.row("mark every pixel", "none", "trivial baseline", {}, {}))
        rows[-1].update(pointing=float("nan"), ms_per_image=float("nan"))
        rows.append(reference.row(REFERENCE_NAME, "layercam", "reference library, stages 1-4 mean-fused", {}, {}))
        for name, method, settings, what in variants(args.quick or getattr(args, "ablations", False)):
            score = VariantScore()
            variant_maps(classifier, images[:2], method, settings)  # warm-up
            for batch_index, start in enumerate(range(0, len(images), BATCH_SIZE)):
                chunk = images[start : start + BATCH_SIZE]
                paired = batch_index < PAIRED_BATCHES
                if paired and batch_index % 2:  # alternate who goes first, so load drift cancels
                    score.paired_reference += _timed(lambda: reference_layercam(classifier, chunk))[1]
                maps, seconds = _timed(lambda: variant_maps(classifier, chunk, method, settings))
                if paired and not batch_index % 2:
                    score.paired_reference += _timed(lambda: reference_layercam(classifier, chunk))[1]
                score.seconds += seconds
                if paired:
                    score.paired_ours += seconds
                for offset, cam_map in enumerate(maps):
                    score.add(truths[start + offset], cam_map, kinds[start + offset])
            rows.append(score.row(name, method, what, {**default_settings(method.removesuffix(PRIOR_PRODUCT)), **settings}, settings))
            print(f"  {name:36s} defect IoU {rows[-1]['defect_iou']:.3f} (t={rows[-1]['best_t']:.2f}), mean over types "
                  f"{rows[-1]['mean_type_iou']:.3f}, per-image top {rows[-1]['defect_iou_per_image_top']:.3f}  "
                  f"{rows[-1]['ms_per_image']:.0f} ms/image", flush=True)
    rows[1]["time_vs_reference"] = 1.0
    type_columns = sorted({k for row in rows for k in row if k.startswith("iou ")})
    main_columns = ["variant", "defect_iou", "mean_type_iou", "background_iou", "miou", "best_t", "defect_iou_t>=0.05",
                    "defect_iou@0.5", "defect_iou_per_image_top", "per_image_top_%", "defect_iou_otsu",
                    "pointing", "ms_per_image", "time_vs_reference"]
    layercam_best = max(r["defect_iou"] for r in rows if r["method"] == "layercam")
    layercam_prior_best = max((r["defect_iou"] for r in rows if r["method"] == "layercam" + PRIOR_PRODUCT), default=float("nan"))
    region = next(r for r in rows if r["variant"] == "region-aware")
    notes = [
        f"{len(chosen)} defect images of the train split{' (quick subset)' if args.quick else ''}; "
        "IoU with intersections and unions summed over all pixels; best_t is the best single global threshold "
        f"(t = 0 marks every pixel, hence the 'mark every pixel' row); defect_iou_t>=0.05 is the best with t >= {MIN_THRESHOLD}.",
        f"Pointing game: the map's peak within {POINTING_TOLERANCE_PX} px of a defect pixel.",
        f"Times: ms per image end to end (preprocessing, one forward/backward, mapping to the original pixels), "
        f"1 torch thread, batches of {BATCH_SIZE}; the reference is pytorch-grad-cam's LayerCAM (all four stages) on the "
        f"same model and mapped back the same way. time_vs_reference pairs each variant's first {PAIRED_BATCHES} batches "
        "with the reference on the same batches, run alternately, so a busy CPU affects both alike.",
        f"Region-aware defect IoU {region['defect_iou']:.3f} vs best LayerCAM variant {layercam_best:.3f} "
        f"({region['defect_iou'] - layercam_best:+.3f}); vs the best LayerCAM × good-prior {layercam_prior_best:.3f} "
        f"({region['defect_iou'] - layercam_prior_best:+.3f}); time {region['time_vs_reference']:.2f}x the reference.",
        "mean_type_iou: the mean over defect types of each type's pooled defect IoU (at t >= 0.05). "
        "defect_iou_per_image_top: each image's own top per_image_top_% pixels marked (the best such share); "
        "defect_iou_otsu: each map thresholded at its own Otsu threshold.",
        f"Classifier {checkpoint.name}: sha256 {classifier.checkpoint_sha256[:12]}, "
        f"{classifier.config.arch}{'' if classifier.config.arch != 'compact' else f' width {classifier.config.width}'}, "
        f"frozen stages {classifier.config.frozen_stages}, output stride {classifier.config.output_stride}, "
        f"pooling {classifier.config.pooling}, input {classifier.preprocessing.input_size}; "
        f"metrics {json.dumps({k: round(v, 3) for k, v in classifier.metrics.items() if isinstance(v, float)})}.",
    ]
    name = f"cams-{_slug(dataset)}{'-quick' if args.quick else ''}"
    markdown = write_report(
        out, name, f"CAM methods on {dataset.name}: train split, defect images",
        [
            ("Methods and ablations", rows, main_columns),
            ("Defect IoU per defect type (at each variant's best global threshold t >= 0.05)", rows, ["variant", "t>=0.05", *type_columns]),
            ("Settings of each variant", rows, ["variant", "what", "settings"]),
        ],
        notes,
        extra={"classifier": str(checkpoint), "checkpoint_sha256": classifier.checkpoint_sha256,
               "classifier_config": classifier.config.to_dict(), "images": [s.stem for s in chosen]},
    )
    print(markdown)
    return 0
