"""Production inference with an exported segmenter: onnxruntime, numpy and OpenCV only (no torch).

This is what a production line runs: `defect-studio predict MODEL_DIR IMAGES... --out DIR` reads
`model.onnx` and `model-card.json` from MODEL_DIR, and writes one 0/255 PNG mask per image. The
preprocessing here (float [0, 1], reflect padding to a multiple of the network stride, crop back)
is the one the in-app segmenter uses, so the masks are the app's masks.

Large images are predicted by overlapping tiles at native resolution, as the card's `tiling` says
(`defect_studio.ml.tiling`; "auto" when the card has none: an image that fits in one 1024 × 1024
tile whole, as before). The tiles are taken from the decoded pixels one at a time and their probabilities blended
band by band straight into the mask, so memory is the decoded image, the mask and one band of rows
besides the network's activations for one tile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import cv2
import numpy as np

from defect_studio.errors import ModelError
from defect_studio.imageio import decode_image, file_sha256, to_float01, write_mask
from defect_studio.ml.classifier_options import classifier_tile_grid
from defect_studio.ml.tiling import Tiling, TopValues, map_tiles, stitched_rows, tiled_map

T = TypeVar("T")

MODEL_FILE = "model.onnx"
CARD_FILE = "model-card.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
# The classifier that decides which images get a mask (the card's "classifier_gate"; absent: the segmenter's own gate).
GATE_MODEL_FILE = "gate.onnx"
GATE_TORCHSCRIPT_FILE = "gate.torchscript.pt"


def pad_to_multiple(image: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad an H×W×C image at the bottom/right so H and W are multiples of `multiple`.

    Returns the padded image and the original (H, W) to crop the output back to.
    """
    height, width = image.shape[:2]
    pad_bottom, pad_right = (-height) % multiple, (-width) % multiple
    if pad_bottom or pad_right:
        # cv2 reflect (without repeating the edge) needs pad < size; "reflect 101" is numpy's "reflect".
        mode = "reflect" if pad_bottom < height and pad_right < width else "symmetric"
        image = np.pad(image, ((0, pad_bottom), (0, pad_right), (0, 0)), mode=mode)
    return np.ascontiguousarray(image), (height, width)


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """H×W×C float image -> H×W×`channels` (gray <-> RGB) the network was trained with."""
    if image.shape[2] == channels:
        return image
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.repeat(image[:, :, :1], 3, axis=2)


def to_network_input(image: np.ndarray, channels: int, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """float H×W×C [0, 1] -> (1×C×H'×W' float32 batch, original size)."""
    padded, size = pad_to_multiple(match_channels(image.astype(np.float32), channels), multiple)
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[None]), size


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))).astype(np.float32)


IMAGE_SCORE_TOP_K = 16  # pixels: an image's defect score is the mean of its 16 highest probabilities


def image_score(probability: np.ndarray, top_k: int = IMAGE_SCORE_TOP_K) -> float:
    """How sure the segmenter is that the image holds a defect: the mean of its `top_k` highest pixel
    probabilities (a lone hot pixel does not count, a defect the size of a small blowhole does)."""
    flat = np.asarray(probability, dtype=np.float32).ravel()
    k = min(max(1, top_k), flat.size)
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())


def decide_mask(probability: np.ndarray, threshold: float, image_gate: dict[str, Any] | None,
                classifier_says_defect: bool | None = None) -> np.ndarray:
    """The defect mask: pixels at or above `threshold`, and none at all where the image's classifier says
    "good" (`classifier_says_defect` False: the classifier gate, which replaces the segmenter's own) or, without
    a classifier gate, where the image's score is below the gate calibrated on held-out good images
    (`image_gate`: {"top_k", "min_score"}; None: no gate)."""
    mask = probability >= threshold
    if classifier_says_defect is not None:
        if not classifier_says_defect:
            mask[:] = False
        return mask
    if image_gate and image_score(probability, int(image_gate.get("top_k", IMAGE_SCORE_TOP_K))) < float(
            image_gate["min_score"]):
        mask[:] = False
    return mask


@dataclass
class ExportedSegmenter:
    """An exported model directory loaded for onnxruntime inference."""

    directory: Path
    card: dict[str, Any]
    session: Any
    gate_session: Any = None  # the classifier gate's (gate.onnx), when the card has one

    def gate_probability(self, image: np.ndarray) -> float | None:
        """The classifier gate's defect probability of a float [0, 1] image, letterboxed as the classifier was
        trained, or, where the gate's tiling cuts the image, of its most defect-like tile (None: no classifier
        gate)."""
        if self.gate_session is None:
            return None
        boxes = self.gate_tile_boxes(image.shape[0], image.shape[1])
        if boxes is None:
            return self.gate_whole_probability(image)
        return max(self.gate_whole_probability(image[box.slices]) for box in boxes)

    def gate_whole_probability(self, image: np.ndarray) -> float:
        """The gate classifier on all of `image` (a float [0, 1] image, or one tile of it), letterboxed."""
        from defect_studio.ml.preprocess import Preprocessing

        array, _ = Preprocessing.from_dict(self.card["classifier_gate"]["preprocessing"]).prepare_array(image)
        (logit,) = self.gate_session.run(None, {self.gate_session.get_inputs()[0].name: array[None]})
        return float(sigmoid(np.asarray(logit, np.float32).reshape(-1))[0])

    def gate_tile_boxes(self, height: int, width: int) -> list[Any] | None:
        """The tiles the gate classifier cuts a height × width image into, as it did in training (None: whole)."""
        recorded = (self.card.get("classifier_gate") or {}).get("tiling")
        grid = None if not recorded else classifier_tile_grid(Tiling.from_dict(recorded), height, width)
        return None if grid is None else list(grid.boxes())

    @property
    def gate_threshold(self) -> float:
        return float(self.card["classifier_gate"]["threshold"])

    def classifier_says_defect(self, image: np.ndarray) -> bool | None:
        """The classifier gate's decision (None: no classifier gate): its probability above its own threshold."""
        probability = self.gate_probability(image)
        return None if probability is None else probability > self.gate_threshold

    @property
    def channels(self) -> int:
        return int(self.card["input"]["channels"])

    @property
    def multiple(self) -> int:
        return int(self.card["input"]["size_multiple"])

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    @property
    def image_gate(self) -> dict[str, Any] | None:
        return self.card.get("image_gate")

    @property
    def tiling(self) -> Tiling:
        return Tiling.from_dict(self.card.get("tiling"))

    def probability(self, image: np.ndarray) -> np.ndarray:
        """float H×W×C image in [0, 1] -> H×W defect probability (by tiles when the card's tiling says so)."""
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ModelError(f"expected an H×W×C image with 1 or 3 channels, got shape {image.shape}")
        return tiled_map(image, self.whole_probability, self.tiling)

    def whole_probability(self, image: np.ndarray) -> np.ndarray:
        """The network on all of `image` at once (an image small enough, or one tile)."""
        batch, (height, width) = to_network_input(image, self.channels, self.multiple)
        input_name = self.session.get_inputs()[0].name
        try:
            (logits,) = self.session.run(None, {input_name: batch})
        except Exception as error:  # onnxruntime raises its own exception types
            raise ModelError(f"the ONNX model refused the input of shape {batch.shape}: {error}") from error
        return sigmoid(logits[0, 0, :height, :width])

    def mask(self, image: np.ndarray) -> np.ndarray:
        return decide_mask(self.probability(image), self.threshold, self.image_gate, self.classifier_says_defect(image))

    def mask_of_pixels(self, pixels: np.ndarray, cancel: Any = None) -> np.ndarray:
        """The mask of a decoded image (native pixels, as `imageio.decode_image` gives them), in bounded
        memory: each tile is converted to float on its own and the blended probabilities become mask
        rows band by band; the same mask as `mask(to_float01(pixels))`."""
        height, width = pixels.shape[:2]
        grid = self.tiling.grid_for(height, width)
        if grid is None:
            return self.mask(to_float01(pixels))
        # Float images are stretched by their own range (to_float01), which a tile alone does not know.
        floats = to_float01(pixels) if pixels.dtype.kind == "f" else None

        def tile_probability(box: Any) -> np.ndarray:
            tile = floats[box.slices] if floats is not None else to_float01(pixels[box.slices])
            return self.whole_probability(tile)

        says_defect = None
        if self.gate_session is not None:
            says_defect = self._gate_says_defect(pixels, floats)
            if not says_defect:
                return np.zeros((height, width), bool)
        gate = self.image_gate if says_defect is None else None
        top = TopValues(int(gate.get("top_k", IMAGE_SCORE_TOP_K)) if gate else 1)
        mask = np.zeros((height, width), bool)
        for y0, rows in stitched_rows(grid, map_tiles(grid, tile_probability, cancel)):
            np.greater_equal(rows, self.threshold, out=mask[y0 : y0 + len(rows)])
            top.add(rows)
        if gate and top.mean() < float(gate["min_score"]):
            mask[:] = False
        return mask

    def _gate_says_defect(self, pixels: np.ndarray, floats: np.ndarray | None) -> bool:
        """The classifier gate's decision on decoded pixels without a float copy of the whole image."""
        height, width = pixels.shape[:2]
        boxes = self.gate_tile_boxes(height, width)
        if boxes is not None:  # one tile converted at a time; the first tile over the threshold decides
            return any(self.gate_whole_probability(floats[box.slices] if floats is not None
                                                   else to_float01(pixels[box.slices])) > self.gate_threshold
                       for box in boxes)
        if floats is not None:
            return self.gate_whole_probability(floats) > self.gate_threshold
        # The classifier sees the image letterboxed to its input: shrink the pixels first (area, as the
        # letterbox does), so no float copy of the whole image is made.
        size = letterbox_content_size(self.card["classifier_gate"]["preprocessing"], (height, width))
        small = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        return self.gate_whole_probability(to_float01(small)) > self.gate_threshold


def load_exported(model_dir: str | Path) -> ExportedSegmenter:
    """Open MODEL_DIR (model.onnx + model-card.json); a missing or corrupted file is a ModelError."""
    import onnxruntime

    directory = Path(model_dir)
    card_path, model_path = directory / CARD_FILE, directory / MODEL_FILE
    if not card_path.is_file() or not model_path.is_file():
        raise ModelError(f"{directory}: not an exported model folder (needs {MODEL_FILE} and {CARD_FILE}).")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card["input"]["channels"], card["input"]["size_multiple"], card["threshold"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{card_path}: unreadable or incomplete model card ({error}).") from error
    expected_sha = card.get("files", {}).get(MODEL_FILE)
    if expected_sha is not None and file_sha256(model_path) != expected_sha:
        raise ModelError(
            f"{model_path} is not the model its card describes (an interrupted or mixed export?); export again."
        )
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # Memory patterns are planned per input shape, and the images' (and tiles') shapes vary: with them one
    # 960² tile of the default segmenter peaked at 670 MB RSS, without them 355 MB at the same speed.
    options.enable_mem_pattern = False
    try:
        session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ModelError(f"{model_path}: not a valid ONNX model (corrupted or truncated?): {str(error)[:200]}") from error
    gate_session = None
    if card.get("classifier_gate"):
        gate_path = directory / GATE_MODEL_FILE
        expected_gate_sha = card.get("files", {}).get(GATE_MODEL_FILE)
        if not gate_path.is_file() or (expected_gate_sha is not None and file_sha256(gate_path) != expected_gate_sha):
            raise ModelError(f"{gate_path}: the classifier gate its card names is missing or not the one described; "
                             "export again.")
        try:
            gate_session = onnxruntime.InferenceSession(str(gate_path), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ModelError(f"{gate_path}: not a valid ONNX model (corrupted or truncated?): {str(error)[:200]}") from error
    return ExportedSegmenter(directory, card, session, gate_session)


def letterbox_content_size(preprocessing: dict[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """Where a (height, width) image lands inside the classifier's letterbox: its resized content's size."""
    from defect_studio.ml.preprocess import Preprocessing

    return Preprocessing.from_dict(preprocessing).geometry(size).resized_size


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" (shard I of N, counted from 1, as a scheduler's array job numbers them) -> (I, N)."""
    index_text, _, count_text = str(text).partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ModelError(f"a shard is I/N, shard I of N counted from 1 (e.g. 2/8), got {text!r}.") from None
    if not 1 <= index <= count:
        raise ModelError(f"shard {text!r}: I must be from 1 to N.")
    return index, count


def shard_of(images: Sequence[str | Path], shard: tuple[int, int] | None) -> list[Path]:
    """The images shard (I, N) predicts: every N-th of the images sorted by path, starting at the I-th,
    so the N shards split the set whatever order the images were listed in, and a killed shard can be
    run again alone."""
    return shard_items([Path(image) for image in images], shard, key=str)


def shard_items(items: Sequence[T], shard: tuple[int, int] | None, key: Callable[[T], str]) -> list[T]:
    """shard_of for any items, sorted by `key` (their path)."""
    if shard is None:
        return list(items)
    index, count = shard
    return sorted(items, key=key)[index - 1 :: count]


def predict_images(model_dir: str | Path, images: Sequence[str | Path], out_dir: str | Path,
                   shard: tuple[int, int] | None = None) -> list[Path]:
    """Write `<out>/<stem>.png` for each image (of shard (I, N) only, when given; each mask is written
    atomically); returns the mask paths."""
    model = load_exported(model_dir)
    return [predict_image_file(model, image_path, out_dir) for image_path in shard_of(images, shard)]


def predict_image_file(model: ExportedSegmenter, image_path: str | Path, out_dir: str | Path, cancel: Any = None) -> Path:
    """Write `<out>/<stem>.png`, the mask of one image file, atomically; returns its path. The decoded
    pixels are let go before the mask is encoded, so the two peaks (predicting, encoding) do not add up."""
    pixels, _ = decode_image(image_path)
    mask = model.mask_of_pixels(pixels, cancel)
    del pixels
    mask_path = Path(out_dir) / f"{Path(image_path).stem}.png"
    write_mask(mask_path, mask)
    return mask_path
