"""The project's workflow settings: the choices that shape results, in one record both faces read and write.

The CAM method that proposals come from and every method's settings, the pseudo-label thresholds, and the
classifier's and the segmenter's training settings. The window's forms show and save them; the commands
start from them and save what their options set (`defect-studio pseudo` uses the CAM settings chosen in
the app, and the app shows the thresholds last used on the command line).

Stored as one project setting (`workflow`), plain JSON. Projects made before it kept some of these as
window-only settings (`gui.*`); they are read once, the first time the record is loaded, and the record
is written. A stored value that no longer resolves (a method or setting this version does not know) is
dropped with a warning, so an old or hand-edited project still opens.

Free of torch and Qt. It sits beside the project store rather than in it: it checks values with the CAM
registry and the configs' own fields (`ml`), which the store does not know about; the refinement jobs
(`ml.refine`) read it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from defect_studio.errors import DefectStudioError
from defect_studio.ml.cams.registry import CAM_METHODS, DEFAULT_CAM_METHOD, CamSpec

if TYPE_CHECKING:
    from defect_studio.project.store import Project

logger = logging.getLogger(__name__)

WORKFLOW_SETTING = "workflow"
# The window-only settings of earlier versions, read once into the record.
OLD_GUI_SETTINGS = {
    "gui.proposal_method": "cam_method",
    "gui.cam_settings": "cam_settings",
    "gui.segmenter_config": "segmenter",
    "gui.classifier_config": "classifier",
}
# Training settings of this machine, not of the results: never kept in the project.
MACHINE_SETTINGS = frozenset({"device", "threads"})


@dataclass
class WorkflowSettings:
    cam_method: str = DEFAULT_CAM_METHOD  # the CAM the proposals come from
    cam_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # {method: settings changed from its defaults}
    pseudo: dict[str, Any] = field(default_factory=dict)  # pseudo-label settings chosen (the rest: defaults)
    segmenter: dict[str, Any] = field(default_factory=dict)  # segmenter settings chosen
    classifier: dict[str, Any] = field(default_factory=dict)  # classifier settings chosen

    def cam_spec(self, method: str | None = None) -> CamSpec:
        """`method` (default: the proposals' method) with the settings chosen for it, resolved."""
        name = method or self.cam_method
        return CamSpec.resolve(name, self.cam_settings.get(name))

    def with_cam_spec(self, spec: CamSpec, use_for_proposals: bool = False) -> "WorkflowSettings":
        """The record with `spec`'s settings kept for its method (only those that differ from the defaults,
        so default maps share one cache key); with `use_for_proposals`, its method made the proposals' one."""
        settings = {**self.cam_settings, spec.method: spec.changed_settings()}
        return dataclasses.replace(self, cam_settings=settings,
                                   cam_method=spec.method if use_for_proposals else self.cam_method)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, values: Mapping[str, Any] | None) -> "WorkflowSettings":
        """The record from stored JSON, keeping every value that still resolves (see the module's note)."""
        values = dict(values or {}) if isinstance(values, Mapping) else {}
        record = cls()
        method = values.get("cam_method")
        if method in CAM_METHODS:
            record.cam_method = method
        elif method is not None:
            logger.warning("workflow settings: unknown CAM method %r, using %s", method, DEFAULT_CAM_METHOD)
        for name, settings in (values.get("cam_settings") or {}).items() if isinstance(values.get("cam_settings"), Mapping) else ():
            try:
                record = record.with_cam_spec(CamSpec.resolve(name, settings if isinstance(settings, Mapping) else None))
            except DefectStudioError as error:
                logger.warning("workflow settings: %s settings dropped (%s)", name, error)
        for name in ("pseudo", "segmenter", "classifier"):
            stored = values.get(name)
            if isinstance(stored, Mapping):
                setattr(record, name, _known(name, stored))
        return record


def _config_fields(name: str) -> set[str]:
    from defect_studio.ml.classifier_options import ClassifierConfig
    from defect_studio.ml.pseudo import PseudoLabelSettings
    from defect_studio.ml.segmenter_options import SegmenterConfig

    config_type = {"pseudo": PseudoLabelSettings, "segmenter": SegmenterConfig, "classifier": ClassifierConfig}[name]
    return {f.name for f in dataclasses.fields(config_type)}


def _known(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The stored settings that the config still has (its own checks run when the config is made)."""
    if name == "classifier" and "lr" in values:  # the classifier's learning rate by its earlier name
        values = {"learning_rate": values["lr"], **{k: v for k, v in values.items() if k != "lr"}}
    known = _config_fields(name) - MACHINE_SETTINGS
    dropped = sorted(set(values) - known)
    if dropped:
        logger.warning("workflow settings: %s settings dropped: %s", name, ", ".join(dropped))
    return {key: value for key, value in values.items() if key in known}


def load_workflow_settings(project: "Project") -> WorkflowSettings:
    """The project's record; the first time, made from the settings an earlier version kept (and saved)."""
    stored = project.get_setting(WORKFLOW_SETTING)
    if stored is not None:
        return WorkflowSettings.from_stored(stored)
    old = {field_name: project.get_setting(key) for key, field_name in OLD_GUI_SETTINGS.items()}
    record = WorkflowSettings.from_stored({name: value for name, value in old.items() if value is not None})
    if not project.read_only:  # a reader (a shard) uses the record as made; the next writer saves it
        save_workflow_settings(project, record)
    return record


def save_workflow_settings(project: "Project", record: WorkflowSettings) -> None:
    if project.get_setting(WORKFLOW_SETTING) != record.to_dict():  # a write only when something changed
        project.set_setting(WORKFLOW_SETTING, record.to_dict())


def update_workflow_settings(project: "Project", **changes: Any) -> WorkflowSettings:
    """Load, change the named fields (`pseudo=`, `segmenter=`... merged over the stored ones), save; the record.
    Settings of this machine (device, threads) are left out."""
    record = load_workflow_settings(project)
    for name, value in changes.items():
        current = getattr(record, name)
        if isinstance(current, dict):
            value = {**current, **{k: v for k, v in dict(value).items() if k not in MACHINE_SETTINGS}}
        setattr(record, name, value)
    save_workflow_settings(project, record)
    return record
