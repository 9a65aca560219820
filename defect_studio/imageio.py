"""Reading images of every kind a factory camera writes, and writing masks, with clear refusals.

Decoding is done by OpenCV from bytes (so unicode paths work everywhere); the header is checked
first with Pillow so that an image over the limit (300 megapixels unless a project's import setting
says less) is refused before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from defect_studio.atomic import atomic_write_bytes
from defect_studio.errors import BadImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
# No reader decodes more (a decoded 300 MP colour image is 0.9 GB, 3.6 GB as float32); also the
# importer's default limit, which a project may lower (project.importer.IMPORT_LIMIT_SETTING).
MAX_PIXELS = 300_000_000
MAX_FILE_BYTES = 1 << 30

Image.MAX_IMAGE_PIXELS = None  # our own limit applies, with our own message


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int  # as stored in the file: 1 gray, 3 colour, 4 with alpha
    bit_depth: int  # 8, 16 or 32 (float)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise BadImageError(f"{path.name}: cannot read the file ({error.strerror or error}).") from error
    if size == 0:
        raise BadImageError(f"{path.name}: the file is empty (0 bytes).")
    if size > MAX_FILE_BYTES:
        raise BadImageError(f"{path.name}: the file is {size / 2**30:.1f} GiB, larger than the 1 GiB limit.")
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadImageError(f"{path.name}: cannot read the file ({error.strerror or error}).") from error


def pixel_limit_message(name: str, width: int, height: int, max_pixels: int) -> str:
    return (f"{name}: {width} × {height} pixels is more than the {max_pixels / 1e6:g} megapixel limit; "
            "split it into smaller images before importing.")


def _check_header(path: Path, data: bytes, max_pixels: int) -> None:
    """Refuse oversized images from the header alone; a header Pillow cannot parse is left to OpenCV."""
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return
    if width * height > max_pixels:
        raise BadImageError(pixel_limit_message(path.name, width, height, max_pixels))


def _jpeg_is_truncated(data: bytes) -> bool:
    # A complete JPEG ends with the EOI marker FF D9 (some cameras pad with zeros after it).
    return b"\xff\xd9" not in data[-4096:].rstrip(b"\x00")[-2:] and not data.rstrip(b"\x00").endswith(b"\xff\xd9")


def decode_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Decode `path` into its native array (uint8, uint16 or float32; H×W or H×W×C, RGB order)."""
    path = Path(path)
    data = _read_bytes(path)
    _check_header(path, data, max_pixels)
    buffer = np.frombuffer(data, dtype=np.uint8)
    pixels = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise BadImageError(f"{path.name}: not a readable image (corrupt, truncated, or not an image format).")
    if path.suffix.lower() in (".jpg", ".jpeg") and _jpeg_is_truncated(data):
        raise BadImageError(f"{path.name}: the JPEG file is truncated (no end-of-image marker).")
    if pixels.shape[0] * pixels.shape[1] > max_pixels:
        raise BadImageError(pixel_limit_message(path.name, pixels.shape[1], pixels.shape[0], max_pixels))
    if pixels.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise BadImageError(f"{path.name}: unsupported pixel type {pixels.dtype}.")
    if pixels.ndim == 3:
        channels = pixels.shape[2]
        if channels == 1:
            pixels = pixels[:, :, 0]
        elif channels == 2:  # gray + alpha
            pixels = pixels[:, :, 0]
        elif channels == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        elif channels == 4:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)
        else:
            raise BadImageError(f"{path.name}: {channels} channels; expected gray, RGB or RGBA.")
        stored_channels = channels
    else:
        stored_channels = 1
    bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(pixels.dtype, 32)
    if bit_depth == 32:
        pixels = pixels.astype(np.float32)
    info = ImageInfo(width=int(pixels.shape[1]), height=int(pixels.shape[0]), channels=stored_channels, bit_depth=bit_depth)
    return np.ascontiguousarray(pixels), info


def to_float01(pixels: np.ndarray) -> np.ndarray:
    """Native pixels -> float32 H×W×C in [0, 1] with C in {1, 3}."""
    if pixels.dtype == np.uint8:
        out = pixels.astype(np.float32) / 255.0
    elif pixels.dtype == np.uint16:
        out = pixels.astype(np.float32) / 65535.0
    else:
        out = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(out.min()), float(out.max())
        if low < 0.0 or high > 1.0:  # float data in arbitrary units: stretch this image to [0, 1]
            out = (out - low) / (high - low) if high > low else np.zeros_like(out)
    if out.ndim == 2:
        out = out[:, :, None]
    return np.ascontiguousarray(out)


def read_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """float32 H×W×C in [0, 1], C = 1 (gray) or 3 (RGB); raises BadImageError with a clear message."""
    pixels, _ = decode_image(path, max_pixels)
    return to_float01(pixels)


def read_image_pixels(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image in its decoded integer pixels (uint8 or uint16, H×W or H×W×3), a quarter or half of
    `read_image`'s float32, for code that makes it float a tile at a time (`to_float01(pixels[tile])` is
    `read_image(path)[tile]`); a float file as `read_image` gives it, since its stretch to [0, 1] needs
    the whole image's range."""
    pixels, _ = decode_image(path, max_pixels)
    return to_float01(pixels) if pixels.dtype.kind == "f" else pixels


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Binary mask -> 8-bit PNG bytes, 0 background and 255 defect."""
    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-D, got shape {mask.shape}")
    # 0/255 made in place in one byte a pixel (np.where(mask > 0, 255, 0) made an int64 copy: 800 MB at 100 MP)
    binary = (mask > 0).view(np.uint8)
    ok, encoded = cv2.imencode(".png", np.multiply(binary, 255, out=binary))
    if not ok:
        raise OSError("PNG encoding failed")
    return encoded.tobytes()


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> bytes:
    """Write a binary mask as a plain PNG, atomically; returns the bytes written (to hash them)."""
    data = encode_mask_png(mask)
    atomic_write_bytes(path, data)
    return data


def read_mask(path: str | os.PathLike[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask PNG (any non-zero pixel is defect) as a bool H×W array; checks the size when given."""
    path = Path(path)
    pixels, info = decode_image(path)
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2)
    if shape is not None and pixels.shape != tuple(shape):
        raise BadImageError(
            f"{path.name}: the mask is {info.width} × {info.height} but its image is {shape[1]} × {shape[0]}."
        )
    return pixels > 0
