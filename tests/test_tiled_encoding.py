"""Segmenter training on large images: an image above one segmenter tile of pixels is encoded and decoded
by tiles (issue 15), so the network's working memory is a tile's, not the whole image's; the stitched
levels are exactly the whole image's where each tile sees its whole receptive field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml import encoded_crops
from defect_studio.ml.encoded_crops import decode_by_tiles, encode_by_tiles, encode_samples, forget_features, tile_cores
from defect_studio.ml.segmenter import EfficientNetUnet, SegmentationSample, SegmenterConfig, make_target, train_segmenter_job


def _pixels(height: int, width: int, seed: int) -> torch.Tensor:
    noise = np.random.default_rng(seed).random((height, width), dtype=np.float32)
    return torch.from_numpy(cv2.GaussianBlur(noise, (0, 0), 2.0))[None, None]


def _network() -> EfficientNetUnet:
    torch.manual_seed(0)
    return EfficientNetUnet(1, frozen_stages=4).eval()


def test_cores_cut_an_axis_on_the_deepest_stride() -> None:
    assert tile_cores(192, 64, 32) == [(0, 64), (64, 128), (128, 192)]
    assert tile_cores(160, 100, 32) == [(0, 96), (96, 160)]  # a core is a multiple of the stride
    assert tile_cores(64, 1024, 32) == [(0, 64)]


def test_tiles_that_see_the_whole_frame_give_the_whole_images_levels_and_logits() -> None:
    model = _network()
    pixels = _pixels(160, 224, 1)
    with torch.no_grad():
        whole = [level[0].to(torch.float16) for level in model.encode(pixels)]
        whole_logits = model.decode([level[None].float() for level in whole])
    tiled = encode_by_tiles(model, pixels, tile=64, margin=512)  # 15 tiles, each encoding the whole frame
    assert [level.shape for level in tiled] == [level.shape for level in whole]
    for ours, theirs in zip(tiled, whole):
        assert torch.equal(ours, theirs)
    logits = decode_by_tiles(model, tiled, torch.device("cpu"), tile=64, margin=512)
    torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5)


def test_each_tile_is_encoded_with_its_margin_only() -> None:
    model = _network()
    pixels = _pixels(320, 384, 2)
    seen: list[tuple[int, int]] = []
    hook = model.encoder[0].register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
    try:
        tiled = encode_by_tiles(model, pixels, tile=128, margin=32)
    finally:
        hook.remove()
    assert len(seen) == 9 and max(h for h, _ in seen) <= 128 + 2 * 32 and max(w for _, w in seen) <= 128 + 2 * 32
    with torch.no_grad():
        whole = model.encode(pixels)
    # away from the borders' context the tiles agree with the whole image closely, not exactly
    finest = (tiled[0].float() - whole[0][0]).abs().mean() / whole[0][0].abs().mean()
    assert float(finest) < 0.05


def test_training_on_a_large_image_encodes_it_by_tiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The tile limit lowered to 128² pixels: a 256 × 320 image trains (crops cut from its tiled features)
    and validates (decoded by tiles) and no encoder call sees more than a tile and its margins."""
    monkeypatch.setattr(encoded_crops, "WHOLE_IMAGE_MAX_PIXELS", 128 * 128)
    monkeypatch.setattr(encoded_crops, "DEFAULT_TILE_SIZE", 128)
    monkeypatch.setattr(encoded_crops, "DEFAULT_OVERLAP", 32)
    forget_features()
    samples = []
    for index in range(8):  # 4 of each kind: one of each held out
        image = _pixels(256, 320, 10 + index)[0, 0].numpy()[..., None]
        mask = np.zeros((256, 320), bool)
        if index % 2:
            mask[100:130, 40:90] = True
            image[mask] *= 0.3
        samples.append(SegmentationSample(f"large-{index}", image, make_target(mask)))
    seen: list[tuple[int, int]] = []
    original_encode = EfficientNetUnet.encode

    def encode(self: EfficientNetUnet, pixels: torch.Tensor) -> list[torch.Tensor]:
        seen.append(tuple(pixels.shape[-2:]))
        return original_encode(self, pixels)

    decoded: list[tuple[int, int]] = []
    original_decode = EfficientNetUnet.decode

    def decode(self: EfficientNetUnet, levels: list[torch.Tensor]) -> torch.Tensor:
        decoded.append((levels[0].shape[-2] * 2, levels[0].shape[-1] * 2))
        return original_decode(self, levels)

    monkeypatch.setattr(EfficientNetUnet, "encode", encode)
    monkeypatch.setattr(EfficientNetUnet, "decode", decode)
    config = SegmenterConfig(architecture="efficientnet-lite0-unet", frozen_stages=4, crop_size=64, batch_size=4,
                             epochs=1, steps_per_epoch=2, seed=0, threads=1, prediction_flips="none")
    events = []
    result = run_job(train_segmenter_job(samples, config, tmp_path / "segmenter.pt", CancelToken()), events.append)
    forget_features()
    assert any(event.stage == "encode images" for event in events), "the features were cached, not per crop"
    assert seen and max(h * w for h, w in seen) <= (128 + 64) ** 2
    assert (128 + 64, 128 + 64) in decoded or (128 + 32, 128 + 64) in decoded, "validation decoded no tile"
    assert max(h * w for h, w in decoded) <= (128 + 64) ** 2  # no whole-image decode either
    assert (tmp_path / "segmenter.pt").is_file() and result.metrics is not None
