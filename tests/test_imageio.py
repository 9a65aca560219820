from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defect_studio.errors import BadImageError
from defect_studio.imageio import decode_image, read_image, read_mask, write_mask
from tests.image_files import gradient, write_cv2, write_float_tiff, write_palette_png, write_png_header_only


@pytest.mark.parametrize(
    ("name", "image", "channels", "bit_depth", "out_channels"),
    [
        ("gray.png", gradient(), 1, 8, 1),
        ("gray.jpg", gradient(), 1, 8, 1),
        ("gray.bmp", gradient(), 1, 8, 1),
        ("gray8.tif", gradient(), 1, 8, 1),
        ("gray16.tif", gradient(dtype=np.uint16), 1, 16, 1),
        ("gray16.png", gradient(dtype=np.uint16), 1, 16, 1),
        ("rgb.png", gradient(channels=3), 3, 8, 3),
        ("rgb.jpg", gradient(channels=3), 3, 8, 3),
        ("rgb16.tiff", gradient(channels=3, dtype=np.uint16), 3, 16, 3),
        ("rgba.png", gradient(channels=4), 4, 8, 3),
    ],
)
def test_every_supported_format_reads_as_float_in_unit_range(tmp_path: Path, name, image, channels, bit_depth, out_channels):
    path = write_cv2(tmp_path / name, image)
    native, info = decode_image(path)
    assert (info.width, info.height, info.channels, info.bit_depth) == (32, 24, channels, bit_depth)
    pixels = read_image(path)
    assert pixels.dtype == np.float32 and pixels.shape == (24, 32, out_channels)
    assert 0.0 <= pixels.min() < 0.1 and 0.9 < pixels.max() <= 1.0


def test_sixteen_bit_keeps_its_precision(tmp_path: Path):
    image = np.full((8, 8), 1000, np.uint16)
    image[0, 0] = 1001
    pixels = read_image(write_cv2(tmp_path / "fine.tif", image))
    assert pixels[0, 0, 0] > pixels[1, 1, 0]  # a one-count difference survives, unlike an 8-bit conversion


def test_colour_channels_are_rgb_not_bgr(tmp_path: Path):
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    pixels = read_image(write_cv2(tmp_path / "red.png", bgr))
    assert pixels[0, 0].tolist() == [1.0, 0.0, 0.0]


def test_palette_png_and_float_tiff(tmp_path: Path):
    assert read_image(write_palette_png(tmp_path / "palette.png")).shape[:2] == (24, 32)
    floats = read_image(write_float_tiff(tmp_path / "float.tif", scale=1000.0))
    assert floats.min() == 0.0 and floats.max() == 1.0  # stretched from arbitrary units


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty"),
        ("text.jpg", b"this is not an image at all", "not a readable image"),
        ("notes.tif", b"II*\x00garbage", "not a readable image"),
    ],
)
def test_unreadable_files_get_a_clear_message(tmp_path: Path, name: str, content: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=message):
        read_image(path)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_truncated_files_are_refused(tmp_path: Path, suffix: str):
    rng = np.random.default_rng(0)
    whole = write_cv2(tmp_path / f"whole{suffix}", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(BadImageError, match=cut.name):
        read_image(cut)


def test_huge_image_is_refused_from_its_header(tmp_path: Path):
    path = write_png_header_only(tmp_path / "huge.png", 20_000, 20_000)
    with pytest.raises(BadImageError, match="megapixel limit"):
        read_image(path)


def test_unicode_and_spaces_in_paths(tmp_path: Path):
    path = write_cv2(tmp_path / "Prüfung 1" / "Oberfläche fehlerhaft ✓.png", gradient())
    assert read_image(path).shape == (24, 32, 1)


def test_mask_round_trip_and_size_check(tmp_path: Path):
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    path = tmp_path / "m.png"
    write_mask(path, mask)
    assert np.array_equal(read_mask(path, (10, 12)), mask)
    stored = decode_image(path)[0]
    assert set(np.unique(stored)) == {0, 255}
    with pytest.raises(BadImageError, match="12 × 10"):
        read_mask(path, (11, 12))
