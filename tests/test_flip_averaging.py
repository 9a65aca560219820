"""Test-time flips: the segmenter predicts the mean of flipped views; validation from cached features
predicts exactly what the app will; checkpoints from before the setting keep their single view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.encoded_crops import encode_samples, forget_features
from defect_studio.ml.segmenter import (
    FLIP_VIEWS,
    EfficientNetUnet,
    SegmenterConfig,
    SegmenterNet,
    _probability_from_features,
    build_segmenter,
    load_segmenter,
    predict_probability,
    save_segmenter,
)


def _textured_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.random((height, width, 1)).astype(np.float32) * 0.3
    image[height // 3 : height // 2, width // 5 : width // 2] += 0.6  # an asymmetric bright patch
    return np.clip(image, 0, 1)


def _untrained_unet(seed: int) -> SegmenterNet:
    """A random compact U-Net whose output varies visibly (without the head's 'mostly background' prior)."""
    torch.manual_seed(seed)
    model = SegmenterNet(1, (8, 16, 32)).eval()
    torch.nn.init.normal_(model.head.weight, std=2.0)
    torch.nn.init.zeros_(model.head.bias)
    return model


def test_a_left_right_averaged_prediction_mirrors_with_the_image() -> None:
    model = _untrained_unet(0)
    image = _textured_image(64, 96, 0)  # a multiple of the network's size: no padding breaks the symmetry
    mirrored = np.ascontiguousarray(image[:, ::-1])
    averaged = predict_probability(model, image, flips="h")
    np.testing.assert_allclose(predict_probability(model, mirrored, flips="h"), averaged[:, ::-1], atol=1e-5)
    single = predict_probability(model, image)
    assert np.abs(predict_probability(model, mirrored)[:, ::-1] - single).max() > 1e-3  # one view alone does not


def test_three_views_average_the_logits_of_each_view_mirrored_back() -> None:
    model = _untrained_unet(1)
    image = _textured_image(64, 64, 1)
    pixels = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        logits = (model(pixels) + model(pixels.flip(3)).flip(3) + model(pixels.flip(2)).flip(2)) / 3
    expected = torch.sigmoid(logits)[0, 0].numpy()
    np.testing.assert_allclose(predict_probability(model, image, flips="hv"), expected, atol=1e-6)


def test_validation_from_cached_features_predicts_what_the_app_predicts() -> None:
    """Training validates from features encoded once per view; on an image whose size is no multiple of the
    network's, each view must be mirrored with its padding, exactly as FlipAveraged does at inference."""
    forget_features()
    torch.manual_seed(2)
    model = EfficientNetUnet(1, frozen_stages=4).eval()
    torch.nn.init.normal_(model.head.weight, std=2.0)
    torch.nn.init.zeros_(model.head.bias)
    images = [_textured_image(70, 90, 2), _textured_image(45, 100, 3)]
    targets = [np.zeros(image.shape[:2], np.uint8) for image in images]
    views = [{} for _ in images]
    for dims in FLIP_VIEWS["hv"]:
        encoded = run_job(encode_samples(model, ["a", "b"], images, targets, torch.device("cpu"), CancelToken(), flip=dims))
        for by_view, sample in zip(views, encoded[0]):
            by_view[dims] = sample
    for image, by_view in zip(images, views):
        app = predict_probability(model, image, flips="hv")
        cached = _probability_from_features(model, by_view, "hv", image.shape[:2], torch.device("cpu"))
        np.testing.assert_allclose(cached, app, atol=2e-3)  # the features are kept in half precision
        assert np.abs(predict_probability(model, image) - app).max() > 1e-2  # the views do change the prediction
    forget_features()


def test_a_checkpoint_from_before_the_setting_keeps_its_single_view(tmp_path: Path) -> None:
    settings = SegmenterConfig(architecture="unet", channels=(8, 16, 32))
    model = build_segmenter(1, settings)
    config = settings.to_dict()
    del config["prediction_flips"], config["flip_encoded_features"]
    save_segmenter(tmp_path / "old.pt", model, {"in_channels": 1, "size_multiple": model.size_multiple,
                                                "config": config, "threshold": 0.5})
    assert load_segmenter(tmp_path / "old.pt", device="cpu").prediction_flips == "none"
    config["prediction_flips"] = "hv"
    save_segmenter(tmp_path / "new.pt", model, {"in_channels": 1, "size_multiple": model.size_multiple,
                                                "config": config, "threshold": 0.5})
    assert load_segmenter(tmp_path / "new.pt", device="cpu").prediction_flips == "hv"
