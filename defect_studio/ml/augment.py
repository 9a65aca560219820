"""Training augmentation for surface images (torchvision.transforms.v2), applied to prepared tensors.

Surfaces have no "up": flips and 90° rotations are free. A small affine jitter, contrast/brightness
changes and sensor noise make the classifier robust to placement and lighting. The ops run on the
normalised, letterboxed C×S×S tensor, so the padding stays near the neutral value 0.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class RandomRotate90(torch.nn.Module):
    """Rotate by a random multiple of 90° (square inputs keep their shape)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(0, 4, (1,)).item())
        return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


class RandomContrastBrightness(torch.nn.Module):
    """x·c + b in normalised units (per-image normalisation makes these relative changes)."""

    def __init__(self, contrast: tuple[float, float] = (0.8, 1.25), brightness: float = 0.2) -> None:
        super().__init__()
        self.contrast = contrast
        self.brightness = brightness

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        low, high = self.contrast
        factor = low + (high - low) * float(torch.rand(1).item())
        shift = (2.0 * float(torch.rand(1).item()) - 1.0) * self.brightness
        return image * factor + shift


class RandomGaussianNoise(torch.nn.Module):
    def __init__(self, max_sigma: float = 0.08) -> None:
        super().__init__()
        self.max_sigma = max_sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sigma = self.max_sigma * float(torch.rand(1).item())
        return image + sigma * torch.randn_like(image)


def surface_augmentation(strength: float = 1.0, rotate90: bool = False) -> v2.Compose:
    """The default training augmentation; strength 0 disables the photometric and affine parts.

    90° turns are optional: on surfaces with a grain (brushed, streaked) they show the network
    orientations that never occur, which costs training time.
    """
    ops: list[torch.nn.Module] = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if rotate90:
        ops.append(RandomRotate90())
    if strength > 0:
        ops += [
            v2.RandomApply(
                [v2.RandomAffine(degrees=8 * strength, translate=(0.04 * strength, 0.04 * strength),
                                 scale=(1 - 0.08 * strength, 1 + 0.08 * strength),
                                 interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)],
                p=0.4,
            ),
            v2.RandomApply([RandomContrastBrightness((1 - 0.2 * strength, 1 + 0.25 * strength), 0.2 * strength)], p=0.8),
            v2.RandomApply([RandomGaussianNoise(0.08 * strength)], p=0.5),
        ]
    return v2.Compose(ops)


def augment_batch(batch: torch.Tensor, transform: v2.Compose, group: int = 4) -> torch.Tensor:
    """Apply `transform` to a B×C×S×S batch with independent random parameters per group of `group`
    images (v2 transforms draw one set of parameters per call; per-image calls cost as much as the
    network's own step on a CPU, per-group calls a quarter of that)."""
    return torch.cat([transform(batch[start : start + group]) for start in range(0, len(batch), group)])
