"""The classifier: letterbox preprocessing, the model contract, training, checkpoints, cancel, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from defect_studio.dataset_layout import load_dataset
from defect_studio.errors import DataError, ModelError
from defect_studio.imageio import file_sha256, read_image
from defect_studio.jobs import CancelToken, JobCancelled, run_job
from defect_studio.ml.classifier import (
    VALIDATION_SEED_SETTING,
    load_classifier,
    train_classifier_job,
    train_project_classifier_job,
    validation_split,
)
from defect_studio.ml.metrics import auroc
from defect_studio.ml.models import ClassifierConfig, build_classifier
from defect_studio.ml.preprocess import Geometry, Preprocessing, letterbox_geometry

# Small enough to train in seconds on two shared cores, big enough to learn the demo defects.
# One thread: on a shared CPU, two OpenMP threads can be 10x slower than one.
TINY = dict(arch="compact", width=8, input_size=64, epochs=8, min_epochs=8, batch_size=8, lr=5e-3, seed=0, augment=False, threads=1)



def _samples(dataset: Path, split: str) -> list[tuple[Path, str, str]]:
    return [(s.image_path, s.label, file_sha256(s.image_path)) for s in load_dataset(dataset) if s.split == split]


@pytest.fixture(scope="module")
def trained(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    checkpoint = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    events = []
    result = run_job(
        train_classifier_job(_samples(demo_dataset, "train"), ClassifierConfig(**TINY), checkpoint, CancelToken(), "cpu",
                             evaluation=_samples(demo_dataset, "test")),
        events.append,
    )
    return result, events


# ---------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(37, 91), (91, 37), (64, 64), (300, 17), (1, 5), (250, 333)])
@pytest.mark.parametrize("input_size", [64, 97])
def test_letterbox_coordinates_round_trip_exactly(size: tuple[int, int], input_size: int) -> None:
    geometry = letterbox_geometry(size, input_size)
    height, width = size
    assert geometry.resized_size[0] <= input_size and geometry.resized_size[1] <= input_size
    assert max(geometry.resized_size) == input_size  # fills one side: no wasted resolution
    for x, y in [(0, 0), (width - 1, height - 1), (width // 2, height // 3), (0.25, 7.5)]:
        back = geometry.input_to_original_xy(*geometry.original_to_input_xy(x, y))
        assert back == pytest.approx((x, y), abs=1e-9)


@pytest.mark.parametrize("size", [(60, 150), (150, 60), (250, 333), (40, 40), (7, 300)])
def test_to_original_puts_every_input_value_back_on_its_pixel(size: tuple[int, int]) -> None:
    """A map whose value at each input pixel is the original coordinate it came from comes back as
    exactly the coordinate grid: bilinear resampling reproduces linear maps, so any shift or scale
    error in the inverse mapping would show."""
    geometry = letterbox_geometry(size, 128)
    height, width = size
    rows, cols = np.mgrid[0:128, 0:128].astype(np.float64)
    original_x, original_y = geometry.input_to_original_xy(cols, rows)
    back_x, back_y = geometry.to_original(original_x), geometry.to_original(original_y)
    assert back_x.shape == back_y.shape == size
    # bilinear sampling clamps at the border: check where the sample lies inside the content
    margin_x = int(np.ceil(width / geometry.resized_size[1])) + 1
    margin_y = int(np.ceil(height / geometry.resized_size[0])) + 1
    expected_y, expected_x = np.mgrid[0:height, 0:width]
    inner = (slice(margin_y, height - margin_y), slice(margin_x, width - margin_x))
    assert np.abs(back_x - expected_x)[inner].max() < 1e-3 if back_x[inner].size else True
    assert np.abs(back_y - expected_y)[inner].max() < 1e-3 if back_y[inner].size else True
    # a single pixel's forward position lands back on that pixel
    for x, y in [(3, 5), (width - 4, height - 2), (width // 2, height // 2)]:
        xi, yi = geometry.original_to_input_xy(x, y)
        assert geometry.input_to_original_xy(xi, yi) == pytest.approx((x, y))


def test_to_original_undoes_to_input_for_smooth_maps() -> None:
    geometry = letterbox_geometry((90, 200), 160)
    ramp = np.tile(np.linspace(0.0, 1.0, 200, dtype=np.float32), (90, 1))
    back = geometry.to_original(geometry.to_input(ramp))
    assert back.shape == (90, 200)
    assert np.abs(back - ramp)[:, 2:-2].max() < 0.01
    # a coarse (stage-4 sized) map of the input is accepted too
    assert geometry.to_original(np.ones((10, 10), np.float32)).shape == (90, 200)
    assert Geometry.from_dict(geometry.to_dict()) == geometry


def test_prepare_handles_gray_rgb_and_sixteen_bit(tmp_path: Path) -> None:
    import cv2

    rng = np.random.default_rng(0)
    gray16 = (rng.random((40, 70)) * 60000).astype(np.uint16)
    rgb8 = (rng.random((50, 30, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb8)
    for channels in (1, 3):
        pre = Preprocessing(input_size=64, channels=channels)
        for name in ("g16.png", "rgb.png"):
            tensor, geometry = pre.prepare(read_image(tmp_path / name))
            assert tensor.shape == (channels, 64, 64) and tensor.dtype == torch.float32
            assert torch.isfinite(tensor).all()
            valid = torch.from_numpy(geometry.valid_mask())
            assert (tensor[:, ~valid] == 0).all()  # padding is the neutral value
            assert tensor[:, valid].abs().max() > 0.5
    batch, geometries = Preprocessing(input_size=64).prepare_batch([read_image(tmp_path / "g16.png")] * 2)
    assert batch.shape == (2, 1, 64, 64) and len(geometries) == 2


def test_per_image_normalisation_ignores_exposure() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((50, 60, 1)).astype(np.float32) * 0.5
    pre = Preprocessing(input_size=64)
    darker = pre.prepare(image * 0.6 + 0.1)[0]
    assert torch.allclose(pre.prepare(image)[0], darker, atol=1e-4)
    assert Preprocessing.from_dict(pre.to_dict()) == pre


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("output_stride,expected", [(32, [4, 8, 16, 32]), (16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])])
@pytest.mark.parametrize("arch", ["compact", "resnet18", "efficientnet-lite0"])
def test_four_stages_with_the_promised_strides(arch: str, output_stride: int, expected: list[int]) -> None:
    model = build_classifier(ClassifierConfig(arch=arch, width=8, output_stride=output_stride)).eval()
    assert len(model.stages) == 4
    x = torch.randn(2, 1, 64, 64)
    features = model.features(x)
    assert [64 // f.shape[-1] for f in features] == expected
    assert model(x).shape == (2,)


@pytest.mark.parametrize("pooling", ["avg", "max", "topk", "lse"])
def test_relu_modules_carry_every_non_linearity(pooling: str) -> None:
    """Swapping every nn.ReLU for the identity must make the network linear (so FGBP can gate them all)."""
    model = build_classifier(ClassifierConfig(arch="compact", width=8, pooling="avg")).eval()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, nn.Identity())
    # without ReLU (and max-pool in the stem, the one other non-linearity) the network is affine in x
    model.stem[-1] = nn.Identity()
    x, y = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)
    zero = model(torch.zeros_like(x))
    assert torch.allclose(model(x + y) - zero, (model(x) - zero) + (model(y) - zero), atol=1e-3)
    pooled = build_classifier(ClassifierConfig(arch="compact", width=8, pooling=pooling))
    assert any(isinstance(m, nn.ReLU) for m in pooled.modules())


def test_pretrained_weights_that_do_not_match_give_a_clear_error(tmp_path: Path) -> None:
    wrong = tmp_path / "resnet34.pth"
    torch.save(build_classifier(ClassifierConfig(arch="resnet34")).state_dict(), wrong)
    with pytest.raises(ModelError, match="do not match"):
        build_classifier(ClassifierConfig(arch="resnet18", pretrained=str(wrong)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable"):
        build_classifier(ClassifierConfig(arch="resnet18", pretrained=str(garbage)))


def test_matching_pretrained_weights_are_loaded(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_classifier(ClassifierConfig(arch="resnet18", channels=3, pretrained=str(path)))
    assert torch.equal(model.stages[0][0].conv1.weight, reference.layer1[0].conv1.weight)


# ---------------------------------------------------------------------------------------------- training


def test_training_learns_the_demo_defects(trained) -> None:
    result, events = trained
    assert events[0].stage == "load" and "device" in events[0].message
    epochs = [e for e in events if e.stage == "train"]
    assert len(epochs) == result.epochs_run and all("val_auroc" in e.metrics and "loss" in e.metrics for e in epochs)
    assert epochs[-1].eta_s is not None
    assert result.metrics["train_auroc"] > 0.9  # chance is 0.5
    assert epochs[0].metrics["loss"] > min(e.metrics["loss"] for e in epochs)


def test_checkpoint_round_trips_with_weights_only(trained, demo_dataset: Path) -> None:
    result, _ = trained
    payload = torch.load(result.checkpoint_path, weights_only=True)
    assert payload["config"]["width"] == TINY["width"] and payload["preprocessing"]["input_size"] == 64
    assert payload["seed"] == 0 and "torch" in payload["versions"]
    assert set(payload["image_hashes"]) == set(result.train_hashes) | set(result.validation_hashes)
    loaded = load_classifier(result.checkpoint_path)
    assert not loaded.model.training and loaded.checkpoint_sha256 == file_sha256(result.checkpoint_path)
    test = [(p, label) for p, label, _ in _samples(demo_dataset, "test")]
    scores = loaded.predict_scores([read_image(p) for p, _ in test])
    assert scores.shape == (len(test),) and ((scores >= 0) & (scores <= 1)).all()
    assert auroc(np.array([label == "defect" for _, label in test]), scores) == pytest.approx(result.metrics["test_auroc"], abs=1e-3)


def test_cancel_keeps_the_previous_model(trained, demo_dataset: Path, tmp_path: Path) -> None:
    result, _ = trained
    checkpoint = tmp_path / "classifier.pt"
    checkpoint.write_bytes(result.checkpoint_path.read_bytes())
    before = checkpoint.read_bytes()
    cancel = CancelToken()

    def cancel_after_an_epoch(event) -> None:
        if event.stage == "train":
            cancel.cancel()

    job = train_classifier_job(_samples(demo_dataset, "train"), ClassifierConfig(**{**TINY, "seed": 1}), checkpoint, cancel, "cpu")
    with pytest.raises(JobCancelled):
        run_job(job, cancel_after_an_epoch)
    assert checkpoint.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["classifier.pt"]  # no temporary left behind


def test_one_class_gives_a_clear_error(demo_dataset: Path, tmp_path: Path) -> None:
    good = [s for s in _samples(demo_dataset, "train") if s[1] == "good"]
    with pytest.raises(DataError, match="both good and defect"):
        run_job(train_classifier_job(good, ClassifierConfig(**TINY), tmp_path / "c.pt", CancelToken(), "cpu"))
    assert not (tmp_path / "c.pt").exists()


def test_bad_checkpoints_give_model_errors(trained, tmp_path: Path) -> None:
    result, _ = trained
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(result.checkpoint_path.read_bytes()[: 5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    mismatched = tmp_path / "mismatched.pt"
    payload = torch.load(result.checkpoint_path, weights_only=True)
    payload["config"]["width"] = 16
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    mismatched.write_bytes(buffer.getvalue())
    for path, message in [(corrupt, "not a readable"), (foreign, "not a defect-studio"), (mismatched, "do not match"),
                          (tmp_path / "missing.pt", "no such file")]:
        with pytest.raises(ModelError, match=message):
            load_classifier(path)


def test_validation_split_is_stratified_and_stable() -> None:
    items = [(f"g{i}", "good") for i in range(60)] + [(f"d{i}", "defect") for i in range(20)]
    held = validation_split(items, 0.2, seed=3)
    assert 0 < len(held & {k for k, l in items if l == "defect"}) < 20
    assert 0 < len(held & {k for k, l in items if l == "good"}) < 60
    more = validation_split(items + [(f"n{i}", "good") for i in range(30)], 0.2, seed=3)
    assert held <= more  # tagging more images does not move those already placed
    assert validation_split(items, 0.2, seed=4) != held


def test_project_training_records_a_run_and_keeps_the_validation_split(demo_project: Path) -> None:
    from defect_studio.project import Project

    config = ClassifierConfig(**{**TINY, "epochs": 2, "min_epochs": 2})
    with Project.open(demo_project) as project:
        first = run_job(train_project_classifier_job(project, config, CancelToken(), "cpu"))
        seed = project.get_setting(VALIDATION_SEED_SETTING)
        second = run_job(train_project_classifier_job(project, ClassifierConfig(**{**TINY, "epochs": 2, "min_epochs": 2, "seed": 5}), CancelToken(), "cpu"))
        runs = project.training_runs("classifier")
        assert [r.checkpoint_path.name for r in runs] == ["classifier-1.pt", "classifier-2.pt"]
        assert project.get_setting(VALIDATION_SEED_SETTING) == seed
        assert second.validation_hashes == first.validation_hashes
        assert runs[-1].checkpoint_sha256 == file_sha256(second.checkpoint_path)
        tagged = {r.sha256 for r in project.images() if r.tag in ("good", "defect")}
        assert set(runs[-1].dataset_hashes) == tagged


def test_project_with_one_class_gives_a_clear_error(demo_project: Path) -> None:
    from defect_studio.project import Project

    with Project.open(demo_project) as project:
        project.set_tags([r.id for r in project.images(tag="defect")], "good")
        with pytest.raises(DataError, match="both good and defect"):
            run_job(train_project_classifier_job(project, ClassifierConfig(**TINY), CancelToken(), "cpu"))
        assert project.training_runs("classifier") == []


def test_train_command(demo_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from defect_studio.cli import main

    code = main(["train", str(demo_project), "--arch", "compact", "--epochs", "2", "--width", "8", "--input-size", "64", "--device", "cpu",
                 "--threads", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "classifier-1.pt" in out and "validation AUROC" in out
    assert main(["train", str(demo_project), "--pretrained", str(demo_project / "nothing.pth")]) == ModelError.exit_code


def test_small_images_are_not_enlarged_to_the_default_input() -> None:
    from defect_studio.ml.classifier import fit_input_size

    assert fit_input_size(ClassifierConfig(), 128).input_size == 128  # the demo: 4x less compute than 256
    assert fit_input_size(ClassifierConfig(), 150).input_size == 160
    assert fit_input_size(ClassifierConfig(), 20).input_size == 64
    assert fit_input_size(ClassifierConfig(), 1000).input_size == 256  # larger images: the configured input
    assert fit_input_size(ClassifierConfig(arch="compact", input_size=96), 300).input_size == 96
