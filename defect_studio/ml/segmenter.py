"""The segmenter: a U-Net trained on (pseudo-)masks with BCE + Dice, ignoring ignored pixels.

The default network is a U-Net decoder over EfficientNet-Lite0 whose encoder stays fixed: the
project's fine-tuned classifier's stem and four stages (ImageNet's when the classifier is the compact
network). Every training image is encoded once (`encoded_crops`), and the decoder trains on crops of
its features; on MT's ground-truth masks it reaches a test defect IoU of 0.418 in 400 steps where the
compact U-Net trained from scratch reaches 0.183 (docs/benchmarks/segmenter-mt.md). The compact
U-Net (`architecture="unet"`: 8-16-32-64-128 channels at half resolution, 0.49 M parameters) stays
as an option. Training sees random crops, half of them centred on defect pixels (MT defects cover a
median 0.5 % of an image, so uniform crops would show almost none); inference runs on the whole
image after reflect padding to a multiple of `size_multiple`, and returns probabilities at the
image's own resolution, so there is no resize to undo. The input normalisation is part of the
network (buffers), so an exported model takes plain float [0, 1] pixels. The pixel threshold and an
image-level gate are chosen on held-out images (`_validate`).

Targets are uint8 maps: 0 background, 1 defect, IGNORE (255) = not trained on (the pseudo-label
ignore band, and the padding of crops taken from images smaller than the crop).
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from defect_studio.atomic import atomic_open
from defect_studio.errors import DataError, ModelError
from defect_studio.jobs import CancelToken, EtaClock, JobCancelled, Progress, ProgressKind
from defect_studio.ml.backbones import EfficientNetLite0, adapt_input_channels, load_imagenet_weights
from defect_studio.ml.encoded_crops import (
    FEATURE_BUDGET_BYTES,
    EncodedCropSampler,
    EncodedSample,
    decode_by_tiles,
    draw_crop_origin,
    encode_samples,
    feature_bytes,
    is_tiled,
)
from defect_studio.ml.device import peak_memory_mb, select_device, torch_threads
from defect_studio.ml.distributed import Ranks, data_parallel
from defect_studio.ml.metrics import SegmentationTally, ThresholdSweep
from defect_studio.ml.segmenter_options import PREDICTION_FLIPS, SegmenterConfig  # re-exported: the config lives without torch
from defect_studio.predict import IMAGE_SCORE_TOP_K, decide_mask, image_score, match_channels, to_network_input

IGNORE = 255
CHECKPOINT_FORMAT = "defect-studio-segmenter/1"
HEAD_PRIOR_LOGIT = -4.0


@dataclass
class SegmentationSample:
    """One training image: float H×W×C pixels in [0, 1] and a uint8 target (0, 1, IGNORE)."""

    key: str
    image: np.ndarray
    target: np.ndarray

    def __post_init__(self) -> None:
        if self.image.shape[:2] != self.target.shape:
            raise DataError(f"{self.key}: mask {self.target.shape} does not match image {self.image.shape[:2]}")


def make_target(mask: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """0/1 from the mask, IGNORE wherever `ignore` is set (defect pixels included: see ml/pseudo.py)."""
    target = np.asarray(mask, dtype=bool).astype(np.uint8)
    if ignore is not None:
        target[np.asarray(ignore, dtype=bool)] = IGNORE
    return target


# ---------------------------------------------------------------------------------------------
# The network


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegmenterNet(nn.Module):
    """U-Net: conv blocks with max-pool down, bilinear up + skip concat; one logit per pixel."""

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
        stem_stride: int = 1,
        detail_branch: bool = True,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.in_channels = in_channels
        self.stem_stride = stem_stride
        self.detail_branch = detail_branch and stem_stride == 2
        self.size_multiple = 2 ** (len(channels) - 1) * stem_stride
        self.register_buffer("input_mean", torch.full((1, in_channels, 1, 1), 0.5))
        self.register_buffer("input_std", torch.full((1, in_channels, 1, 1), 0.25))
        first_in = in_channels
        if stem_stride == 2:
            # The U-Net runs at half resolution (a quarter of the cost); the optional thin
            # full-resolution branch brings pixel detail back for the last layer (MT blowholes are
            # ~10 px wide) but costs more than the whole half-resolution U-Net on a CPU.
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, channels[0], 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels[0]),
                nn.ReLU(inplace=True),
            )
            first_in = channels[0]
        if self.detail_branch:
            self.detail = nn.Sequential(
                nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                nn.BatchNorm2d(channels[0]),
                nn.ReLU(inplace=True),
            )
            self.fuse = nn.Sequential(
                nn.Conv2d(2 * channels[0], channels[0], 3, padding=1, bias=False),
                nn.BatchNorm2d(channels[0]),
                nn.ReLU(inplace=True),
            )
        self.encoders = nn.ModuleList(
            _conv_block(first_in if i == 0 else channels[i - 1], channels[i]) for i in range(len(channels))
        )
        self.decoders = nn.ModuleList(
            _conv_block(channels[i + 1] + channels[i], channels[i]) for i in range(len(channels) - 1)
        )
        self.head = nn.Conv2d(channels[0], 1, 1)
        # Start from the prior "almost every pixel is background" (p = 0.02) instead of p = 0.5:
        # otherwise the first hundreds of steps are spent pushing the background down (RetinaNet's trick).
        nn.init.constant_(self.head.bias, HEAD_PRIOR_LOGIT)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        normalised = (pixels - self.input_mean) / self.input_std
        x = self.stem(normalised) if self.stem_stride == 2 else normalised
        skips = []
        for index, encoder in enumerate(self.encoders):
            x = encoder(x if index == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for index in reversed(range(len(self.decoders))):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.decoders[index](torch.cat([x, skips[index]], dim=1))
        if self.stem_stride == 1:
            return self.head(x)
        if not self.detail_branch:  # upsample the logits, not the features: 1 channel instead of 8
            return F.interpolate(self.head(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, self.detail(normalised)], dim=1))
        return self.head(x)


class LibraryUnet(nn.Module):
    """segmentation-models-pytorch's Unet, random init, behind SegmenterNet's interface."""

    def __init__(self, in_channels: int, encoder: str) -> None:
        super().__init__()
        try:
            import segmentation_models_pytorch as smp
        except ImportError as error:
            raise ModelError("architecture smp-unet needs the segmentation-models-pytorch package.") from error
        self.network = smp.Unet(encoder, encoder_weights=None, in_channels=in_channels, classes=1)
        self.in_channels = in_channels
        self.stem_stride = 1
        self.size_multiple = 32
        self.register_buffer("input_mean", torch.full((1, in_channels, 1, 1), 0.5))
        self.register_buffer("input_std", torch.full((1, in_channels, 1, 1), 0.25))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network((pixels - self.input_mean) / self.input_std)


class EfficientNetUnet(nn.Module):
    """A U-Net decoder over EfficientNet-Lite0's stride 2-32 stages, the encoder starting from ImageNet.

    The stem and the stride-4 and stride-8 blocks may stay frozen (`frozen_stages`): ImageNet's edge and
    texture detectors need no retraining, and their backward pass is most of the cost on a CPU. Each decoder
    level upsamples, concatenates the skip and applies one 3×3 convolution; the last runs at stride 2 and the
    logits are upsampled, as in SegmenterNet. Input scaled (x - 0.5) / 0.5, as the weights expect.
    """

    DECODER_CHANNELS = (16, 24, 40, 64)  # at strides 2, 4, 8, 16
    LEVEL_CHANNELS = (16, 24, 40, 112, 320)  # the encoder's outputs
    LEVEL_STRIDES = (2, 4, 8, 16, 32)
    fixed_normalisation = True  # training must not replace the input scaling with data statistics

    def __init__(self, in_channels: int, frozen_stages: int = 2, imagenet_weights: bool = False) -> None:
        super().__init__()
        network = EfficientNetLite0()
        if imagenet_weights:
            load_imagenet_weights(network)
        network._conv_stem = adapt_input_channels(network._conv_stem, in_channels)
        blocks = list(network._blocks)
        self.in_channels = in_channels
        self.stem_stride = 2
        self.size_multiple = 32
        self.frozen_stages = frozen_stages
        self.register_buffer("input_mean", torch.full((1, in_channels, 1, 1), 0.5))
        self.register_buffer("input_std", torch.full((1, in_channels, 1, 1), 0.5))
        # encoder levels at strides 2, 4, 8, 16, 32 (channels 16, 24, 40, 112, 320)
        self.encoder = nn.ModuleList([
            nn.Sequential(network._conv_stem, network._bn0, network.stem_relu, blocks[0]),
            nn.Sequential(*blocks[1:3]),
            nn.Sequential(*blocks[3:5]),
            nn.Sequential(*blocks[5:11]),
            nn.Sequential(*blocks[11:16]),
        ])
        skip_channels = self.LEVEL_CHANNELS[:-1]
        deeper = (*self.DECODER_CHANNELS[1:], 320)
        self.decoders = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(deeper[i] + skip_channels[i], self.DECODER_CHANNELS[i], 3, padding=1, bias=False),
                nn.BatchNorm2d(self.DECODER_CHANNELS[i]),
                nn.ReLU(inplace=True),
            )
            for i in range(len(skip_channels))
        )
        self.head = nn.Conv2d(self.DECODER_CHANNELS[0], 1, 1)
        nn.init.constant_(self.head.bias, HEAD_PRIOR_LOGIT)
        for level in self.encoder[: frozen_stages + 1]:
            level.requires_grad_(False)

    def train(self, mode: bool = True) -> "EfficientNetUnet":
        super().train(mode)
        for level in self.encoder[: self.frozen_stages + 1]:  # frozen BatchNorm keeps ImageNet's statistics
            level.eval()
        return self

    @property
    def encoder_frozen(self) -> bool:
        """Whether no encoder weight trains: its features can then be computed once per image and reused."""
        return self.frozen_stages + 1 >= len(self.encoder)

    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's outputs at strides 2, 4, 8, 16 and 32."""
        x = (pixels - self.input_mean) / self.input_std
        levels = []
        for level in self.encoder:
            x = level(x)
            levels.append(x)
        return levels

    def decode(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """One logit per input pixel from `encode`'s outputs."""
        x = levels[-1]
        for index in reversed(range(len(self.decoders))):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.decoders[index](torch.cat([x, levels[index]], dim=1))
        return F.interpolate(self.head(x), scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(pixels))

    def load_classifier_encoder(self, classifier: nn.Module) -> None:
        """Start the encoder from a trained EfficientNet-Lite0 defect classifier (its stem and four stages,
        without the classification head convolution): the features that already tell defect from good."""
        own = self.encoder.state_dict()
        copied = {}
        for key, value in classifier.state_dict().items():
            if key.startswith("stem."):
                copied["0." + key[len("stem."):]] = value
            elif key.startswith("stages."):
                stage, rest = key[len("stages."):].split(".", 1)
                copied[f"{int(stage) + 1}.{rest}"] = value
        copied = {k: v for k, v in copied.items() if k in own}
        missing = sorted(set(own) - set(copied))
        if missing or any(copied[k].shape != own[k].shape for k in own):
            raise ModelError("the classifier is not an EfficientNet-Lite0 with this segmenter's input channels "
                             f"({len(missing)} encoder weights without a counterpart); use encoder_weights=imagenet.")
        self.encoder.load_state_dict(copied)


SEGMENTER_ARCHITECTURES = ("unet", "efficientnet-lite0-unet", "smp-unet:ENCODER")


def build_segmenter(in_channels: int, config: "SegmenterConfig", imagenet_weights: bool = False) -> SegmenterNet:
    """The network a config describes: training, loading and export all build it here. `imagenet_weights`
    starts a pretrained encoder from ImageNet (training); a loaded checkpoint brings its own weights."""
    if config.architecture.startswith("smp-unet:"):
        return LibraryUnet(in_channels, config.architecture.split(":", 1)[1])  # type: ignore[return-value]
    if config.architecture == "efficientnet-lite0-unet":
        return EfficientNetUnet(in_channels, config.frozen_stages, imagenet_weights)  # type: ignore[return-value]
    if config.architecture != "unet":
        raise DataError(f"unknown segmenter architecture {config.architecture!r} ({', '.join(SEGMENTER_ARCHITECTURES)})")
    return SegmenterNet(in_channels, config.channels, config.stem_stride, config.detail_branch)


# The tensor dimensions each view of `SegmenterConfig.prediction_flips` mirrors (N×C×H×W: 3 = left-right, 2 = top-bottom).
FLIP_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {"none": ((),), "h": ((), (3,)), "hv": ((), (3,), (2,))}
assert set(FLIP_VIEWS) == set(PREDICTION_FLIPS)


def average_over_flips(logits_of_view: Callable[[tuple[int, ...]], torch.Tensor], flips: str) -> torch.Tensor:
    """The mean of the logits of each flipped view, each mirrored back. `logits_of_view(dims)` returns the logits
    of the input mirrored along `dims` (() = the input itself)."""
    views = FLIP_VIEWS[flips]
    total = logits_of_view(views[0])
    for dims in views[1:]:
        total = total + logits_of_view(dims).flip(dims)
    return total / len(views) if len(views) > 1 else total


class FlipAveraged(nn.Module):
    """A segmenter that predicts by `average_over_flips`: what the app runs and what is exported."""

    def __init__(self, network: nn.Module, flips: str) -> None:
        super().__init__()
        self.network, self.flips = network, flips
        self.in_channels, self.size_multiple = network.in_channels, network.size_multiple

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return average_over_flips(lambda dims: self.network(pixels.flip(dims) if dims else pixels), self.flips)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      ranks: Ranks | None = None) -> torch.Tensor:
    """BCE + soft Dice over the valid (non-ignored) pixels of a batch; target uint8 N×H×W. `ranks`: each
    rank holds a part of the global batch, and the sums run over the whole batch (as in one process)."""
    logits = logits[:, 0].float()
    valid = target != IGNORE
    truth = (target == 1).float()
    probability = torch.sigmoid(logits) * valid
    truth = truth * valid
    bce = F.binary_cross_entropy_with_logits(logits[valid], truth[valid], reduction="sum")
    sums = torch.stack([bce, valid.sum().float(), (probability * truth).sum(), probability.sum(), truth.sum()])
    bce_sum, valid_pixels, intersection, predicted, true = (ranks or Ranks.single()).sum_with_gradient(sums)
    if not valid_pixels.detach().item():
        return logits.sum() * 0.0
    dice = 1.0 - (2.0 * intersection + 1.0) / (predicted + true + 1.0)
    return bce_sum / valid_pixels + dice_weight * dice


# ---------------------------------------------------------------------------------------------
# Data: defect-centred random crops, flips and light photometric jitter (torchvision v2)


class CropSampler:
    """Draws training batches from in-memory samples; seeded, deterministic for a given seed. Every random
    choice comes from two seeded numpy generators (the crops; their flips and jitter), none from torch's,
    so the ranks of a distributed run draw the same global batch and each cuts only its part."""

    JITTER = 0.2  # brightness and contrast factors drawn from [1 - JITTER, 1 + JITTER]

    def __init__(self, samples: Sequence[SegmentationSample], config: SegmenterConfig, in_channels: int) -> None:
        self.samples = list(samples)
        self.config = config
        self.in_channels = in_channels
        self.rng = np.random.default_rng(config.seed)
        # A stream of its own: drawn from the crops' stream, the augmentations halved the tiny demo's test IoU
        # (0.08 against 0.17 over 8 seeds; unexplained), and the crops stay those of earlier versions.
        self.augment_rng = np.random.default_rng([config.seed, 1])
        self.defect_pixels = [np.flatnonzero(s.target.ravel() == 1) for s in self.samples]
        self.defect_indices = [i for i, pixels in enumerate(self.defect_pixels) if len(pixels)]

    def _draw(self) -> tuple[int, int, int, tuple[bool, bool], tuple[float, float, bool]]:
        """The next crop's (image index, top, left, (flip left-right, flip top-bottom), (brightness, contrast,
        brightness first)): every random draw."""
        centred = bool(self.defect_indices) and self.rng.random() < self.config.defect_crop_fraction
        index = int(self.rng.choice(self.defect_indices)) if centred else int(self.rng.integers(len(self.samples)))
        size = self.config.crop_size
        height, width = self.samples[index].target.shape
        top, left = draw_crop_origin(self.rng, self.defect_pixels[index] if centred else None, (height, width), size)
        top = min(max(top, 0), max(0, height - size))
        left = min(max(left, 0), max(0, width - size))
        augment = self.augment_rng
        flips = (bool(augment.random() < 0.5), bool(augment.random() < 0.5))
        brightness, contrast = (float(f) for f in augment.uniform(1 - self.JITTER, 1 + self.JITTER, 2))
        return index, top, left, flips, (brightness, contrast, bool(augment.random() < 0.5))

    def _cut(self, index: int, top: int, left: int, flips: tuple[bool, bool],
             jitter: tuple[float, float, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import functional as TF

        sample = self.samples[index]
        size = self.config.crop_size
        image = match_channels(sample.image[top : top + size, left : left + size].astype(np.float32), self.in_channels)
        target = sample.target[top : top + size, left : left + size]
        pad_y, pad_x = size - image.shape[0], size - image.shape[1]
        if pad_y or pad_x:  # image smaller than the crop: pad, and do not train on the padding
            image = np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="symmetric")
            target = np.pad(target, ((0, pad_y), (0, pad_x)), constant_values=IGNORE)
        image_t = torch.from_numpy(image.transpose(2, 0, 1).copy())
        target_t = torch.from_numpy(target.astype(np.uint8))
        for axis, flip in zip((-1, -2), flips):
            if flip:
                image_t, target_t = image_t.flip(axis), target_t.flip(axis)
        if image_t.shape[0] in (1, 3):  # light photometric jitter, in a random order
            brightness, contrast, brightness_first = jitter
            steps = [lambda x: TF.adjust_brightness(x, brightness), lambda x: TF.adjust_contrast(x, contrast)]
            for step in steps if brightness_first else steps[::-1]:
                image_t = step(image_t)
        return image_t.clamp(0, 1), target_t

    def batch(self, part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; `part` (rank, world size): only that rank's crops (as EncodedCropSampler.batch)."""
        rank, world_size = part
        images, targets = [], []
        for position in range(self.config.batch_size):
            drawn = self._draw()
            if position % world_size != rank:
                continue
            image, target = self._cut(*drawn)
            images.append(image)
            targets.append(target)
        return torch.stack(images), torch.stack(targets)


# ---------------------------------------------------------------------------------------------
# Inference


@dataclass
class LoadedSegmenter:
    model: SegmenterNet
    meta: dict[str, Any]
    device: torch.device
    checkpoint_sha256: str = ""
    gate_classifier: Any = None  # the LoadedClassifier that decides which images get a mask (config.classifier_gate)

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    @property
    def image_gate(self) -> dict[str, Any] | None:
        return self.meta.get("image_gate")

    @property
    def prediction_flips(self) -> str:
        return str((self.meta.get("config") or {}).get("prediction_flips", "none"))  # checkpoints before it: one view

    @torch.no_grad()
    def probability(self, image: np.ndarray) -> np.ndarray:
        """float H×W×C image in [0, 1] -> H×W defect probability at the image's own resolution; a large
        image by overlapping tiles, as the exported model's `predict` does (ml/tiling.py, issue 15)."""
        from defect_studio.ml.tiling import Tiling, tiled_map

        tiling = Tiling.from_dict(self.meta.get("tiling"))
        return tiled_map(image, lambda pixels: predict_probability(self.model, pixels, self.device, self.prediction_flips),
                         tiling)

    def gate_probability(self, image: np.ndarray) -> float | None:
        """The gate classifier's defect probability of the image (None: this segmenter has no classifier gate)."""
        return None if self.gate_classifier is None else float(self.gate_classifier.predict_scores([image])[0])

    @property
    def gate_threshold(self) -> float:
        """The classifier probability above which an image gets a mask (recorded when the segmenter trained)."""
        return float((self.meta.get("classifier_gate") or {}).get("threshold", CLASSIFIER_GATE_MAX_THRESHOLD))

    def classifier_says_defect(self, image: np.ndarray) -> bool | None:
        """The gate classifier's decision: its probability above `gate_threshold` (None: no classifier gate)."""
        probability = self.gate_probability(image)
        return None if probability is None else probability > self.gate_threshold

    def mask(self, image: np.ndarray) -> np.ndarray:
        return decide_mask(self.probability(image), self.threshold, self.image_gate, self.classifier_says_defect(image))


@torch.no_grad()
def predict_probability(model: SegmenterNet, image: np.ndarray, device: torch.device | None = None,
                        flips: str = "none") -> np.ndarray:
    """H×W defect probability of the whole image, averaged over the flipped views `flips` (FLIP_VIEWS)."""
    device = device or next(model.parameters()).device
    batch, size = to_network_input(image, model.in_channels, model.size_multiple)
    return _probability_in_eval(model, lambda: FlipAveraged(model, flips)(torch.from_numpy(batch).to(device)), size)


def _probability_in_eval(model: nn.Module, logits_of: Callable[[], torch.Tensor], size: tuple[int, int]) -> np.ndarray:
    """sigmoid(logits_of()) cropped to `size`, computed in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        logits = logits_of()
    finally:
        model.train(was_training)
    return torch.sigmoid(logits[0, 0, : size[0], : size[1]].float()).cpu().numpy()


GATE_CLASSIFIER_KEY = "gate_classifier"  # the checkpoint's copy of the classifier that gates it
# The gate keeps an image whose classifier probability is above the classifier's own (F1) threshold or this,
# whichever is lower: an inspector must not lose defect images to the gate. On MT seed 1 the F1 threshold (0.82)
# silenced defect images (test IoU 0.294 against 0.316 at 0.2); 0.05-0.2 were within 0.003 on seeds 0-2.
CLASSIFIER_GATE_MAX_THRESHOLD = 0.2


def save_segmenter(path: Path, model: SegmenterNet, meta: dict[str, Any], gate_classifier: dict[str, Any] | None = None) -> str:
    """Atomically write {format, state_dict, meta} (and the gate classifier's checkpoint payload); returns the
    file's sha256."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta}
    if gate_classifier is not None:
        payload[GATE_CLASSIFIER_KEY] = gate_classifier
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_segmenter(path: str | Path, device: str | torch.device = "auto") -> LoadedSegmenter:
    """Load a checkpoint written by save_segmenter (weights only); a wrong file is a ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no segmenter checkpoint there; train a segmenter first (defect-studio refine).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(f"{path}: not a readable segmenter checkpoint ({str(error)[:200]}).") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a defect-studio segmenter checkpoint.")
    meta = checkpoint["meta"]
    meta["config"].setdefault("prediction_flips", "none")  # trained and validated on one view
    model = build_segmenter(int(meta["in_channels"]), SegmenterConfig.from_dict(meta["config"]))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ModelError(f"{path}: the weights do not fit the recorded architecture ({str(error)[:200]}).") from error
    torch_device = device if isinstance(device, torch.device) else select_device(device)
    model.to(torch_device).eval()
    gate = None
    if GATE_CLASSIFIER_KEY in checkpoint:
        from defect_studio.ml.classifier import classifier_from_payload

        recorded = meta.get("classifier_gate") or {}
        gate = classifier_from_payload(checkpoint[GATE_CLASSIFIER_KEY], Path(str(recorded.get("file", path.name))),
                                       str(recorded.get("sha256", "")), torch_device)
    return LoadedSegmenter(model, meta, torch_device, hashlib.sha256(path.read_bytes()).hexdigest(), gate)


def gate_classifier_payload(config: SegmenterConfig, classifier_path: str | Path | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the classifier's checkpoint payload to keep in the segmenter's, its summary for the meta), or (None, None)
    when the config wants no classifier gate or there is no classifier. A classifier trained on tiles gates as it
    scores: an image its tiling cuts is as defect-like as its most defect-like tile."""
    if not config.classifier_gate or classifier_path is None or not Path(classifier_path).is_file():
        return None, None
    from defect_studio.ml.classifier import load_classifier

    data = Path(classifier_path).read_bytes()
    classifier = load_classifier(classifier_path, "cpu")
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    summary = {"file": Path(classifier_path).name, "sha256": classifier.checkpoint_sha256,
               "threshold": min(CLASSIFIER_GATE_MAX_THRESHOLD, float(classifier.decision_threshold)),
               "tiling": None if classifier.tiling is None else classifier.tiling.to_dict()}
    return payload, summary


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class SegmenterTrainingResult:
    checkpoint_path: Path
    checkpoint_sha256: str
    threshold: float
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def _validation_split(samples: Sequence[SegmentationSample], config: SegmenterConfig) -> tuple[list[int], list[int]]:
    """Seeded split stratified by 'has defect pixels'; at least one image of each kind held out when possible."""
    rng = random.Random(config.seed)
    train, held = [], []
    for has_defect in (True, False):
        indices = [i for i, s in enumerate(samples) if bool((s.target == 1).any()) == has_defect]
        rng.shuffle(indices)
        count = int(round(len(indices) * config.validation_fraction))
        if len(indices) >= 4:
            count = max(count, 1)
        count = min(count, config.max_validation_images // 2 if has_defect else config.max_validation_images // 2)
        held += indices[:count]
        train += indices[count:]
    return sorted(train), sorted(held)


def input_statistics(samples: Sequence[SegmentationSample], in_channels: int) -> tuple[list[float], list[float]]:
    means, squares, count = np.zeros(in_channels), np.zeros(in_channels), 0
    for sample in samples[:: max(1, len(samples) // 200)]:
        pixels = match_channels(sample.image.astype(np.float32), in_channels).reshape(-1, in_channels)
        means += pixels.sum(0)
        squares += (pixels.astype(np.float64) ** 2).sum(0)
        count += len(pixels)
    mean = means / max(1, count)
    std = np.sqrt(np.maximum(squares / max(1, count) - mean**2, 1e-6))
    return mean.tolist(), np.maximum(std, 0.02).tolist()


@dataclass
class SegmenterTrainingPlan:
    """What rank 0 of a distributed command sends the other ranks for each segmenter it trains: they never
    open the project; the weights rank 0 starts from reach them through the process group."""

    samples: list[SegmentationSample]
    config: SegmenterConfig
    checkpoint_path: Path
    extra_meta: dict[str, Any] | None


def train_segmenter_job(
    samples: Sequence[SegmentationSample],
    config: SegmenterConfig,
    checkpoint_path: str | Path,
    cancel: CancelToken,
    extra_meta: dict[str, Any] | None = None,
    start_from: str | Path | None = None,
    classifier_path: str | Path | None = None,
    ranks: Ranks | None = None,
) -> Generator[Progress, None, SegmenterTrainingResult]:
    """Train on `samples`; the checkpoint at `checkpoint_path` is replaced (atomically) only by the best epoch.

    `start_from`: a segmenter checkpoint whose weights (and input statistics) initialise the
    network when its architecture matches; otherwise training starts from random init.
    `classifier_path`: the defect classifier whose encoder starts the segmenter's when the config's
    `encoder_weights` is "classifier".

    The best epoch is the one with the highest defect IoU on a held-out part of the samples (at the
    threshold that is best there; that threshold is stored in the checkpoint).

    `ranks` (a torchrun process group, see `distributed.py`): rank 0 runs this job and sends the plan to the
    other ranks, which run `follow_segmenter_training`. Every rank draws the same global batches of
    `config.batch_size` crops and trains on its part of each; the loss is the global batch's; each rank
    validates its share of the held-out images; rank 0 alone writes the checkpoint.
    """
    ranks = ranks or Ranks.single()
    if not samples:
        raise DataError("no masks to train the segmenter on (every image rejected or none reviewed).")
    if config.batch_size % ranks.world_size:
        raise DataError(f"the segmenter's batch of {config.batch_size} crops does not split evenly over "
                        f"{ranks.world_size} processes; choose a batch size that is a multiple of {ranks.world_size}.")
    if ranks.distributed:
        ranks.from_rank0(SegmenterTrainingPlan(list(samples), config, Path(checkpoint_path), extra_meta))
    with torch_threads(config.threads):
        return (yield from _train_segmenter(samples, config, Path(checkpoint_path), cancel, extra_meta, start_from,
                                            classifier_path, ranks))


def follow_segmenter_training(ranks: Ranks, cancel: CancelToken) -> Generator[Progress, None, Any]:
    """A rank other than 0 of a distributed command: trains every segmenter rank 0 announces
    (train_segmenter_job) until rank 0 says the command ended; returns what it said last (None when
    the command succeeded, else its error, which rank 0 reports)."""
    while True:
        message = ranks.from_rank0(None)
        if not isinstance(message, SegmenterTrainingPlan):
            return message
        try:
            with torch_threads(message.config.threads):
                yield from _train_segmenter(message.samples, message.config, message.checkpoint_path, cancel,
                                            message.extra_meta, None, None, ranks)
        except JobCancelled:
            continue  # every rank stopped at the same step; rank 0 says what comes next


class _TrainingStep(nn.Module):
    """What one training step calls, as a module DistributedDataParallel can wrap: the decoder on cached
    encoder features (a list of levels), or the whole network on pixels."""

    def __init__(self, model: nn.Module, from_features: bool) -> None:
        super().__init__()
        self.model = model
        self.from_features = from_features

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.model.decode(inputs) if self.from_features else self.model(inputs)


@dataclass
class _StartingNetwork:
    model: nn.Module
    in_channels: int
    encoder_from: str | None
    started_from: str | None  # the warm start's checkpoint sha256


def _starting_network(samples: Sequence[SegmentationSample], train_samples: Sequence[SegmentationSample],
                      config: SegmenterConfig, device: torch.device, start_from: str | Path | None,
                      classifier_path: str | Path | None, ranks: Ranks) -> _StartingNetwork:
    """The network training starts from, on `device`: ImageNet's or the classifier's encoder, the input
    statistics, a warm start. Rank 0 alone reads the classifier and the warm start; its weights start every rank."""
    encoder_classifier, encoder_from = _encoder_classifier(config, classifier_path) if ranks.is_writer else (None, None)
    if encoder_classifier is not None:  # the classifier's encoder sees the images as the classifier does
        in_channels = encoder_classifier.preprocessing.channels
    else:
        in_channels = 1 if all(s.image.shape[2] == 1 for s in samples) else 3
    in_channels, encoder_from = ranks.from_rank0((in_channels, encoder_from))
    model = build_segmenter(in_channels, config, imagenet_weights=ranks.is_writer)
    if encoder_classifier is not None:
        model.load_classifier_encoder(encoder_classifier.model)
    if not getattr(model, "fixed_normalisation", False):
        mean, std = input_statistics(train_samples, in_channels)
        model.input_mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        model.input_std.copy_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    started_from = ranks.from_rank0(_warm_start(model, start_from) if start_from is not None else None)
    model.to(device)
    ranks.share_model_of_rank0(model)
    return _StartingNetwork(model, in_channels, encoder_from, started_from)


EncodedViews = dict[int, dict[tuple[int, ...], EncodedSample]]  # held-out image index -> its encoded flipped views


def _training_data(
    model: nn.Module, train_samples: Sequence[SegmentationSample], validation_samples: Sequence[SegmentationSample],
    config: SegmenterConfig, in_channels: int, device: torch.device, cancel: CancelToken, ranks: Ranks,
) -> Generator[Progress, None, tuple[Any, EncodedViews | None]]:
    """(the crop sampler, this rank's held-out images encoded per flipped view or None). With a frozen encoder
    whose features fit the budget, every image is encoded once and the crops are cut from its features."""
    if not _caches_features(model, [*train_samples, *validation_samples]):
        return CropSampler(train_samples, config, in_channels), None
    # Validation images first (fewer, and the same job); each in every flipped view, as the app predicts.
    validated = ranks.shard(len(validation_samples))  # this rank's share of the held-out images
    validation_encoded: EncodedViews = {index: {} for index in validated}
    for dims in FLIP_VIEWS[config.prediction_flips]:
        view, _ = yield from encode_samples(
            model, [validation_samples[i].key for i in validated], [validation_samples[i].image for i in validated],
            [validation_samples[i].target for i in validated], device, cancel, flip=dims)
        for index, sample in zip(validated, view):
            validation_encoded[index][dims] = sample
    # The ranks draw their crops from the same global batches, so every rank needs every training image's
    # features: each encodes its shard and receives the others' from their owners.
    encoded, _ = yield from encode_samples(model, [s.key for s in train_samples], [s.image for s in train_samples],
                                           [s.target for s in train_samples], device, cancel, ranks=ranks)
    sampler = EncodedCropSampler(encoded, config.crop_size, config.batch_size, config.defect_crop_fraction,
                                 config.seed, model.size_multiple, config.flip_encoded_features)
    return sampler, validation_encoded


def _train_one_epoch(step: nn.Module, sampler: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                     config: SegmenterConfig, device: torch.device, cancel: CancelToken, ranks: Ranks) -> list[float]:
    """`config.steps_per_epoch` steps of this rank's part of each global batch; the steps' losses."""
    step.train()
    from_features = isinstance(sampler, EncodedCropSampler)
    losses = []
    for _ in range(config.steps_per_epoch):
        ranks.raise_if_cancelled(cancel)
        inputs, targets = sampler.batch((ranks.rank, ranks.world_size))
        inputs = [level.to(device) for level in inputs] if from_features else inputs.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = step(inputs)
        loss = segmentation_loss(logits, targets.to(device), config.dice_weight, ranks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the ranks' gradients are averaged here: the global batch's
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    ranks.raise_if_cancelled(cancel)
    return losses


def _train_segmenter(
    samples: Sequence[SegmentationSample],
    config: SegmenterConfig,
    checkpoint_path: Path,
    cancel: CancelToken,
    extra_meta: dict[str, Any] | None,
    start_from: str | Path | None,
    classifier_path: str | Path | None,
    ranks: Ranks,
) -> Generator[Progress, None, SegmenterTrainingResult]:
    torch.manual_seed(config.seed)
    device = select_device(config.device)
    train_indices, validation_indices = _validation_split(samples, config)
    if not train_indices:
        train_indices, validation_indices = list(range(len(samples))), []
    train_samples = [samples[i] for i in train_indices]
    validation_samples = [samples[i] for i in validation_indices]
    start = _starting_network(samples, train_samples, config, device, start_from, classifier_path, ranks)
    gate_payload, gate_summary = gate_classifier_payload(config, classifier_path) if ranks.is_writer else (None, None)
    model, in_channels, encoder_from, started_from = start.model, start.in_channels, start.encoder_from, start.started_from
    epochs = min(config.warm_start_epochs, config.epochs) if started_from else config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(  # a warm-started network needs no long warm-up
        optimizer, max_lr=config.learning_rate, total_steps=epochs * config.steps_per_epoch,
        pct_start=0.05 if started_from else 0.15,
    )
    sampler, validation_encoded = yield from _training_data(model, train_samples, validation_samples, config,
                                                            in_channels, device, cancel, ranks)
    step = data_parallel(_TrainingStep(model, from_features=validation_encoded is not None), device, ranks)
    clock = EtaClock(epochs)
    started = time.monotonic()
    best_score, best_threshold, best_epoch = -math.inf, 0.5, -1
    best_gate: dict[str, Any] | None = None
    best_sha = ""
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        epoch_start = time.monotonic()
        losses = _train_one_epoch(step, sampler, optimizer, scheduler, config, device, cancel, ranks)
        threshold, image_gate, validation = _validate(model, validation_samples, device, validation_encoded,
                                                      config.prediction_flips, ranks=ranks)
        score = validation.get("defect_iou", float("nan"))
        if math.isnan(score):
            score = -float(np.mean(losses))
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "val_defect_iou": validation.get("defect_iou", float("nan")),
            "val_threshold": threshold,
            "epoch_s": time.monotonic() - epoch_start,
        }
        history.append(record)
        last_epoch = epoch + 1 == epochs
        # Rank 0's clock decides the time budget, so every rank stops after the same epoch.
        over_budget = ranks.from_rank0(config.time_budget_s is not None and time.monotonic() - started >= config.time_budget_s)
        if score > best_score or best_epoch < 0:
            best_score, best_threshold, best_epoch = score, threshold, epoch + 1
            best_gate = image_gate
            meta = {
                "in_channels": in_channels,
                "size_multiple": model.size_multiple,
                "config": config.to_dict(),
                "threshold": threshold,
                "image_gate": image_gate,
                "epoch": epoch + 1,
                "validation": validation,
                "trained_images": [s.key for s in train_samples],
                "validation_images": [s.key for s in validation_samples],
                "torch": str(torch.__version__),
                "started_from": started_from,
                "encoder_from": encoder_from,
                "processes": ranks.world_size,
                "classifier_gate": gate_summary,
                **(extra_meta or {}),
            }
            if ranks.is_writer:
                best_sha = save_segmenter(checkpoint_path, model, meta, gate_payload)
        yield clock.progress(
            "train segmenter",
            epoch + 1,
            f"epoch {epoch + 1}/{epochs}",
            {"loss": record["loss"], "val_defect_iou": record["val_defect_iou"]},
            kind=ProgressKind.EPOCH,
        )
        if over_budget and not last_epoch:
            break
    metrics = {
        "best_epoch": best_epoch,
        "best_val_defect_iou": best_score,
        "threshold": best_threshold,
        "image_gate": best_gate,
        "epochs_run": len(history),
        "train_s": time.monotonic() - started,
        "seconds_per_epoch": float(np.mean([h["epoch_s"] for h in history])),
        "train_images": len(train_samples),
        "validation_images": len(validation_samples),
        "processes": ranks.world_size,
        "peak_memory_mb": peak_memory_mb(device),
        "started_from": started_from,
        "encoder_from": encoder_from,
    }
    return SegmenterTrainingResult(checkpoint_path, best_sha, best_threshold, metrics, history)


def _warm_start(model: SegmenterNet, checkpoint_path: str | Path) -> str | None:
    """Copy a compatible checkpoint's weights into `model`; its sha256, or None when it does not fit."""
    try:
        previous = load_segmenter(checkpoint_path, "cpu")
    except ModelError:
        return None
    state = previous.model.state_dict()
    own = model.state_dict()
    if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
        return None  # another architecture (the user changed the settings): start afresh
    model.load_state_dict(state)
    return previous.checkpoint_sha256


def _encoder_classifier(config: SegmenterConfig, classifier_path: str | Path | None) -> tuple[Any, str | None]:
    """(the loaded classifier whose encoder starts the segmenter's, or None; where the encoder starts from).

    With encoder_weights "classifier", a classifier of another backbone (the compact network) or input
    scaling cannot lend its encoder: the segmenter then starts from ImageNet, and says so."""
    if config.architecture != "efficientnet-lite0-unet":
        return None, None
    if config.encoder_weights != "classifier":
        return None, "imagenet"
    if classifier_path is None:
        return None, "imagenet (no classifier to lend its encoder)"
    from defect_studio.ml.classifier import load_classifier

    classifier = load_classifier(classifier_path, "cpu")
    if classifier.config.arch != "efficientnet-lite0":
        return None, f"imagenet (the classifier is {classifier.config.arch}, it has no EfficientNet encoder to lend)"
    if classifier.preprocessing.normalisation != "symmetric":  # the segmenter scales its input (x - 0.5) / 0.5
        return None, (f"imagenet (the classifier scales its input by {classifier.preprocessing.normalisation!r}, "
                      "not as the ImageNet weights do)")
    return classifier, f"classifier {classifier.checkpoint_sha256}"


def _caches_features(model: nn.Module, samples: Sequence[SegmentationSample]) -> bool:
    """Whether training encodes every image once (a frozen encoder, and features that fit the budget)."""
    if not getattr(model, "encoder_frozen", False):
        return False
    shapes = [s.target.shape for s in samples]
    return feature_bytes(shapes, EfficientNetUnet.LEVEL_CHANNELS, EfficientNetUnet.LEVEL_STRIDES) <= FEATURE_BUDGET_BYTES


@torch.no_grad()
def _probability_from_features(model: nn.Module, views: dict[tuple[int, ...], EncodedSample], flips: str,
                               size: tuple[int, int], device: torch.device) -> np.ndarray:
    """predict_probability from cached features: `views` holds the image's encoded flipped views (by dims)."""
    def logits_of_view(dims: tuple[int, ...]) -> torch.Tensor:
        levels = views[dims].levels
        if is_tiled(tuple(views[dims].target.shape)):
            return decode_by_tiles(model, levels, device)
        return model.decode([level[None].float().to(device) for level in levels])

    return _probability_in_eval(model, lambda: average_over_flips(logits_of_view, flips), size)


VALIDATION_THRESHOLDS = np.linspace(0.05, 0.95, 19)


# An inspector must not lose defect images to the gate: it may silence at most 5 % of the held-out images
# whose mask has defect pixels (chosen for IoU alone, a gate on ground-truth masks silenced 77 % of MT's
# defect test images, whose small defects weigh little in a pooled IoU).
GATE_KEEPS_DEFECT_IMAGES = 0.95


def _validate(
    model: SegmenterNet, samples: Sequence[SegmentationSample], device: torch.device,
    encoded: EncodedViews | None = None, flips: str = "none",
    keeps_defect_images: float = GATE_KEEPS_DEFECT_IMAGES, ranks: Ranks | None = None,
) -> tuple[float, dict[str, Any] | None, dict[str, float]]:
    """(best threshold, image gate, metrics at them) on whole validation images, ignored pixels left out, each
    predicted as the app will: averaged over the flipped views `flips`; `encoded`: their cached features by view
    (by index in `samples`). `ranks`: each rank predicts its share of the images, every rank gets the result.

    The pixel threshold and the image gate are chosen together for the pooled defect IoU, among the gates
    that keep at least `keeps_defect_images` of the held-out defect images: the gate empties the mask of an
    image whose score (image_score) is under it, so a segmenter that leaves faint blobs on good images
    stops flagging them where the held-out images say that pays."""
    if not samples:
        return 0.5, None, {}
    ranks = ranks or Ranks.single()
    mine = []
    for index in ranks.shard(len(samples)):
        sample = samples[index]
        if encoded is None:
            probability = predict_probability(model, sample.image, device, flips)
        else:
            probability = _probability_from_features(model, encoded[index], flips, sample.target.shape, device)
        valid = sample.target != IGNORE
        sweep = ThresholdSweep(thresholds=VALIDATION_THRESHOLDS)
        sweep.add(sample.target[valid] == 1, probability[valid])
        mine.append((index, sweep, image_score(probability)))
    gathered = sorted((row for rows in ranks.gather_objects(mine) for row in rows), key=lambda row: row[0])
    sweeps, scores = [sweep for _, sweep, _ in gathered], [score for _, _, score in gathered]
    true_positive = np.array([[t.true_positive for t in s.tallies] for s in sweeps], dtype=np.float64)
    false_positive = np.array([[t.false_positive for t in s.tallies] for s in sweeps], dtype=np.float64)
    positives = true_positive[:, 0] + np.array([s.tallies[0].false_negative for s in sweeps], dtype=np.float64)
    if positives.sum() == 0:  # no defect pixels held out: nothing to tune
        return 0.5, None, _pooled(sweeps, np.ones(len(sweeps), bool), 0.5).as_dict()
    best = (-1.0, 0.5, 0.0)
    has_defect = positives > 0
    for gate in sorted({0.0, *scores}):  # gate 0 keeps every image; ties keep the weaker gate
        kept = np.array(scores) >= gate
        if (kept & has_defect).sum() < keeps_defect_images * has_defect.sum() - 1e-9:
            break  # higher gates silence even more defect images
        iou = true_positive[kept].sum(0) / np.maximum(false_positive[kept].sum(0) + positives.sum(), 1.0)
        index = int(np.argmax(iou))
        if iou[index] > best[0] + 1e-9:
            best = (float(iou[index]), float(VALIDATION_THRESHOLDS[index]), gate)
    _, threshold, gate = best
    kept = np.array(scores) >= gate
    image_gate = {"top_k": IMAGE_SCORE_TOP_K, "min_score": gate} if gate > 0.0 else None
    metrics = _pooled(sweeps, kept, threshold).as_dict()
    metrics["gated_images"] = int((~kept).sum())
    return threshold, image_gate, metrics


def _pooled(sweeps: Sequence[ThresholdSweep], kept: np.ndarray, threshold: float) -> SegmentationTally:
    """The validation images' tally at `threshold`, the images not `kept` predicted empty."""
    total = SegmentationTally()
    for sweep, keep in zip(sweeps, kept):
        tally = sweep.at(threshold)
        if not keep:  # an empty mask: every defect pixel missed, every background pixel right
            tally = SegmentationTally(0, 0, tally.true_positive + tally.false_negative,
                                      tally.true_negative + tally.false_positive, tally.images)
        total = total.merge(tally)
    return total
