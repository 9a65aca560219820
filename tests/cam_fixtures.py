"""Stand-in classifiers for the CAM tests: the classifier interface (`stages`, logit per image, nn.ReLU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.models.resnet import BasicBlock
from torch import nn

from defect_studio.ml.cams import capture_stage_outputs, compute_cams, eval_mode
from defect_studio.ml.good_prior import GoodImagePrior, build_good_prior
from defect_studio.ml.preprocess import Preprocessing


class ResNetStandIn(nn.Module):
    """A narrow ResNet-18 built from torchvision's BasicBlock (which reuses one in-place ReLU twice):
    stem + four stages (strides 4, 8, 16, 32) + one defect logit."""

    def __init__(self, channels: int = 1, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        in_width = width
        for index in range(4):
            out_width = width * 2**index
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or in_width != out_width:
                downsample = nn.Sequential(nn.Conv2d(in_width, out_width, 1, stride, bias=False), nn.BatchNorm2d(out_width))
            stages.append(nn.Sequential(BasicBlock(in_width, out_width, stride, downsample), BasicBlock(out_width, out_width)))
            in_width = out_width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_width, 1)
        # non-trivial batch-norm statistics, so eval mode matters
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.pool(x).flatten(1))[:, 0]


class TinyStandIn(nn.Module):
    """A very small four-stage network (strides 2, 4, 8, 16) for many fast calls."""

    def __init__(self, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.relu = nn.ReLU(inplace=True)
        channels = [1, width, width, width, width]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[i], channels[i + 1], 3, 2, 1), nn.BatchNorm2d(channels[i + 1]), self.relu)
            for i in range(4)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))[:, 0]


@dataclass
class StandInClassifier:
    """The parts of LoadedClassifier that the CAM code uses."""

    model: nn.Module
    preprocessing: Preprocessing
    checkpoint_sha256: str = "0" * 64
    device: torch.device = torch.device("cpu")
    good_prior: GoodImagePrior | None = None
    affinity: Any = None  # an AffinityModel (with_affinity)

    def with_good_prior(self, good_images: list[np.ndarray], stage: int = 3, bank_size: int = 512) -> "StandInClassifier":
        """A memory bank of the stage's features of `good_images`, as training builds it."""
        batch, _ = self.preprocessing.prepare_batch(good_images)
        with eval_mode(self.model), torch.no_grad(), capture_stage_outputs(self.model, [stage - 1]) as captured:
            self.model(batch)
            activation = captured[stage - 1]
        self.good_prior = build_good_prior([activation], stage, bank_size)
        return self

    def with_affinity(self, defect_images: list[np.ndarray], good_images: list[np.ndarray], epochs: int = 2) -> "StandInClassifier":
        """An affinity head trained as classifier training trains it: on this classifier's FGBP maps."""
        from defect_studio.jobs import CancelToken, run_job
        from defect_studio.ml import affinity

        settings = affinity.AffinitySettings(epochs=epochs, width=8, embedding=16)
        features, geometries = affinity.stage_features(self, [*defect_images, *good_images])
        cams = compute_cams(self, defect_images, affinity.BASE_METHOD)
        labels = [affinity.grid_labels(cam, geometry, affinity.grid_shape(f), settings.high, settings.low)
                  for cam, geometry, f in zip(cams, geometries, features)]
        labels += [affinity.background_labels(g, affinity.grid_shape(f))
                   for g, f in zip(geometries[len(defect_images):], features[len(defect_images):])]
        self.affinity = run_job(affinity.train_head(features, labels, settings, CancelToken()))
        return self


class WithClassAxis(nn.Module):
    """(B,) logits -> (B, 1), the shape pytorch-grad-cam's ClassifierOutputTarget expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, None]


class BlobStandIn(nn.Module):
    """A hand-built detector of bright blobs on a dim texture, so the right CAM answer is known.

    Two channels run through four stride-2 averaging stages: channel 0 only passes what is brighter
    than any texture (the defect); channel 1 passes the texture itself everywhere, so shallow stages
    respond to texture while the deep stage localises the blob. The logit sums both channels' means.
    """

    def __init__(self) -> None:
        super().__init__()
        average = torch.full((3, 3), 1.0 / 9.0)
        stages = []
        for index in range(4):
            conv = nn.Conv2d(1 if index == 0 else 2, 2, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.zero_()
                if index == 0:
                    conv.weight[0, 0] = average
                    conv.weight[1, 0] = average
                    conv.bias.copy_(torch.tensor([-0.25, 0.0]))
                else:
                    conv.weight[0, 0] = average
                    conv.weight[1, 1] = average
                    conv.bias.zero_()
            stages.append(nn.Sequential(conv, nn.ReLU(inplace=True)))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3)).sum(dim=1) * 10.0


def blob_image(
    shape: tuple[int, int], blobs: list[tuple[int, int, int, float]], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A dim random texture in [0, 0.2] with bright discs (row, col, radius, brightness added); (image, defect mask)."""

    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32) * 0.2
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    defect = np.zeros(shape, dtype=bool)
    for row, col, radius, brightness in blobs:
        disc = (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
        image[disc] += brightness
        defect |= disc
    return np.clip(image, 0, 1)[:, :, None], defect
