"""Training a segmenter whose encoder is frozen: every image is encoded once, crops are cut from its features.

With a frozen encoder (`EfficientNetUnet.encoder_frozen`) the encoder's output for an image never
changes during training, so computing it for every random crop of every step repeats the most
expensive half of the network. Here each training image is encoded once, whole (padded to the
network's stride, as at inference), and kept in half precision; a training batch is a set of
crops cut from those features at positions aligned to the deepest stride, so every level's crop is
exactly the features of the same pixels. Flips may be applied to the features and the target alike
(`flip_features`): only an approximation of the features of a flipped image, as a CNN's features are not
mirror-symmetric. A flipped view of an image (`encode_samples(flip=...)`) is encoded for real.

Memory: about 1.2 MB per 320×265 gray image (five levels, 16-320 channels, fp16). Projects whose
features would exceed `FEATURE_BUDGET_BYTES` train without the cache (the encoder runs per crop).
An image above one segmenter tile of pixels is encoded (and decoded, for validation) by tiles
(`encode_by_tiles`, `decode_by_tiles`): the network's working memory is one tile's, as in prediction,
not the whole image's (the encoder's first levels alone would take gigabytes at 100 MP).
The features of the last encoder used stay in memory for the next training in this process: the
refinement rounds of one project share an encoder (the classifier's), so only round 0 pays for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Generator, Sequence

import numpy as np
import torch

from defect_studio.jobs import CancelToken, EtaClock, Progress
from defect_studio.ml.distributed import Ranks
from defect_studio.ml.tiling import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE, WHOLE_IMAGE_MAX_PIXELS
from defect_studio.predict import to_network_input

FEATURE_BUDGET_BYTES = 6 * 1024**3
IGNORE = 255  # as in segmenter.IGNORE (not imported: segmenter imports this module)


@dataclass
class EncodedSample:
    """An image's encoder outputs (C×h×w fp16 per level) and its target padded to the same frame."""

    levels: list[torch.Tensor]
    target: np.ndarray  # uint8, padded with IGNORE to the encoded frame
    defect_pixels: np.ndarray  # flat indices of target == 1


def feature_bytes(shapes: Sequence[tuple[int, int]], level_channels: Sequence[int], strides: Sequence[int]) -> int:
    """Bytes the cached fp16 features of images of these (height, width) would take."""
    total = 0
    for height, width in shapes:
        for channels, stride in zip(level_channels, strides):
            total += 2 * channels * -(-height // stride) * -(-width // stride)
    return total


@dataclass
class _FeatureCache:
    """The features of one encoder (by weights digest), by image (key and content digest)."""

    encoder: str = ""
    levels: dict[tuple[str, str], list[torch.Tensor]] = field(default_factory=dict)

    def for_encoder(self, digest: str) -> dict[tuple[str, str], list[torch.Tensor]]:
        if digest != self.encoder:  # another encoder: the old features are of no use
            self.encoder, self.levels = digest, {}
        return self.levels


_LAST_ENCODER = _FeatureCache()


def encoder_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(model.input_mean.cpu().numpy().tobytes() + model.input_std.cpu().numpy().tobytes())
    return digest.hexdigest()


def tile_cores(length: int, tile: int, multiple: int) -> list[tuple[int, int]]:
    """(start, stop) of the cores that cut an axis of `length` (a multiple of `multiple`) into parts of at
    most `tile` pixels, every bound a multiple of `multiple` so each level's cells split cleanly."""
    step = max(multiple, tile // multiple * multiple)
    return [(start, min(length, start + step)) for start in range(0, length, step)]


def _tiled(frame: tuple[int, int], multiple: int, tile: int, margin: int) -> list[tuple[slice, slice, slice, slice]]:
    """Per tile: (core rows, core columns, input rows, input columns) of a frame, each input the core and
    `margin` pixels of context on every side (within the frame), all on multiples of `multiple`."""
    margin = -(-margin // multiple) * multiple
    height, width = frame
    tiles = []
    for y0, y1 in tile_cores(height, tile, multiple):
        for x0, x1 in tile_cores(width, tile, multiple):
            tiles.append((slice(y0, y1), slice(x0, x1), slice(max(0, y0 - margin), min(height, y1 + margin)),
                          slice(max(0, x0 - margin), min(width, x1 + margin))))
    return tiles


def _scaled(part: slice, stride: int, origin: int = 0) -> slice:
    return slice((part.start - origin) // stride, (part.stop - origin) // stride)


def is_tiled(frame: tuple[int, int]) -> bool:
    """Whether an image of this padded (height, width) is encoded and decoded by tiles: above one segmenter
    tile of pixels, as prediction's "auto" tiling."""
    return frame[0] * frame[1] > WHOLE_IMAGE_MAX_PIXELS


@torch.no_grad()
def encode_by_tiles(model: torch.nn.Module, pixels: torch.Tensor, tile: int | None = None,
                    margin: int | None = None) -> list[torch.Tensor]:
    """`model.encode` of a 1×C×H×W input (H, W multiples of `model.size_multiple`) as fp16 C×h×w levels,
    tile by tile: each tile's levels are computed with `margin` pixels of context around it and only its
    core is kept. Equal to encoding whole where the receptive field stays within the margin. Default tile and
    margin: prediction's (1024, 128)."""
    multiple = model.size_multiple
    levels: list[torch.Tensor] = []
    tiles = _tiled(tuple(pixels.shape[-2:]), multiple, tile or DEFAULT_TILE_SIZE,
                   DEFAULT_OVERLAP if margin is None else margin)
    for core_y, core_x, in_y, in_x in tiles:
        outputs = model.encode(pixels[..., in_y, in_x].contiguous(memory_format=torch.channels_last))
        for index, output in enumerate(outputs):
            stride = (in_y.stop - in_y.start) // output.shape[-2]
            if len(levels) == index:
                levels.append(torch.empty((output.shape[1], pixels.shape[-2] // stride, pixels.shape[-1] // stride),
                                          dtype=torch.float16))
            levels[index][:, _scaled(core_y, stride), _scaled(core_x, stride)] = \
                output[0, :, _scaled(core_y, stride, in_y.start), _scaled(core_x, stride, in_x.start)].to(torch.float16).cpu()
    return levels


@torch.no_grad()
def decode_by_tiles(model: torch.nn.Module, levels: list[torch.Tensor], device: torch.device,
                    tile: int | None = None, margin: int | None = None) -> torch.Tensor:
    """`model.decode` of an image's C×h×w levels (the finest at stride 2) as 1×1×H×W logits, tile by tile
    with `margin` pixels of context, as `encode_by_tiles`."""
    first_stride = 2
    frame = (levels[0].shape[1] * first_stride, levels[0].shape[2] * first_stride)
    logits = torch.empty((1, 1) + frame, dtype=torch.float32)
    tiles = _tiled(frame, model.size_multiple, tile or DEFAULT_TILE_SIZE, DEFAULT_OVERLAP if margin is None else margin)
    for core_y, core_x, in_y, in_x in tiles:
        crops = []
        for level in levels:
            stride = frame[0] // level.shape[1]
            crops.append(level[None, :, _scaled(in_y, stride), _scaled(in_x, stride)].float().to(device))
        out = model.decode(crops)
        logits[..., core_y, core_x] = out[..., _scaled(core_y, 1, in_y.start), _scaled(core_x, 1, in_x.start)].cpu()
    return logits


def forget_features() -> None:
    """Drop the kept features (tests; memory)."""
    _LAST_ENCODER.for_encoder("")


def encode_samples(model: torch.nn.Module, keys: Sequence[str], images: Sequence[np.ndarray],
                   targets: Sequence[np.ndarray], device: torch.device, cancel: CancelToken, flip: tuple[int, ...] = (),
                   ranks: Ranks | None = None) -> Generator[Progress, None, tuple[list[EncodedSample], int]]:
    """Encode each whole image once (eval mode: frozen BatchNorm statistics), reusing the features this
    encoder computed for the same image earlier in this process; (samples, how many were encoded now).
    `flip`: encode the network input (padded as at inference) mirrored along these N×C×H×W dimensions, as
    segmenter.FlipAveraged does; the target is mirrored with it.

    `ranks` (several processes): each rank encodes only its shard of the images (`Ranks.shard`) and the
    owners then send the features the others lack, so every rank ends with every image's features (its
    crops come from the same global batches as one process's) for 1/N of the encoding."""
    ranks = ranks or Ranks.single()
    mine = set(ranks.shard(len(images)))
    was_training = model.training
    model.eval()
    kept = _LAST_ENCODER.for_encoder(encoder_digest(model))
    encoded: list[EncodedSample] = []
    identities: list[tuple[str, str]] = []
    computed = 0
    clock = EtaClock(len(images))
    model.to(memory_format=torch.channels_last)  # depthwise convolutions run ~1.3x faster so on a CPU
    try:
        for done, (key, image, target) in enumerate(zip(keys, images, targets), start=1):
            cancel.raise_if_cancelled()
            batch, (height, width) = to_network_input(image, model.in_channels, model.size_multiple)
            if flip:
                batch = np.ascontiguousarray(np.flip(batch, flip))
            identity = (key, hashlib.sha1(batch.tobytes()).hexdigest())
            identities.append(identity)
            levels = kept.get(identity)
            if levels is None and done - 1 not in mine:
                levels = []  # another rank encodes it; filled in by the exchange below
            elif levels is None:
                pixels = torch.from_numpy(batch).to(device).contiguous(memory_format=torch.channels_last)
                if is_tiled(tuple(batch.shape[2:])):
                    levels = encode_by_tiles(model, pixels)
                else:
                    with torch.no_grad():
                        levels = [level[0].to(torch.float16).cpu().contiguous() for level in model.encode(pixels)]
                kept[identity] = levels
                computed += 1
            padded = np.full(batch.shape[2:], IGNORE, np.uint8)
            padded[:height, :width] = target
            if flip:
                padded = np.ascontiguousarray(np.flip(padded, tuple(d - 2 for d in flip)))
            encoded.append(EncodedSample(levels, padded, np.flatnonzero(padded.ravel() == 1)))
            if done % 25 == 0 or done == len(images):
                yield clock.progress("encode images", done, f"{computed} encoded, {done - computed} reused"
                                     + (" or from other ranks" if ranks.distributed else ""))
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    if ranks.distributed:
        received = ranks.share_tensor_lists({index: encoded[index].levels for index in mine},
                                            [index for index, sample in enumerate(encoded) if not sample.levels],
                                            len(encoded))
        for index, levels in received.items():
            encoded[index].levels = kept[identities[index]] = levels
    return encoded, computed


def draw_crop_origin(rng: np.random.Generator, defect_pixels: np.ndarray | None, shape: tuple[int, int],
                     size: int) -> tuple[int, int]:
    """(top, left) of a training crop, before clamping to the image: around a random defect pixel (flat
    indices `defect_pixels`, jittered by a third of the crop), or anywhere when `defect_pixels` is None."""
    height, width = shape
    if defect_pixels is None:
        return int(rng.integers(0, max(1, height - size + 1))), int(rng.integers(0, max(1, width - size + 1)))
    cy, cx = divmod(int(defect_pixels[rng.integers(len(defect_pixels))]), width)
    jitter = size // 3
    top = cy - size // 2 + int(rng.integers(-jitter, jitter + 1))
    left = cx - size // 2 + int(rng.integers(-jitter, jitter + 1))
    return top, left


class EncodedCropSampler:
    """Batches of (feature crops per level, target crops), like CropSampler's: seeded, a share of the
    crops centred on a defect pixel, random flips of the features (`flip_features`)."""

    def __init__(self, samples: Sequence[EncodedSample], crop_size: int, batch_size: int,
                 defect_crop_fraction: float, seed: int, alignment: int, flip_features: bool = True) -> None:
        self.flip_features = flip_features
        self.samples = list(samples)
        self.alignment = alignment
        self.crop_size = max(alignment, crop_size // alignment * alignment)
        self.batch_size = batch_size
        self.defect_crop_fraction = defect_crop_fraction
        self.rng = np.random.default_rng(seed)
        self.defect_indices = [i for i, s in enumerate(self.samples) if len(s.defect_pixels)]

    def _draw(self) -> tuple[int, int, int, tuple[bool, bool]]:
        """The next crop's (image index, top, left, (flip left-right, flip top-bottom)): every random draw."""
        centred = bool(self.defect_indices) and self.rng.random() < self.defect_crop_fraction
        index = int(self.rng.choice(self.defect_indices)) if centred else int(self.rng.integers(len(self.samples)))
        sample = self.samples[index]
        height, width = sample.target.shape
        size, step = self.crop_size, self.alignment
        top, left = draw_crop_origin(self.rng, sample.defect_pixels if centred else None, (height, width), size)
        top = int(np.clip(round(top / step) * step, 0, max(0, (height - size) // step * step)))
        left = int(np.clip(round(left / step) * step, 0, max(0, (width - size) // step * step)))
        # drawn even when flips are off, so both settings cut the same crops
        flips = (bool(self.rng.random() < 0.5), bool(self.rng.random() < 0.5))
        return index, top, left, flips

    def _cut(self, index: int, top: int, left: int, flips: tuple[bool, bool]) -> tuple[list[torch.Tensor], torch.Tensor]:
        sample = self.samples[index]
        height = sample.target.shape[0]
        size = self.crop_size
        target = np.full((size, size), IGNORE, np.uint8)  # beyond a small image: not trained on
        part = sample.target[top : top + size, left : left + size]
        target[: part.shape[0], : part.shape[1]] = part
        levels = []
        for level in sample.levels:
            stride = height // level.shape[1]
            crop = torch.zeros((level.shape[0], size // stride, size // stride), dtype=level.dtype)
            piece = level[:, top // stride : (top + size) // stride, left // stride : (left + size) // stride]
            crop[:, : piece.shape[1], : piece.shape[2]] = piece
            levels.append(crop)
        target_t = torch.from_numpy(target)
        for axis, flip in zip((-1, -2), flips):  # the same flips for every level and the target
            if flip and self.flip_features:
                levels = [level.flip(axis) for level in levels]
                target_t = target_t.flip(axis)
        return levels, target_t

    def batch(self, part: tuple[int, int] = (0, 1)) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The next batch; `part` (rank, world size): only that rank's crops of it (every world_size-th one),
        the draws of the whole batch made on every rank, so the ranks' parts make up one process's batch."""
        rank, world_size = part
        crops, targets = [], []
        for position in range(self.batch_size):
            drawn = self._draw()
            if position % world_size != rank:
                continue
            levels, target = self._cut(*drawn)
            crops.append(levels)
            targets.append(target)
        stacked = [torch.stack([crop[i] for crop in crops]).float() for i in range(len(crops[0]))]
        return stacked, torch.stack(targets)
