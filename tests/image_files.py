"""Writers for test images of every kind a camera or a careless user produces."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def gradient(height: int = 24, width: int = 32, channels: int = 1, dtype: type = np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    ramp = np.linspace(0, top, width, dtype=np.float64)[None, :].repeat(height, 0)
    image = ramp.astype(dtype)
    if channels > 1:
        image = np.stack([image] * channels, axis=2)
        image[..., 0] = image[..., 0][:, ::-1]
    return image


def write_cv2(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def write_palette_png(path: Path) -> Path:
    Image.fromarray(gradient()).convert("P").save(path)
    return path


def write_float_tiff(path: Path, scale: float = 1000.0) -> Path:
    write_cv2(path, gradient(dtype=np.float32) * scale)
    return path


def write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims a huge size: enough for a header check, not for decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def write_tiff_header_only(path: Path, width: int, height: int) -> Path:
    """An uncompressed 8-bit gray TIFF that claims width × height but holds no pixel data."""
    tags = [  # (tag, type 3=SHORT 4=LONG, value)
        (256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
        (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, width * height),
    ]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd)
    return path
