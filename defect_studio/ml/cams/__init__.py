"""Class activation maps: Grad-CAM, Grad-CAM++, LayerCAM, FGBP and the region-aware CAM.

`registry` (the methods, their labels, settings and defaults) and `settings` (the settings' checks)
load without torch; the computation (`compute`) is
imported on first use of one of its names, so `from defect_studio.ml.cams import compute_cams`
works as usual while the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from defect_studio.ml.cams.registry import (
    CAM_METHODS,
    CAM_REGISTRY,
    DEFAULT_CAM_METHOD,
    SETTING_SPECS,
    CamMethod,
    CamSpec,
    cam_method,
    canonical_settings,
    check_method,
    default_settings,
    method_label,
    resolve_settings,
)
from defect_studio.ml.cams.settings import STAGE_COUNT, CamSettingsError, SettingSpec

_COMPUTE_NAMES = frozenset({
    "compute_cams", "compute_cam", "compute_cams_at_input", "compute_region_aware_parts", "RegionAwareParts",
    "GuidedReLU", "guided_relus", "eval_mode", "capture_stage_outputs", "stage_activations_and_gradients",
    "defect_score", "feature_stage_maps", "gradcam_map", "gradcampp_map", "layercam_map", "fgbp_map",
    "magnitude_filter", "normalise_like_reference", "region_aware_fusion", "minmax", "stage_offsets", "CamComputation",
})

__all__ = [
    "CAM_METHODS", "CAM_REGISTRY", "DEFAULT_CAM_METHOD", "SETTING_SPECS", "STAGE_COUNT", "CamMethod", "CamSettingsError",
    "CamSpec", "SettingSpec", "cam_method", "canonical_settings", "check_method", "default_settings", "method_label",
    "resolve_settings", *sorted(_COMPUTE_NAMES),
]


def __getattr__(name: str) -> Any:
    if name in _COMPUTE_NAMES:
        return getattr(importlib.import_module("defect_studio.ml.cams.compute"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
