"""CAM methods: agreement with pytorch-grad-cam, FGBP and region-aware behaviour, model hygiene, settings."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from cam_fixtures import BlobStandIn, ResNetStandIn, StandInClassifier, TinyStandIn, WithClassAxis, blob_image  # noqa: E402

from defect_studio.ml import cams  # noqa: E402
from defect_studio.ml.preprocess import Preprocessing  # noqa: E402

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402



@pytest.fixture(scope="module")
def resnet_classifier() -> StandInClassifier:
    rng = np.random.default_rng(5)
    good = [rng.random((80, 80, 1), dtype=np.float32) for _ in range(4)]
    defects = [rng.random((70, 60, 1), dtype=np.float32) for _ in range(2)]
    return StandInClassifier(ResNetStandIn(), Preprocessing(input_size=96)).with_good_prior(good).with_affinity(defects, good)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((70, 90, 1), dtype=np.float32), rng.random((96, 50, 1), dtype=np.float32)]


def reference_maps(model: nn.Module, cam_class: type, stage: int, batch: torch.Tensor) -> np.ndarray:
    with cam_class(WithClassAxis(model), [model.stages[stage - 1]]) as reference:
        return reference(batch, [ClassifierOutputTarget(0)] * len(batch))


REFERENCES = [("gradcam", GradCAM), ("gradcampp", GradCAMPlusPlus), ("layercam", LayerCAM)]


@pytest.mark.parametrize("method,cam_class", REFERENCES)
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_baselines_equal_pytorch_grad_cam_per_stage(resnet_classifier, images, method, cam_class, stage) -> None:
    batch, _ = resnet_classifier.preprocessing.prepare_batch(images)
    expected = reference_maps(resnet_classifier.model, cam_class, stage, batch)
    settings = {"stage": stage} if method != "layercam" else {"stages": [stage]}
    ours = np.stack(cams.compute_cams_at_input(resnet_classifier, images, method, settings))
    assert ours.shape == expected.shape
    assert expected.max() > 0.5  # a real map, not an all-zero one that would match anything
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_fused_layercam_is_the_maximum_of_the_reference_stage_maps(resnet_classifier, images) -> None:
    batch, _ = resnet_classifier.preprocessing.prepare_batch(images)
    per_stage = [reference_maps(resnet_classifier.model, LayerCAM, stage, batch) for stage in (2, 3, 4)]
    ours = np.stack(cams.compute_cams_at_input(resnet_classifier, images, "layercam", {"stages": [2, 3, 4]}))
    np.testing.assert_allclose(ours, np.maximum.reduce(per_stage), atol=1e-4)


def test_baselines_match_on_the_projects_own_dilated_classifier(images) -> None:
    from defect_studio.ml import models
    model = models.build_classifier(models.ClassifierConfig(arch="compact", width=8, output_stride=8, input_size=64)).eval()
    with torch.no_grad():  # non-trivial weights in the zero-initialised residual branches
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    classifier = StandInClassifier(model, Preprocessing(input_size=64))
    batch, _ = classifier.preprocessing.prepare_batch(images)
    for method, cam_class in REFERENCES:
        expected = reference_maps(model, cam_class, 4, batch)
        settings = {"stage": 4} if method != "layercam" else {"stages": [4]}
        ours = np.stack(cams.compute_cams_at_input(classifier, images, method, settings))
        np.testing.assert_allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("method", cams.CAM_METHODS)
def test_maps_are_at_the_original_resolution_in_unit_range(resnet_classifier, method) -> None:
    rng = np.random.default_rng(1)
    shapes = [(37, 121, 1), (96, 96, 3), (200, 64, 1)]  # an RGB image for a gray classifier too
    maps = cams.compute_cams(resnet_classifier, [rng.random(s, dtype=np.float32) for s in shapes], method, batch_size=2)
    for cam_map, shape in zip(maps, shapes):
        assert cam_map.shape == shape[:2]
        assert cam_map.dtype == np.float32
        assert cam_map.min() >= 0.0 and cam_map.max() <= 1.0
        assert cam_map.max() == pytest.approx(1.0)


def test_large_images_are_fused_at_input_resolution_then_resized(monkeypatch) -> None:
    from defect_studio.ml.cams import compute

    classifier = StandInClassifier(BlobStandIn(), Preprocessing(input_size=128, normalisation="none"))
    image, _ = blob_image((360, 480), [(120, 300, 28, 0.9)], seed=7)
    on_canvas = {m: cams.compute_cam(classifier, image, m) for m in ("layercam", "region-aware")}
    parts = cams.compute_region_aware_parts(classifier, [image])[0]
    monkeypatch.setattr(compute, "_work_geometry", lambda geometry: geometry)  # fuse at full resolution
    for method, cam_map in on_canvas.items():
        assert cam_map.shape == (360, 480) and cam_map.max() == pytest.approx(1.0)
        full = cams.compute_cam(classifier, image, method)
        assert np.corrcoef(cam_map.ravel(), full.ravel())[0, 1] > 0.95
    assert parts.regions.shape == (360, 480) and np.all(parts.fused[parts.regions == 0] == 0)


def test_batching_does_not_change_the_maps(resnet_classifier, images) -> None:
    together = cams.compute_cams(resnet_classifier, images, "region-aware", batch_size=8)
    alone = [cams.compute_cam(resnet_classifier, image, "region-aware") for image in images]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the model is left exactly as it was


def model_state(model: nn.Module) -> dict:
    return {
        "modules": [(name, id(module), type(module)) for name, module in model.named_modules()],
        "training": [module.training for module in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            + len(getattr(m, "_backward_pre_hooks", {}))
            for m in model.modules()
        ),
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("modules", "training", "requires_grad", "grads", "hooks"):
        assert before[key] == after[key], key
    for name, value in before["weights"].items():
        assert torch.equal(value, after["weights"][name]), name


@pytest.mark.parametrize("method", cams.CAM_METHODS)
def test_the_model_is_left_exactly_as_it_was(method, images) -> None:
    model = ResNetStandIn(seed=3)
    model.train()
    model.stages[1].eval()  # a mixed state must come back mixed
    for parameter in model.stages[0].parameters():
        parameter.requires_grad_(False)
    classifier = StandInClassifier(model, Preprocessing(input_size=64)).with_good_prior(images).with_affinity(images, images)
    before = model_state(model)
    with torch.no_grad():  # callers inside no_grad still get maps
        maps = cams.compute_cams(classifier, images, method)
    assert [m.shape for m in maps] == [image.shape[:2] for image in images]
    assert_same_state(before, model_state(model))


def test_the_model_is_restored_when_the_pass_fails(images) -> None:
    model = ResNetStandIn(seed=4)
    relus_before = [(name, id(m)) for name, m in model.named_modules() if isinstance(m, nn.ReLU)]

    def explode(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        raise RuntimeError("boom")

    handle = model.stages[3].register_forward_hook(explode)
    classifier = StandInClassifier(model, Preprocessing(input_size=64))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cams.compute_cams(classifier, images, "fgbp")
    finally:
        handle.remove()
    assert [(name, id(m)) for name, m in model.named_modules() if isinstance(m, nn.ReLU)] == relus_before
    assert not any(isinstance(m, cams.GuidedReLU) for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_guided_relus_swap_every_relu_including_reused_ones() -> None:
    model = ResNetStandIn()
    relu_slots = sum(
        1 for parent in model.modules() for child in parent._modules.values() if isinstance(child, nn.ReLU)
    )
    with cams.guided_relus(model) as swapped:
        assert swapped == relu_slots
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, cams.GuidedReLU) for m in model.modules())


def test_guided_gating_passes_only_positive_input_and_positive_gradient() -> None:
    values = torch.tensor([-1.0, 2.0, 3.0, 0.5], requires_grad=True)
    output = cams.GuidedReLU()(values)
    output.backward(torch.tensor([5.0, -1.0, 2.0, 0.0]))
    assert values.grad.tolist() == [0.0, 0.0, 2.0, 0.0]


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_a_thousand_calls_leak_no_hooks_and_no_memory() -> None:
    model = TinyStandIn()
    image = np.random.default_rng(0).random((30, 40, 1), dtype=np.float32)
    classifier = StandInClassifier(model, Preprocessing(input_size=32)).with_good_prior([image]).with_affinity([image], [image])
    relus = [(name, id(m)) for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    methods = cams.CAM_METHODS
    for call in range(100):  # warm up allocator caches before measuring
        cams.compute_cam(classifier, image, methods[call % len(methods)])
    gc.collect()
    tensors_before = sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)
    memory_before = rss_mb()
    for call in range(1000):
        cams.compute_cam(classifier, image, methods[call % len(methods)])
    gc.collect()
    assert rss_mb() - memory_before < 30.0
    assert sum(1 for o in gc.get_objects() if type(o) is torch.Tensor) <= tensors_before
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not getattr(module, "_backward_pre_hooks", {})
    assert [(name, id(m)) for name, m in model.named_modules() if isinstance(m, nn.ReLU)] == relus
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------
# FGBP and region-aware on a hand-built detector whose answer is known


@pytest.fixture(scope="module")
def blob_classifier() -> StandInClassifier:
    return StandInClassifier(BlobStandIn(), Preprocessing(input_size=128, normalisation="none"))


def test_fgbp_and_region_aware_peak_on_the_defect(blob_classifier) -> None:
    image, defect = blob_image((60, 80), [(20, 50, 8, 0.9)], seed=1)
    for method in ("fgbp", "region-aware", "layercam"):
        cam_map = cams.compute_cam(blob_classifier, image, method)
        peak = np.unravel_index(np.argmax(cam_map), cam_map.shape)
        assert defect[peak], method


def test_region_aware_is_zero_outside_salient_regions_and_cleaner_than_fgbp(blob_classifier) -> None:
    image, defect = blob_image((60, 80), [(20, 50, 8, 0.9)], seed=2)
    parts = cams.compute_region_aware_parts(blob_classifier, [image])[0]
    assert parts.regions.max() >= 1
    assert np.all(parts.fused[parts.regions == 0] == 0)
    assert parts.regions[defect].min() >= 1  # the defect lies inside a region
    fgbp = cams.compute_cam(blob_classifier, image, "fgbp")
    far = ~np.pad(defect, 0)  # background, where stage-1 texture responses live
    assert fgbp[far].mean() > 0.01  # the shallow stage does fire on texture ...
    assert parts.fused[far].mean() < fgbp[far].mean() / 2  # ... and region-aware suppresses it


def test_stage_offsets_match_the_geometry_of_stride_2_convolutions() -> None:
    # a 3x3, stride-2, padding-1 convolution centres output cell i on input pixel 2i, half a cell before the
    # upsampling grid's 2i + 0.5; four of them in a row put stage l's cells (2^l - 1) / 2 pixels early
    offsets = cams.stage_offsets(BlobStandIn(), (1, 128, 128), torch.device("cpu"))
    for index, expected in enumerate((-0.5, -1.5, -3.5, -7.5)):
        assert offsets[index] == pytest.approx((expected, expected), abs=1.0)


# method.md's stages for a ResNet-style network (the defaults follow the EfficientNet classifier's)
ALL_STAGES = {"stages": [1, 2, 3, 4], "salient_stages": [4]}


@pytest.mark.parametrize("seed,centre", [(7, (60, 150)), (8, (120, 60))])
def test_aligned_region_aware_peaks_on_the_defect_and_unaligned_misses(blob_classifier, seed, centre) -> None:
    image, defect = blob_image((180, 240), [(*centre, 14, 0.9)], seed=seed)

    def peak(settings: dict) -> tuple[int, int]:
        cam_map = cams.compute_cam(blob_classifier, image, "region-aware", {**ALL_STAGES, **settings})
        return np.unravel_index(np.argmax(cam_map), cam_map.shape)

    assert defect[peak({})]
    assert not defect[peak({"align_stages": False})]  # deep maps sit half a stage-4 cell down-right


def test_contrast_weights_are_normalised_and_switchable(blob_classifier) -> None:
    image, _ = blob_image((60, 80), [(20, 50, 8, 0.9)], seed=3)
    weighted = cams.compute_region_aware_parts(blob_classifier, [image], ALL_STAGES)[0]
    uniform = cams.compute_region_aware_parts(blob_classifier, [image], {**ALL_STAGES, "contrast_weights": False})[0]
    for weights in weighted.weights.values():
        assert sum(weights.values()) == pytest.approx(1.0)
        assert len(set(np.round(list(weights.values()), 6))) > 1  # stages differ in contrast
    for weights in uniform.weights.values():
        assert set(weights.values()) == {0.25}
    assert not np.allclose(weighted.fused, uniform.fused)


def test_per_region_normalisation_lifts_a_faint_defect(blob_classifier) -> None:
    image, _ = blob_image((90, 128), [(22, 22, 8, 0.9), (66, 100, 6, 0.4)], seed=4)
    settings = {**ALL_STAGES, "region_threshold": 0.25, "deep_gating": False}
    with_norm = cams.compute_region_aware_parts(blob_classifier, [image], settings)[0]
    without = cams.compute_region_aware_parts(blob_classifier, [image], {**settings, "per_region_normalisation": False})[0]
    faint = with_norm.regions == with_norm.regions[66, 100]
    assert with_norm.regions[66, 100] != with_norm.regions[22, 22]  # two separate regions
    assert with_norm.fused[faint].max() > without.fused[faint].max() + 0.1


def test_settings_change_the_map_as_specified(blob_classifier, resnet_classifier, images) -> None:
    image, _ = blob_image((60, 80), [(20, 50, 8, 0.9)], seed=5)

    def ra(**settings: object) -> np.ndarray:
        return cams.compute_cam(blob_classifier, image, "region-aware", settings)

    # gamma = 0 is the same as no deep gating; gamma > 0 changes the map
    np.testing.assert_allclose(ra(gamma=0.0), ra(deep_gating=False), atol=1e-6)
    assert not np.allclose(ra(gamma=0.5), ra(deep_gating=False))
    # a higher region threshold can only shrink the support
    assert np.count_nonzero(ra(region_threshold=0.6)) <= np.count_nonzero(ra(region_threshold=0.1))
    assert np.count_nonzero(ra(region_threshold=0.6)) < np.count_nonzero(ra(region_threshold=0.01))
    # q = 0 keeps every gradient: the same as switching the magnitude filter off
    fgbp = lambda **s: cams.compute_cams(resnet_classifier, images, "fgbp", s)[0]  # noqa: E731
    np.testing.assert_allclose(fgbp(fgbp_quantile=0.0), fgbp(magnitude_filter=False), atol=1e-6)
    assert not np.allclose(fgbp(fgbp_quantile=0.9), fgbp(magnitude_filter=False))
    assert not np.allclose(fgbp(guided=False), fgbp(guided=True))
    assert not np.allclose(fgbp(stages=[4]), fgbp(stages=[1, 2, 3, 4]))


def test_magnitude_filter_keeps_the_top_fraction_per_image() -> None:
    gradient = torch.randn(3, 4, 10, 10)
    gradient[1] *= 100  # a loud image must not set the threshold of the quiet ones
    kept = cams.magnitude_filter(gradient, 0.9)
    for index in range(3):
        fraction = (kept[index] != 0).float().mean().item()
        assert 0.09 <= fraction <= 0.11
        threshold = torch.quantile(gradient[index].abs().flatten(), 0.9, interpolation="lower")
        assert torch.equal(kept[index] != 0, gradient[index].abs() >= threshold)


# --------------------------------------------------------------------------------------------
# settings


def test_every_method_has_defaults_and_bad_settings_are_refused() -> None:
    assert cams.CAM_METHODS == ("gradcam", "gradcampp", "layercam", "fgbp", "region-aware", "good-prior", "affinity-walk")
    ra = cams.default_settings("region-aware")
    assert ra["fgbp_quantile"] == 0.9 and ra["region_threshold"] == 0.2 and ra["gamma"] == 0.5
    assert ra["region_margin_cells"] == 1.0 and ra["salient_stages"] == [3] and ra["good_prior"] == "deep"
    assert cams.default_settings("fgbp")["stages"] == [2, 3]
    ra["gamma"] = 9  # a copy: changing it does not change the defaults
    assert cams.default_settings("region-aware")["gamma"] == 0.5
    with pytest.raises(cams.CamSettingsError, match="no setting"):
        cams.resolve_settings("fgbp", {"gama": 1})
    with pytest.raises(cams.CamSettingsError, match="unknown CAM method"):
        cams.default_settings("scorecam")
    with pytest.raises(cams.CamSettingsError, match="within"):
        cams.resolve_settings("fgbp", {"fgbp_quantile": 1.5})
    with pytest.raises(cams.CamSettingsError, match="stages"):
        cams.resolve_settings("layercam", {"stages": [0, 5]})
    with pytest.raises(cams.CamSettingsError, match="off, multiply, deep"):
        cams.resolve_settings("region-aware", {"good_prior": "always"})
    with pytest.raises(cams.CamSettingsError, match="at least 1"):
        cams.resolve_settings("good-prior", {"neighbours": 0})
    with pytest.raises(cams.CamSettingsError, match="true or false"):
        cams.resolve_settings("fgbp", {"guided": "maybe"})
    with pytest.raises(cams.CamSettingsError, match="0..256"):
        cams.resolve_settings("affinity-walk", {"steps": 300})
    with pytest.raises(cams.CamSettingsError, match="within"):
        cams.resolve_settings("affinity-walk", {"beta": 0})


def test_command_line_strings_are_coerced_and_canonical() -> None:
    parsed = cams.resolve_settings("region-aware", {"fgbp_quantile": "0.8", "stages": "2,3,4", "guided": "false", "gamma": "1"})
    assert parsed["fgbp_quantile"] == 0.8 and parsed["stages"] == [2, 3, 4]
    assert parsed["guided"] is False and parsed["gamma"] == 1.0
    assert cams.resolve_settings("layercam", {"stages": "[4, 2]"})["stages"] == [2, 4]
    assert cams.canonical_settings("fgbp", {}) == cams.canonical_settings("fgbp", cams.default_settings("fgbp"))
    assert cams.canonical_settings("fgbp", {"fgbp_quantile": 0.8}) != cams.canonical_settings("fgbp", {})


def test_the_settings_module_loads_without_torch() -> None:
    import subprocess

    code = "import sys, defect_studio.ml.cams, defect_studio.cli.cam_cmds; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_input_scale_looks_at_the_image_larger_and_keeps_the_original_frame(blob_classifier) -> None:
    """input_scale 2: the network sees the image at twice its training size; the map is still one value per
    original pixel, finer (a different map), and it still peaks on the defect."""
    image, defect = blob_image((60, 80), [(20, 50, 5, 0.9)], seed=3)
    at_training_size = cams.compute_cam(blob_classifier, image, "fgbp")
    larger = cams.compute_cam(blob_classifier, image, "fgbp", {"input_scale": 2})
    assert larger.shape == at_training_size.shape == image.shape[:2]
    assert not np.allclose(larger, at_training_size)
    assert defect[np.unravel_index(np.argmax(larger), larger.shape)]
    with pytest.raises(cams.CamSettingsError, match="0.25..4"):
        cams.resolve_settings("layercam", {"input_scale": 10})
