"""The CAM method is a value: one registry (name, label, settings, computation), a resolved spec passed down,
one stored key, the default named once; adding a method is one entry and its computation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defect_studio.ml import cams
from defect_studio.ml.cams import registry
from defect_studio.ml.cams.registry import CAM_REGISTRY, CamMethod, CamSpec
from tests.cam_fixtures import ResNetStandIn, StandInClassifier

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "defect_studio"


def test_every_method_has_a_label_a_settings_schema_and_a_computation():
    from defect_studio.ml.cams.compute import CamComputation

    assert cams.CAM_METHODS == tuple(CAM_REGISTRY) and cams.DEFAULT_CAM_METHOD in CAM_REGISTRY
    for name, method in CAM_REGISTRY.items():
        assert method.name == name and method.label and method.settings
        assert isinstance(method.load_computation(), CamComputation)
        assert cams.SETTING_SPECS[name] == method.settings
    assert cams.method_label("gradcampp") == "Grad-CAM++" and cams.method_label("retired-method") == "retired-method"


def test_listing_and_resolving_methods_loads_no_torch():
    script = ("import sys\nfrom defect_studio.ml.cams import CAM_METHODS, CamSpec\nimport defect_studio.cli.cam_cmds\n"
              "import defect_studio.workflow_settings\n"
              "[CamSpec.resolve(m) for m in CAM_METHODS]\nsys.exit(1 if 'torch' in sys.modules else 0)\n")
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == 0


def test_a_spec_is_resolved_once_and_stored_under_one_key():
    spec = CamSpec.resolve("fgbp", {"stages": "3, 2", "guided": "false"})
    assert spec.settings["stages"] == [2, 3] and spec.settings["guided"] is False
    assert CamSpec.resolve(spec) is spec  # passed down as it is
    assert spec.changed_settings() == {"guided": False}  # [2, 3] is the default
    record = spec.to_record()
    assert record == {"cam_method": "fgbp", "cam_settings": spec.settings}
    assert CamSpec.from_record(record) == spec
    # Rounds made by the command line before there was one key stored the method as "method".
    assert CamSpec.from_record({"method": "layercam", "pseudo": {}}) == CamSpec.resolve("layercam")
    assert CamSpec.from_record({"pseudo": {}}) is None
    with pytest.raises(cams.CamSettingsError, match="unknown CAM method"):
        CamSpec.resolve("scorecam")


def test_the_default_method_is_named_once():
    """No module but the registry spells the default method as a default (a literal assigned to a name
    that says default, or a parameter's default value)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "ml" / "cams" / "registry.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value == cams.DEFAULT_CAM_METHOD:
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                offenders += [f"{path.name}:{node.lineno}" for name in names if "DEFAULT" in name.upper()]
            if isinstance(node, ast.arguments):
                offenders += [f"{path.name}:{d.lineno}" for d in node.defaults + node.kw_defaults
                              if isinstance(d, ast.Constant) and d.value == cams.DEFAULT_CAM_METHOD]
            if isinstance(node, ast.Call) and any(k.arg == "default" and isinstance(k.value, ast.Constant)
                                                  and k.value.value == cams.DEFAULT_CAM_METHOD for k in node.keywords):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_compute_takes_a_spec_or_a_name_with_settings():
    rng = np.random.default_rng(1)
    classifier = StandInClassifier(ResNetStandIn(), cams_preprocessing())
    images = [rng.random((60, 70, 1), dtype=np.float32)]
    by_name = cams.compute_cams(classifier, images, "layercam", {"stages": [2, 3]})
    by_spec = cams.compute_cams(classifier, images, CamSpec.resolve("layercam", {"stages": [2, 3]}))
    np.testing.assert_array_equal(by_name[0], by_spec[0])


def cams_preprocessing():
    from defect_studio.ml.preprocess import Preprocessing

    return Preprocessing(input_size=64)


# A method added for the test: one registry entry and its computation (here: the mean of two LayerCAM stages).
def _mean_of_stages(maps, settings):
    return (maps.placed[2] + maps.placed[3]) / 2


def _layer_map(activation, gradient, settings):
    from defect_studio.ml.cams.compute import layercam_map

    return layercam_map(activation, gradient)


def _make_mean_layercam():
    from defect_studio.ml.cams.compute import CamComputation

    return CamComputation(stages=lambda s: [2, 3], stage_map=_layer_map, fuse=_mean_of_stages)


MEAN_LAYERCAM = None


def test_adding_a_method_is_one_entry_and_its_computation(monkeypatch, tmp_path):
    global MEAN_LAYERCAM
    MEAN_LAYERCAM = _make_mean_layercam()
    entry = CamMethod("mean-layercam", "Mean LayerCAM", (cams.SettingSpec("input_scale", 1.0, "input scale"),),
                      f"{__name__}:MEAN_LAYERCAM")
    monkeypatch.setitem(CAM_REGISTRY, entry.name, entry)

    rng = np.random.default_rng(2)
    classifier = StandInClassifier(ResNetStandIn(), cams_preprocessing())
    image = rng.random((64, 64, 1), dtype=np.float32)
    added = cams.compute_cam(classifier, image, "mean-layercam")
    two = [cams.compute_cam(classifier, image, "layercam", {"stages": [s]}) for s in (2, 3)]
    assert added.shape == (64, 64) and 0.0 <= added.min() and added.max() <= 1.0
    assert np.corrcoef(added.ravel(), (two[0] + two[1]).ravel())[0, 1] > 0.9  # the same stages, averaged
    # It is cached and labelled like any other, and refused where the registry does not have it.
    from defect_studio.ml.cam_cache import CamCache

    CamCache(tmp_path).put("a" * 64, "b" * 64, "mean-layercam", {}, added)
    assert CamCache(tmp_path).get("a" * 64, "b" * 64, "mean-layercam") is not None
    assert registry.method_label("mean-layercam") == "Mean LayerCAM"
    monkeypatch.delitem(CAM_REGISTRY, entry.name)
    with pytest.raises(cams.CamSettingsError):
        CamSpec.resolve("mean-layercam")
