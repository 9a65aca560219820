"""The CAM cache, the `cam` job and the `defect-studio cam` command."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_studio.errors import ProjectError
from defect_studio.jobs import CancelToken, JobCancelled, run_job
from defect_studio.ml.cam_cache import (
    HEATMAP_BAND_ROWS,
    CamCache,
    cam_job,
    decode_heatmap_png,
    encode_heatmap_png,
    quantise_heatmap,
    read_heatmap_png,
)
from defect_studio.ml.cams import CamSettingsError, default_settings
from defect_studio.workflow_settings import load_workflow_settings

IMAGE_SHA = "a" * 64
CHECKPOINT_SHA = "b" * 64



def test_heatmap_png_round_trip_is_16_bit_exact() -> None:
    cam_map = np.random.default_rng(0).random((13, 29)).astype(np.float32)
    decoded = decode_heatmap_png(encode_heatmap_png(cam_map))
    assert decoded is not None and decoded.shape == cam_map.shape and decoded.dtype == np.float32
    assert np.abs(decoded - cam_map).max() <= 0.5 / 65535 + 1e-7
    assert decode_heatmap_png(b"not a png") is None


def test_a_tall_map_is_quantised_by_bands_as_it_was_whole() -> None:
    rng = np.random.default_rng(1)
    cam_map = rng.random((3 * HEATMAP_BAND_ROWS + 17, 40), dtype=np.float32) * 1.2 - 0.1  # some outside [0, 1]
    cam_map[5, 5] = np.nan
    whole = np.clip(np.nan_to_num(cam_map) * 65535.0 + 0.5, 0, 65535.0).astype(np.uint16)  # before bands
    np.testing.assert_array_equal(quantise_heatmap(cam_map), whole)
    half = cam_map.astype(np.float16)  # a tiled CAM: the float32 values it holds, quantised alike
    np.testing.assert_array_equal(quantise_heatmap(half), quantise_heatmap(half.astype(np.float32)))
    decoded = decode_heatmap_png(encode_heatmap_png(cam_map))
    assert decoded is not None
    np.testing.assert_array_equal(decoded, whole.astype(np.float32) / 65535.0)


def test_a_large_images_map_is_read_as_float16_band_by_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above one segmenter tile of pixels (lowered here) a cached map reads back as float16, 2 bytes a pixel
    as `tiled_cam` made it; every value is the float32 reading rounded to float16. Smaller maps stay float32."""
    from defect_studio.ml import cam_cache

    rng = np.random.default_rng(2)
    cam_map = rng.random((2 * HEATMAP_BAND_ROWS + 9, 30), dtype=np.float32)
    encoded = encode_heatmap_png(cam_map)
    exact = decode_heatmap_png(encoded)
    monkeypatch.setattr(cam_cache, "WHOLE_IMAGE_MAX_PIXELS", cam_map.size - 1)
    large = decode_heatmap_png(encoded)
    assert exact is not None and exact.dtype == np.float32 and large is not None and large.dtype == np.float16
    np.testing.assert_array_equal(large, exact.astype(np.float16))
    monkeypatch.setattr(cam_cache, "WHOLE_IMAGE_MAX_PIXELS", cam_map.size)
    assert decode_heatmap_png(encoded).dtype == np.float32


def test_a_large_maps_float16_values_take_the_place_of_its_16_bit_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a large map holds 2 bytes a pixel and a band, not its 16-bit pixels and the float16 map side by
    side (4 bytes a pixel): each band is converted over the pixels' own bytes."""
    from defect_studio.ml import cam_cache

    height, width = 40 * HEATMAP_BAND_ROWS, 100
    cam_map = np.random.default_rng(4).random((height, width), dtype=np.float32)
    encoded = encode_heatmap_png(cam_map)
    exact = decode_heatmap_png(encoded)
    monkeypatch.setattr(cam_cache, "WHOLE_IMAGE_MAX_PIXELS", 1000)
    tracemalloc.start()
    try:
        large = decode_heatmap_png(encoded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert large is not None and large.dtype == np.float16
    np.testing.assert_array_equal(large, exact.astype(np.float16))
    band_budget = 4 * HEATMAP_BAND_ROWS * width * 2  # a band's float32 values, with room
    assert peak <= 2 * cam_map.size + band_budget < 3 * cam_map.size


def test_cache_miss_then_hit(tmp_path: Path) -> None:
    cache = CamCache(tmp_path)
    cam_map = np.linspace(0, 1, 60, dtype=np.float32).reshape(6, 10)
    assert cache.get(IMAGE_SHA, CHECKPOINT_SHA, "fgbp", {}) is None
    path = cache.put(IMAGE_SHA, CHECKPOINT_SHA, "fgbp", {}, cam_map)
    assert path.is_relative_to(tmp_path / "cams")
    hit = cache.get(IMAGE_SHA, CHECKPOINT_SHA, "fgbp", {})
    assert hit is not None
    np.testing.assert_allclose(hit, cam_map, atol=1e-4)
    # the same settings spelled out in full are the same entry; the cams folder itself works too
    assert CamCache(tmp_path / "cams").get(IMAGE_SHA, CHECKPOINT_SHA, "fgbp", default_settings("fgbp")) is not None


def test_every_part_of_the_key_matters(tmp_path: Path) -> None:
    cache = CamCache(tmp_path)
    cache.put(IMAGE_SHA, CHECKPOINT_SHA, "region-aware", {"gamma": 0.5}, np.zeros((4, 4), np.float32))
    assert cache.get(IMAGE_SHA, CHECKPOINT_SHA, "region-aware", {}) is not None  # 0.5 is the default
    assert cache.get("c" * 64, CHECKPOINT_SHA, "region-aware", {}) is None
    assert cache.get(IMAGE_SHA, "d" * 64, "region-aware", {}) is None
    assert cache.get(IMAGE_SHA, CHECKPOINT_SHA, "fgbp", {}) is None
    assert cache.get(IMAGE_SHA, CHECKPOINT_SHA, "region-aware", {"gamma": 1.0}) is None
    assert cache.get(IMAGE_SHA, CHECKPOINT_SHA, "region-aware", {"stages": [2, 3, 4]}) is None
    with pytest.raises(CamSettingsError):
        cache.get(IMAGE_SHA, CHECKPOINT_SHA, "region-aware", {"no_such_setting": 1})


def test_a_damaged_cache_file_is_a_miss(tmp_path: Path) -> None:
    cache = CamCache(tmp_path)
    path = cache.put(IMAGE_SHA, CHECKPOINT_SHA, "gradcam", {}, np.ones((3, 3), np.float32))
    path.write_bytes(b"\x89PNG truncated")
    assert cache.get(IMAGE_SHA, CHECKPOINT_SHA, "gradcam", {}) is None
    assert not path.exists()


# --------------------------------------------------------------------------------------------
# the job and the command, on a small project with an (untrained) project classifier


@pytest.fixture
def project_with_classifier(tmp_path: Path):
    from defect_studio import demo
    from defect_studio.ml.classifier import checkpoint_bytes
    from defect_studio.ml.models import ClassifierConfig, build_classifier
    from defect_studio.ml.preprocess import Preprocessing
    from defect_studio.project import Project
    from defect_studio.project.importer import import_job

    dataset = demo.make_demo_dataset(tmp_path / "data", count=8, size=48)
    project = Project.create(tmp_path / "project", dataset / "images")
    run_job(import_job(project, dataset / "images", dataset / "labels.csv", CancelToken()))
    config = ClassifierConfig(arch="compact", width=8, input_size=64, output_stride=16, channels=1)
    torch.manual_seed(0)
    model = build_classifier(config).eval()
    preprocessing = Preprocessing(input_size=64, channels=1)
    checkpoint = project.models_dir / "classifier-test.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(checkpoint_bytes(model, config, preprocessing, 0.5, {}, [], 0))
    project.record_training_run("classifier", config.to_dict(), 0, {}, checkpoint, [])
    yield project
    project.close()


def test_cam_job_computes_caches_and_writes_pngs(project_with_classifier, tmp_path: Path) -> None:
    project = project_with_classifier
    images = project.images()
    first = run_job(cam_job(project, "region-aware", {"gamma": "1"}, CancelToken(), write_png_dir=tmp_path / "png"))
    assert first["images"] == len(images) and first["computed"] == len(images) and first["cached"] == 0
    assert first["settings"]["gamma"] == 1.0
    second = run_job(cam_job(project, "region-aware", {"gamma": 1.0}, CancelToken()))
    assert second["computed"] == 0 and second["cached"] == len(images)
    cache = CamCache(project.cache_dir)
    for record in images:
        heatmap = read_heatmap_png(tmp_path / "png" / f"{record.stem}.png")
        assert heatmap is not None and heatmap.shape == (record.height, record.width)
        cached = cache.get(record.sha256, first["checkpoint_sha256"], "region-aware", {"gamma": 1.0})
        np.testing.assert_allclose(cached, heatmap)
    third = run_job(cam_job(project, "gradcam", None, CancelToken(), image_ids=[images[0].id]))
    assert third["images"] == 1 and third["computed"] == 1


def test_cam_job_cancels_between_batches(project_with_classifier) -> None:
    cancel = CancelToken()
    job = cam_job(project_with_classifier, "fgbp", None, cancel, batch_size=2)
    events = []
    with pytest.raises(JobCancelled):
        for event in job:
            events.append(event)
            if event.step == 2:
                cancel.cancel()
    assert events[-1].step == 2  # no batch started after the cancel


def test_cam_job_refuses_bad_settings_before_loading_anything(project_with_classifier) -> None:
    with pytest.raises(CamSettingsError, match="no setting"):
        run_job(cam_job(project_with_classifier, "fgbp", {"q": 0.5}, CancelToken()))


def test_cam_command(project_with_classifier, tmp_path: Path, capsys) -> None:
    from defect_studio.cli import main

    path = project_with_classifier.path
    project_with_classifier.close()  # the command opens the project itself
    code = main(["cam", str(path), "--method", "fgbp", "--set", "fgbp_quantile=0.8", "--set", "stages=2,3,4",
                 "--png-dir", str(tmp_path / "maps")])
    assert code == 0
    output = capsys.readouterr().out
    assert '"fgbp_quantile": 0.8' in output and '"stages": [2, 3, 4]' in output
    assert len(list((tmp_path / "maps").glob("*.png"))) == 8
    assert main(["cam", str(path), "--method", "fgbp", "--set", "nonsense"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_cam_shards_split_the_images_read_only_beside_an_open_project(project_with_classifier, capsys) -> None:
    from defect_studio.cli import main
    from defect_studio.project import Project

    project = project_with_classifier  # stays open (and locked) while the shards run: they only read it
    path = project.path
    for shard in ("1/3", "2/3", "3/3"):
        assert main(["cam", str(path), "--method", "fgbp", "--set", "fgbp_quantile=0.8", "--shard", shard]) == 0
    output = capsys.readouterr().out
    counts = [int(line.split(" maps")[0].split()[-1]) for line in output.splitlines() if " maps (shard" in line]
    assert counts == [3, 3, 2] and "(shard 3 of 3)" in output
    assert load_workflow_settings(project).cam_settings.get("fgbp", {}).get("fgbp_quantile") != 0.8  # a shard saves nothing
    project.close()
    assert main(["cam", str(path), "--method", "fgbp", "--set", "fgbp_quantile=0.8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["result"]
    assert result["computed"] == 0 and result["cached"] == 8  # the shards left every map in the cache
    assert main(["cam", str(path), "--shard", "4/3"]) == 2
    assert "shard" in capsys.readouterr().err
    with Project.open_for_reading(path) as reader, pytest.raises(ProjectError, match="readonly database"):
        reader.set_setting("anything", 1)


def test_large_images_get_their_cams_by_tiles_and_every_reader_finds_them(project_with_classifier, monkeypatch) -> None:
    """Above one segmenter tile of pixels a CAM is computed by tiles at the image's own resolution (here the
    limit is lowered so the demo's 48 px images count as large); the map is the tiled one, cached under a key
    of its own, so a whole-image map an earlier version cached for the same image is never read for it."""
    from defect_studio.imageio import read_image
    from defect_studio.ml import cam_cache
    from defect_studio.ml.classifier import load_classifier
    from defect_studio.ml.tiled_cams import tiled_cam
    from defect_studio.ml.tiling import Tiling

    project = project_with_classifier
    image = project.images()[0]
    run = project.latest_run("classifier")
    classifier = load_classifier(run.checkpoint_path, "cpu")
    size = (image.height, image.width)
    stale = np.full(size, 0.5, np.float32)  # what a version without tiles cached for this image
    CamCache(project.cache_dir).put(image.sha256, classifier.checkpoint_sha256, "gradcam", {}, stale)

    monkeypatch.setattr(cam_cache, "WHOLE_IMAGE_MAX_PIXELS", 40 * 40)
    small_tiles = Tiling("auto", 32, 8, 40 * 40)
    monkeypatch.setattr("defect_studio.ml.tiled_cams.cam_tiling", lambda classifier: small_tiles)
    result = run_job(cam_job(project, "gradcam", {}, CancelToken(), image_ids=[image.id]))
    assert result["computed"] == 1 and result["by_tiles"] == 1, "the stale whole-image map is not taken"
    cached = CamCache(project.cache_dir).get(image.sha256, classifier.checkpoint_sha256, "gradcam", {}, size)
    expected = tiled_cam(classifier, read_image(image.path), "gradcam", {}, small_tiles)
    assert cached is not None and cached.shape == size
    np.testing.assert_allclose(cached, expected, atol=1e-4)
    again = run_job(cam_job(project, "gradcam", {}, CancelToken(), image_ids=[image.id]))
    assert again["cached"] == 1 and again["computed"] == 0
