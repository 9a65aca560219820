"""Export: ONNX + TorchScript + card with a parity check; predict reproduces in-app masks; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defect_studio.cli import main as cli_main
from defect_studio.dataset_layout import load_dataset
from defect_studio.errors import ModelError
from defect_studio.imageio import read_image, read_mask
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.export import export_segmenter
from defect_studio.ml.segmenter import SegmentationSample, SegmenterConfig, load_segmenter, make_target, train_segmenter_job
from defect_studio.predict import CARD_FILE, MODEL_FILE, TORCHSCRIPT_FILE, load_exported

TINY = dict(architecture="unet", channels=(8, 16, 32), crop_size=48, batch_size=8, epochs=2, steps_per_epoch=8, learning_rate=1e-2, seed=1)


@pytest.fixture(scope="module")
def model_and_images(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    samples, test_paths = [], []
    for s in load_dataset(demo_dataset):
        if s.split == "train":
            image = read_image(s.image_path)
            mask = read_mask(s.mask_path) if s.mask_path else np.zeros(image.shape[:2], bool)
            samples.append(SegmentationSample(s.stem, image, make_target(mask)))
        else:
            test_paths.append(s.image_path)
    checkpoint = tmp_path_factory.mktemp("model") / "segmenter.pt"
    run_job(train_segmenter_job(samples, SegmenterConfig(**TINY), checkpoint, CancelToken()))
    return load_segmenter(checkpoint, device="cpu"), test_paths[:6]


@pytest.fixture(scope="module")
def exported(model_and_images, tmp_path_factory: pytest.TempPathFactory):
    loaded, paths = model_and_images
    out = tmp_path_factory.mktemp("export") / "model"
    result, parity = export_segmenter(loaded, out, [read_image(p) for p in paths[:3]], {"note": "test"})
    return result, parity


def test_export_writes_checked_model_files(exported, model_and_images) -> None:
    out, parity = exported
    assert parity.passed and parity.images == 3
    assert parity.onnx_max_abs_diff < 1e-3 and parity.onnx_min_mask_iou >= 0.99
    assert {p.name for p in out.iterdir()} == {MODEL_FILE, TORCHSCRIPT_FILE, CARD_FILE}
    card = json.loads((out / CARD_FILE).read_text())
    loaded, _ = model_and_images
    # three levels at half resolution: the input must be a multiple of 2 ** 2 * 2 (the model pads to it)
    assert card["input"]["channels"] == 3 and card["input"]["size_multiple"] == loaded.model.size_multiple == 8
    assert card["threshold"] == pytest.approx(loaded.threshold)
    # the exported graph averages the flipped views itself: the parity above holds against the app's averaged prediction
    assert card["test_time_flips"] == loaded.prediction_flips == "hv"
    assert card["parity"]["passed"] is True and card["note"] == "test"
    assert card["versions"]["onnxruntime"] and card["training"]["training_data_hash"]
    assert not list(out.parent.glob(".*partial"))


def test_predict_reproduces_in_app_masks(exported, model_and_images, tmp_path: Path) -> None:
    out, _ = exported
    loaded, paths = model_and_images
    masks_dir = tmp_path / "masks"
    assert cli_main(["predict", str(out), *map(str, paths), "--out", str(masks_dir)]) == 0
    for path in paths:
        image = read_image(path)
        predicted = read_mask(masks_dir / f"{path.stem}.png", image.shape[:2])
        in_app = loaded.mask(image)
        union = np.count_nonzero(predicted | in_app)
        assert union == 0 or np.count_nonzero(predicted & in_app) / union >= 0.99


def test_failed_parity_leaves_nothing_behind(model_and_images, tmp_path: Path) -> None:
    loaded, paths = model_and_images
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("earlier content")
    with pytest.raises(ModelError, match="export refused"):
        export_segmenter(loaded, out, [read_image(paths[0])], max_abs_diff=-1.0)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_export_clears_what_a_killed_export_left_behind(model_and_images, tmp_path: Path) -> None:
    """A kill mid-export leaves a hidden staging folder; the next export into that folder removes it."""
    import os
    import time

    loaded, images = model_and_images
    out = tmp_path / "model"
    stale = tmp_path / ".model.abc123.partial"
    fresh = tmp_path / ".model.def456.partial"  # maybe another export still running: kept
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / MODEL_FILE).write_bytes(b"half")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    export_segmenter(loaded, out, [read_image(p) for p in images[:1]])
    assert not stale.exists() and fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.def456.partial", "model"]


def test_corrupted_onnx_gives_a_clear_error(exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CARD_FILE).write_bytes((out / CARD_FILE).read_bytes())
    (broken / MODEL_FILE).write_bytes((out / MODEL_FILE).read_bytes()[:5000])
    with pytest.raises(ModelError, match="not the model its card describes"):
        load_exported(broken)  # the card's hash catches it before onnxruntime sees it
    card = json.loads((out / CARD_FILE).read_text())
    del card["files"]  # a card without file hashes: onnxruntime's own check must still give a clear error
    (broken / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_exported(broken)
    image = tmp_path / "image.png"
    import cv2

    cv2.imwrite(str(image), np.zeros((20, 20), np.uint8))
    assert cli_main(["predict", str(broken), str(image), "--out", str(tmp_path / "masks")]) == ModelError.exit_code
    assert "not a valid ONNX model" in capsys.readouterr().err
    assert not (tmp_path / "masks").exists()
    with pytest.raises(ModelError, match="not an exported model folder"):
        load_exported(tmp_path)


def test_wrong_input_gives_a_clear_error(exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = exported
    model = load_exported(out)
    with pytest.raises(ModelError, match="expected an H×W×C image"):
        model.probability(np.zeros((16, 16), np.float32))
    model.card["input"]["channels"] = 1  # a card that lies about the input: onnxruntime refuses, clearly
    with pytest.raises(ModelError, match="refused the input"):
        model.probability(np.zeros((16, 16, 1), np.float32))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    assert cli_main(["predict", str(out), str(not_an_image), "--out", str(tmp_path / "masks")]) != 0
    assert "not a readable image" in capsys.readouterr().err


def test_predict_runs_without_torch() -> None:
    """Production inference must not need torch: importing the predictor loads none of it."""
    import subprocess
    import sys

    code = "import sys, defect_studio.predict as p; p.load_exported; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
