"""CAM settings schemas: every parameter of method.md with its default, and how a value is checked
(no torch here). The methods themselves, and which schema each has, are in `registry`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from defect_studio.errors import ConfigError

PRIOR_FUSIONS = ("off", "multiply", "deep")
STAGE_COUNT = 4


class CamSettingsError(ConfigError):
    """An unknown CAM method, an unknown setting, or a setting value of the wrong kind."""


@dataclass(frozen=True)
class SettingSpec:
    name: str
    default: Any
    description: str


def _stage_specs(default: list[int], what: str) -> SettingSpec:
    return SettingSpec("stages", default, f"stages (1 = finest, stride 4 ... 4 = deepest) {what}")


# Stage defaults measured on MT with the default EfficientNet-Lite0 classifier (docs/benchmarks/cams-mt.md):
# its stride-8 and stride-16 stages (2-3) outline defects; the stride-32 stage (4) is too coarse and, fused by
# the maximum, swamps them (FGBP 0.19 with stages 1-4, 0.30 with 2-3).
_FGBP_SPECS = (
    _stage_specs([2, 3], "fused by the element-wise maximum"),
    SettingSpec("guided", True, "guided-backprop gating at every ReLU (gradient passes where input > 0 and gradient > 0)"),
    SettingSpec("magnitude_filter", True, "keep only the largest gradient magnitudes of each stage"),
    SettingSpec("fgbp_quantile", 0.9, "q: keep gradients with |G| >= the q-quantile of |G| per stage and image"),
    SettingSpec("align_stages", True, "shift each stage map onto its cells' measured receptive-field centres "
                "(stride-2 convolutions centre a cell half a cell off the usual upsampling grid)"),
)

_REGION_SPECS = (
    _stage_specs([2, 3], "whose FGBP maps are fused inside the salient regions"),
    SettingSpec("guided", True, "guided-backprop gating at every ReLU"),
    SettingSpec("magnitude_filter", True, "keep only the largest gradient magnitudes of each stage"),
    SettingSpec("fgbp_quantile", 0.9, "q of the FGBP magnitude filter"),
    SettingSpec("salient_stages", [3], "stages whose FGBP maps (max-fused) form the deep map R"),
    SettingSpec("align_stages", True, "shift each stage map onto its cells' measured receptive-field centres "
                "(stride-2 convolutions centre a cell half a cell off the usual upsampling grid)"),
    SettingSpec("region_threshold", 0.2, "tau_r: salient regions are the connected components of R >= tau_r"),
    SettingSpec("region_margin_cells", 1.0, "margin added around each region, in cells of the deepest salient stage"),
    SettingSpec("per_region_normalisation", True, "min-max normalise each stage map inside each region"),
    SettingSpec("contrast_weights", True, "weight stages per region by mean inside / mean in a ring around it"),
    SettingSpec("ring_cells", 1.0, "width of the ring around a region, in cells of the deepest salient stage"),
    SettingSpec("deep_gating", True, "multiply the fused map by R_soft^gamma"),
    SettingSpec("gamma", 0.5, "exponent of the soft deep gating"),
    SettingSpec("good_prior", "deep", "the good-image prior: off; multiply (the fused map times prior^power); "
                "deep (the deep map R times the prior, so regions must also look unlike every good image)"),
    SettingSpec("prior_power", 1.0, "exponent of the good-image prior where it is used"),
)

_PRIOR_SPECS = (
    SettingSpec("neighbours", 1, "the distance to this many nearest good locations, averaged"),
)

# Every method: the network may look at the image larger than the classifier was trained at (finer maps).
_INPUT_SCALE = SettingSpec("input_scale", 1.0, "the network input at this multiple of the classifier's input size "
                           "(above 1: finer maps for small defects, at the square of the cost)")

GRADCAM_SPECS = (SettingSpec("stage", 4, "stage whose activations and mean gradients make the map"), _INPUT_SCALE)
GRADCAMPP_SPECS = (SettingSpec("stage", 4, "stage whose activations and second-order weights make the map"), _INPUT_SCALE)
LAYERCAM_SPECS = (_stage_specs([1, 2, 3, 4], "fused by the element-wise maximum"), _INPUT_SCALE)
FGBP_SPECS = (*_FGBP_SPECS, _INPUT_SCALE)
REGION_AWARE_SPECS = (*_REGION_SPECS, _INPUT_SCALE)
GOOD_PRIOR_SPECS = (*_PRIOR_SPECS, _INPUT_SCALE)
# Measured on MT (docs/method-notes.md section 13): longer walks bleed a defect into its background.
AFFINITY_WALK_SPECS = (
    SettingSpec("beta", 8.0, "sharpness: the affinities to this power (higher: the walk stops at fainter edges)"),
    SettingSpec("steps", 16, "steps of the random walk (more: the CAM spreads further over similar surface)"),
)


def coerce_setting(method: str, name: str, default: Any, value: Any) -> Any:
    """`value` for the setting `name` of `method` (whose default is `default`), checked and of the default's kind."""
    where = f"setting {name!r} of {method}"
    if isinstance(value, str):  # from the command line: JSON, or a comma list, or a bare word
        text = value.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if isinstance(default, list):
                value = [part for part in text.strip("[]").split(",") if part.strip()]
            elif isinstance(default, bool) and text.lower() in ("yes", "no", "on", "off"):
                value = text.lower() in ("yes", "on")
            else:
                value = text
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise CamSettingsError(f"{where} must be true or false, got {value!r}.")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise CamSettingsError(f"{where} must be a whole number, got {value!r}.")
        value = int(value)
        if name == "stage" and not 1 <= value <= STAGE_COUNT:
            raise CamSettingsError(f"{where} must be within 1..{STAGE_COUNT}, got {value}.")
        if name == "neighbours" and value < 1:
            raise CamSettingsError(f"{where} must be at least 1, got {value}.")
        if name == "steps" and not 0 <= value <= 256:
            raise CamSettingsError(f"{where} must be within 0..256, got {value}.")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise CamSettingsError(f"{where} must be a number, got {value!r}.")
        value = float(value)
        if name in ("fgbp_quantile", "region_threshold") and not 0.0 <= value < 1.0:
            raise CamSettingsError(f"{where} must be within [0, 1), got {value}.")
        if name in ("gamma", "region_margin_cells", "ring_cells", "prior_power") and value < 0.0:
            raise CamSettingsError(f"{where} must not be negative, got {value}.")
        if name == "beta" and not 0.0 < value <= 64.0:
            raise CamSettingsError(f"{where} must be within (0, 64], got {value}.")
        if name == "input_scale" and not 0.25 <= value <= 4.0:
            raise CamSettingsError(f"{where} must be within 0.25..4, got {value}.")
        return value
    if isinstance(default, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            raise CamSettingsError(f"{where} must be a non-empty list of stages, e.g. [2, 3, 4], got {value!r}.")
        stages = sorted({_stage_number(v, where, value) for v in value})
        if any(not 1 <= s <= STAGE_COUNT for s in stages):
            raise CamSettingsError(f"{where}: stages are numbered 1..{STAGE_COUNT}, got {value!r}.")
        return stages
    if name == "good_prior" and value not in PRIOR_FUSIONS:
        raise CamSettingsError(f"{where} must be one of {', '.join(PRIOR_FUSIONS)}, got {value!r}.")
    return value


def _stage_number(item: Any, where: str, value: Any) -> int:
    """One stage of a list: a whole number, as JSON gives it or as text from a comma list ("2, 3")."""
    try:
        number = float(item) if not isinstance(item, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or not number.is_integer():  # "2.5", "1e400" and "x" are no stage
        raise CamSettingsError(f"{where} must list whole stage numbers, got {value!r}.")
    return int(number)
