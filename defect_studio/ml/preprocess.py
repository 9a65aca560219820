"""Turning an image of any size, depth and colour into the network input, and mapping back exactly.

Images are letterboxed: scaled by one factor (no aspect squashing, so a round blowhole stays round),
centred on a square canvas and padded. `Geometry` records how one image was placed so that a map
computed at the network input (a CAM, a segmentation) can be put back onto the original pixels.

Pixel-centre convention (the one OpenCV's resize uses): input coordinate = (original + 0.5) · s − 0.5
+ offset, per axis, with s = resized / original size. The inverse is exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

from defect_studio.errors import BadImageError, ModelError

NORMALISATIONS = ("per-image-robust", "per-image-meanstd", "symmetric", "none")


@dataclass(frozen=True)
class Geometry:
    """How one original image maps into the network input tensor."""

    original_size: tuple[int, int]  # (height, width) of the original image
    input_size: tuple[int, int]  # (height, width) of the network input tensor
    resized_size: tuple[int, int]  # (height, width) of the image content inside the input
    offset: tuple[int, int]  # (top, left) of the content inside the input; the rest is padding

    @property
    def scale(self) -> tuple[float, float]:
        """(y, x) scale factors original -> input; equal up to rounding of the resized size."""
        return (self.resized_size[0] / self.original_size[0], self.resized_size[1] / self.original_size[1])

    def original_to_input_xy(self, x: float, y: float) -> tuple[float, float]:
        scale_y, scale_x = self.scale
        return ((x + 0.5) * scale_x - 0.5 + self.offset[1], (y + 0.5) * scale_y - 0.5 + self.offset[0])

    def input_to_original_xy(self, x: float, y: float) -> tuple[float, float]:
        scale_y, scale_x = self.scale
        return ((x - self.offset[1] + 0.5) / scale_x - 0.5, (y - self.offset[0] + 0.5) / scale_y - 0.5)

    def content_slice(self) -> tuple[slice, slice]:
        """Index of the image content (not the padding) in an input-sized array."""
        top, left = self.offset
        return slice(top, top + self.resized_size[0]), slice(left, left + self.resized_size[1])

    def valid_mask(self) -> np.ndarray:
        """Bool input-sized mask, True on image content, False on padding."""
        mask = np.zeros(self.input_size, dtype=bool)
        mask[self.content_slice()] = True
        return mask

    def to_original(self, map_at_input: np.ndarray) -> np.ndarray:
        """An H_in×W_in float map -> original H×W: crop the padding, resize bilinearly.

        A coarser map of the same aspect (a stage-4 activation, say) is first upsampled bilinearly
        to the input size, so every caller goes through one mapping.
        """
        values = np.asarray(map_at_input, dtype=np.float32)
        if values.ndim != 2:
            raise ValueError(f"to_original expects a 2-D map, got shape {values.shape}")
        if values.shape != self.input_size:
            values = cv2.resize(values, (self.input_size[1], self.input_size[0]), interpolation=cv2.INTER_LINEAR)
        content = values[self.content_slice()]
        height, width = self.original_size
        if content.shape == (height, width):
            return np.ascontiguousarray(content)
        return cv2.resize(content, (width, height), interpolation=cv2.INTER_LINEAR)

    def to_input(self, map_at_original: np.ndarray, pad_value: float = 0.0, nearest: bool = False) -> np.ndarray:
        """The forward mapping of an original-sized map (a mask, say) into the input frame."""
        values = np.asarray(map_at_original, dtype=np.float32)
        out = np.full(self.input_size, pad_value, dtype=np.float32)
        interpolation = cv2.INTER_NEAREST if nearest else _resize_interpolation(self.original_size, self.resized_size)
        resized = cv2.resize(values, (self.resized_size[1], self.resized_size[0]), interpolation=interpolation)
        out[self.content_slice()] = resized
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Geometry":
        return cls(**{k: tuple(int(x) for x in data[k]) for k in ("original_size", "input_size", "resized_size", "offset")})


def _resize_interpolation(source: tuple[int, int], target: tuple[int, int]) -> int:
    # Area averaging when shrinking keeps the energy of a tiny defect; bilinear when enlarging.
    shrinking = target[0] < source[0] or target[1] < source[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def letterbox_geometry(original_size: tuple[int, int], input_size: int, allow_upscale: bool = True) -> Geometry:
    height, width = original_size
    scale = min(input_size / height, input_size / width)
    if not allow_upscale:
        scale = min(scale, 1.0)
    resized = (max(1, min(input_size, int(round(height * scale)))), max(1, min(input_size, int(round(width * scale)))))
    offset = ((input_size - resized[0]) // 2, (input_size - resized[1]) // 2)
    return Geometry((int(height), int(width)), (input_size, input_size), resized, offset)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise BadImageError(f"expected an H×W×C image with 1 or 3 channels, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == channels:
        return image
    if channels == 1:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.repeat(image, 3, axis=2)


def normalise_image(image: np.ndarray, method: str) -> np.ndarray:
    """Per-image normalisation of an H×W×C float image (statistics over all channels together)."""
    if method == "none":
        return image.astype(np.float32)
    if method == "symmetric":  # (x - 0.5) / 0.5: the input scale of the TF-ported ImageNet weights
        return (image * 2.0 - 1.0).astype(np.float32)
    if method == "per-image-meanstd":
        centre, spread = float(image.mean()), float(image.std())
    elif method == "per-image-robust":
        # median and inter-percentile range: a bright defect or a dark border does not set the scale
        low, centre, high = np.percentile(image, (2.0, 50.0, 98.0))
        spread = float(high - low) / 2.0
        if spread < 1e-3:
            spread = float(image.std())
    else:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {NORMALISATIONS}")
    return ((image - centre) / max(spread, 1e-3)).astype(np.float32)


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a float [0, 1] image into the network input; stored in each checkpoint."""

    input_size: int = 320
    channels: int = 1
    normalisation: str = "per-image-robust"
    allow_upscale: bool = True
    pad_value: float = 0.0  # in normalised units: 0 is the image's own centre value
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; expected one of {NORMALISATIONS}")
        if not 16 <= self.input_size <= 4096:
            raise ValueError(f"input_size must be within 16..4096, got {self.input_size}")

    def geometry(self, original_size: tuple[int, int]) -> Geometry:
        return letterbox_geometry(original_size, self.input_size, self.allow_upscale)

    def prepare_array(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """float H×W×C [0, 1] -> C×S×S float32 array (normalised, letterboxed) and its geometry."""
        image = _to_channels(np.asarray(image, dtype=np.float32), self.channels)
        geometry = self.geometry((image.shape[0], image.shape[1]))
        interpolation = _resize_interpolation(geometry.original_size, geometry.resized_size)
        resized = cv2.resize(image, (geometry.resized_size[1], geometry.resized_size[0]), interpolation=interpolation)
        if resized.ndim == 2:
            resized = resized[:, :, None]
        normalised = normalise_image(resized, self.normalisation)
        canvas = np.full((self.channels, self.input_size, self.input_size), self.pad_value, dtype=np.float32)
        rows, cols = geometry.content_slice()
        canvas[:, rows, cols] = normalised.transpose(2, 0, 1)
        return canvas, geometry

    def prepare(self, image: np.ndarray) -> tuple["torch.Tensor", Geometry]:
        import torch  # here, so that `predict` letterboxes for the exported classifier gate without torch

        array, geometry = self.prepare_array(image)
        return torch.from_numpy(array), geometry

    def prepare_batch(self, images: list[np.ndarray]) -> tuple["torch.Tensor", list[Geometry]]:
        import torch

        prepared = [self.prepare_array(image) for image in images]
        if not prepared:
            return torch.zeros((0, self.channels, self.input_size, self.input_size)), []
        return torch.from_numpy(np.stack([p[0] for p in prepared])), [p[1] for p in prepared]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "channels": self.channels,
            "normalisation": self.normalisation,
            "allow_upscale": self.allow_upscale,
            "pad_value": self.pad_value,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        try:
            return cls(
                input_size=int(data["input_size"]),
                channels=int(data["channels"]),
                normalisation=str(data["normalisation"]),
                allow_upscale=bool(data.get("allow_upscale", True)),
                pad_value=float(data.get("pad_value", 0.0)),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"the checkpoint's preprocessing record is invalid ({error}).") from error
