"""The segmenter's settings, importable without torch (the window's rounds form needs them before
the training engine loads)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from defect_studio.errors import ConfigError


ENCODER_WEIGHTS = ("imagenet", "classifier")
# Views a prediction averages (logits, each flipped back): "hv" = the image, mirrored left-right, mirrored
# top-bottom. MT weak segmenter, seed 2, test defect IoU with one view / "hv": 0.288 / 0.306 (feature flips on in
# training), 0.289 / 0.306 (off); an earlier segmenter of the same seed 0.297 / 0.351 (docs/method-notes.md).
PREDICTION_FLIPS = ("none", "h", "hv")


@dataclass
class SegmenterConfig:
    # "efficientnet-lite0-unet" (default): a U-Net decoder over EfficientNet-Lite0; with `frozen_stages` 4 the
    # whole encoder stays fixed, so every image is encoded once and only the decoder trains, and with
    # `encoder_weights` "classifier" the encoder is the project's fine-tuned classifier's (ImageNet when the
    # classifier is the compact network). On MT's ground-truth masks, 400 steps: test defect IoU 0.418 against
    # 0.183 for the U-Net below (docs/benchmarks/segmenter-mt.md). The channel settings do not apply to it.
    # "unet": our own compact U-Net, random init (chosen earlier by a sweep on ground truth: half resolution,
    # 192-pixel crops, Adam at 1e-3). "smp-unet:ENCODER": segmentation-models-pytorch's Unet with a randomly
    # initialised encoder (optional package, measured as an alternative).
    architecture: str = "efficientnet-lite0-unet"
    channels: tuple[int, ...] = (8, 16, 32, 64, 128)  # unet only
    frozen_stages: int = 4  # efficientnet-lite0-unet: encoder levels after the stem kept fixed (4: all of it)
    encoder_weights: str = "classifier"  # efficientnet-lite0-unet: "classifier" (the project's), or "imagenet"
    stem_stride: int = 2  # 2: the U-Net runs at half resolution (a quarter of the cost)
    detail_branch: bool = False  # with stem_stride 2: a thin full-resolution branch for the last layer
    crop_size: int = 192
    batch_size: int = 16
    epochs: int = 10
    steps_per_epoch: int = 40
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    defect_crop_fraction: float = 0.5  # share of crops centred on a defect pixel (when the image has one)
    validation_fraction: float = 0.1
    max_validation_images: int = 60
    seed: int = 0
    # Refinement round k starts from round k-1's segmenter (same architecture) and then trains only
    # `warm_start_epochs`: the expensive part, leaving the all-background plateau, is done once.
    warm_start: bool = True
    warm_start_epochs: int = 4
    # Flip the cached encoder features of a training crop (with its target) at random. Not equivalent to encoding
    # a flipped image: a CNN's features are not mirror-symmetric (measured 30-100 % apart at every level). MT seed 2,
    # same classifier and pseudo-labels: weak segmenter 0.306 either way, ground-truth bound 0.643 off / 0.618 on.
    flip_encoded_features: bool = False
    prediction_flips: str = "hv"  # one of PREDICTION_FLIPS: test-time views, used by validation, the app and export
    # The project's classifier decides which images get a mask at all (its checkpoint is kept inside the
    # segmenter's): on MT it told good from defect images far better than the segmenter's own gate (seed 0,
    # round 0: test defect IoU 0.300 -> 0.354; docs/method-notes.md section 14). Whole-image classifiers only.
    classifier_gate: bool = True
    device: str = "auto"
    threads: int | None = None  # torch CPU threads while training; None leaves the default
    time_budget_s: float | None = None  # stop after the epoch that crosses it (same budget for weak and full)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "SegmenterConfig":
        values = dict(values or {})
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown segmenter settings: {', '.join(unknown)}")
        if "channels" in values:
            values["channels"] = tuple(int(c) for c in values["channels"])
        if values.get("encoder_weights", "imagenet") not in ENCODER_WEIGHTS:
            raise ConfigError(f"encoder_weights must be one of {', '.join(ENCODER_WEIGHTS)}, got {values['encoder_weights']!r}")
        if values.get("prediction_flips", "hv") not in PREDICTION_FLIPS:
            raise ConfigError(f"prediction_flips must be one of {', '.join(PREDICTION_FLIPS)}, got {values['prediction_flips']!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["channels"] = list(self.channels)
        return values
