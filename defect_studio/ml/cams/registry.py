"""The CAM methods as values: one registry entry per method (name, label, settings schema, computation).

No torch here: each entry names its computation (a `CamComputation` in `compute`) as "module:attribute",
imported on first use, so the command line and the GUI list, label and validate methods without loading
torch. Adding a method means one entry here and its computation.

A `CamSpec` is a method with its settings resolved (defaults filled in, every value checked): built
once where a choice enters (the CLI's options, the GUI's form, a stored record) and passed down.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from defect_studio.ml.cams.settings import (
    AFFINITY_WALK_SPECS,
    FGBP_SPECS,
    GOOD_PRIOR_SPECS,
    GRADCAM_SPECS,
    GRADCAMPP_SPECS,
    LAYERCAM_SPECS,
    REGION_AWARE_SPECS,
    CamSettingsError,
    SettingSpec,
    coerce_setting,
)

# What a project uses until its user chooses: FGBP. With the default pseudo-label thresholds (fixed 0.3 / 0.15) its
# round-0 proposals on MT score 0.233 / 0.270 / 0.218 (seeds 0-2); the region-aware CAM, whose maps peak so
# that its best threshold is about 0.1, scored 0.079-0.082 with the old defaults, no better than marking every
# pixel (method-notes section 15).
DEFAULT_CAM_METHOD = "fgbp"

# The keys a CAM choice is stored under (round configs, the project's workflow settings, mask provenance).
METHOD_KEY = "cam_method"
SETTINGS_KEY = "cam_settings"
_OLD_METHOD_KEY = "method"  # round configs written by the command line before there was one key

_COMPUTE = "defect_studio.ml.cams.compute"


@dataclass(frozen=True)
class CamMethod:
    name: str  # stored in projects and caches: never rename
    label: str  # for people
    settings: tuple[SettingSpec, ...]
    computation: str  # "module:attribute" of its CamComputation, imported on first use
    at_input: bool = False  # also computable in the network-input frame (the baselines pytorch-grad-cam has)

    def defaults(self) -> dict[str, Any]:
        """Every setting with its default (JSON-able; a fresh copy each call)."""
        return {spec.name: json.loads(json.dumps(spec.default)) for spec in self.settings}

    def load_computation(self) -> Any:
        module, _, attribute = self.computation.partition(":")
        return getattr(importlib.import_module(module), attribute)


CAM_REGISTRY: dict[str, CamMethod] = {method.name: method for method in (
    CamMethod("gradcam", "Grad-CAM", GRADCAM_SPECS, f"{_COMPUTE}:GRADCAM", at_input=True),
    CamMethod("gradcampp", "Grad-CAM++", GRADCAMPP_SPECS, f"{_COMPUTE}:GRADCAMPP", at_input=True),
    CamMethod("layercam", "LayerCAM", LAYERCAM_SPECS, f"{_COMPUTE}:LAYERCAM", at_input=True),
    CamMethod("fgbp", "FGBP", FGBP_SPECS, f"{_COMPUTE}:FGBP", at_input=True),
    CamMethod("region-aware", "Region-aware", REGION_AWARE_SPECS, f"{_COMPUTE}:REGION_AWARE"),
    CamMethod("good-prior", "Good-image prior", GOOD_PRIOR_SPECS, f"{_COMPUTE}:GOOD_PRIOR"),
    CamMethod("affinity-walk", "Affinity walk", AFFINITY_WALK_SPECS, "defect_studio.ml.affinity:AFFINITY_WALK"),
)}

CAM_METHODS = tuple(CAM_REGISTRY)
SETTING_SPECS: dict[str, tuple[SettingSpec, ...]] = {name: method.settings for name, method in CAM_REGISTRY.items()}


def cam_method(name: str) -> CamMethod:
    """The registry entry of `name`; a clear error for a name it does not have."""
    method = CAM_REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        raise CamSettingsError(f"unknown CAM method {name!r}; choose one of {', '.join(CAM_METHODS)}.")
    return method


def check_method(name: str) -> str:
    return cam_method(name).name


def method_label(name: str) -> str:
    """A method's name for people (the stored name for one the registry does not have)."""
    method = CAM_REGISTRY.get(name)
    return method.label if method is not None else str(name)


def default_settings(name: str) -> dict[str, Any]:
    """Every parameter of the method with its default (JSON-able; a fresh copy each call)."""
    return cam_method(name).defaults()


def resolve_settings(name: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overlaid with `settings`, validated and coerced (strings from the CLI are parsed)."""
    method = cam_method(name)
    resolved = method.defaults()
    for key, value in (settings or {}).items():
        if key not in resolved:
            known = ", ".join(resolved) or "none"
            raise CamSettingsError(f"{name} has no setting {key!r}; its settings are: {known}.")
        resolved[key] = coerce_setting(name, key, resolved[key], value)
    return resolved


def canonical_settings(name: str, settings: Mapping[str, Any] | None = None) -> str:
    """The resolved settings as one canonical JSON string (cache keys, provenance records)."""
    return json.dumps(resolve_settings(name, settings), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class CamSpec:
    """A CAM method with every setting resolved and checked; make one with `CamSpec.resolve`."""

    method: str
    settings: dict[str, Any]  # every setting of the method, checked

    @classmethod
    def resolve(cls, method: "str | CamSpec", settings: Mapping[str, Any] | None = None) -> "CamSpec":
        """The spec of `method` with `settings` over its defaults; a spec given as `method` gets `settings`
        over its own."""
        if isinstance(method, CamSpec):
            if not settings:
                return method
            return cls(method.method, resolve_settings(method.method, {**method.settings, **settings}))
        return cls(check_method(method), resolve_settings(method, settings))

    @classmethod
    def default(cls) -> "CamSpec":
        return cls.resolve(DEFAULT_CAM_METHOD)

    @property
    def entry(self) -> CamMethod:
        return cam_method(self.method)

    @property
    def label(self) -> str:
        return self.entry.label

    def changed_settings(self) -> dict[str, Any]:
        """Only the settings that differ from the method's defaults."""
        defaults = self.entry.defaults()
        return {name: value for name, value in self.settings.items() if value != defaults.get(name)}

    def canonical(self) -> str:
        return json.dumps(self.settings, sort_keys=True, separators=(",", ":"))

    def to_record(self) -> dict[str, Any]:
        """The spec under the keys every record stores it with (round configs, provenance)."""
        return {METHOD_KEY: self.method, SETTINGS_KEY: dict(self.settings)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> "CamSpec | None":
        """The spec a record stores; None when it names no method. Reads the command line's old
        `method` key of rounds made before there was one key."""
        record = record or {}
        name = record.get(METHOD_KEY) or record.get(_OLD_METHOD_KEY)
        if not name:
            return None
        settings = record.get(SETTINGS_KEY)
        return cls.resolve(str(name), settings if isinstance(settings, Mapping) else None)
