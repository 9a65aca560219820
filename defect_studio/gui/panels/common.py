"""Small pieces the stage panels (and the window's status bar) share: project settings the panels
read, config forms, a progress row, the ETA's wording."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Callable, Sequence

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from defect_studio.gui.workers import JobRunner
from defect_studio.jobs import Progress
from defect_studio.ml.cams.registry import CamSpec
from defect_studio.ml.cams.settings import CamSettingsError
from defect_studio.project import Project
from defect_studio.workflow_settings import load_workflow_settings


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def training_threads() -> int:
    """Torch threads for a training job started from the window: one fewer than the cores, so the
    GUI thread always has a core to paint on."""
    return max(1, (os.cpu_count() or 2) - 1)


def proposal_method(project: Project) -> str:
    """The CAM method the project's proposals come from: the latest round's (what the refinement
    loop continues with), else the one chosen for the project (Review tab, `pseudo --method`)."""
    rounds = project.rounds()
    try:
        spec = CamSpec.from_record(rounds[-1].config) if rounds else None
    except CamSettingsError:  # a round of a method this version does not know
        spec = None
    return spec.method if spec is not None else load_workflow_settings(project).cam_method


def cam_settings_for(project: Project | None, method: str) -> dict[str, Any]:
    """The project's settings of the CAM `method` (only those changed from the defaults): what the CAM
    tab shows and what proposals are made with, from the app or the command line."""
    if project is None:
        return {}
    return dict(load_workflow_settings(project).cam_settings.get(method, {}))


class ConfigForm(QWidget):
    """A form for chosen fields of a config dataclass, with the dataclass's defaults and types."""

    def __init__(
        self, config_type: type, fields: list[tuple[str, str, str]], parent: QWidget | None = None,
        choices: dict[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(parent)
        self.config_type = config_type
        self.choices = dict(choices or {})
        self.combos: dict[str, QComboBox] = {}
        self._editors: dict[str, Callable[[], Any]] = {}
        self._setters: dict[str, Callable[[Any], None]] = {}
        defaults = config_type()
        hints = typing.get_type_hints(config_type)
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
        known = {field.name for field in dataclasses.fields(config_type)}
        for name, label, tip in fields:
            if name not in known:
                continue
            value = getattr(defaults, name)
            hint = hints.get(name)
            widget = self._editor_for(name, value, hint)
            widget.setToolTip(tip)
            widget.setObjectName(f"config_{name}")
            layout.addRow(label, widget)

    def _editor_for(self, name: str, value: Any, hint: Any) -> QWidget:
        if name in self.choices:
            combo = QComboBox(self)
            combo.addItems(list(self.choices[name]))
            combo.setCurrentText(str(value))
            self.combos[name] = combo
            self._editors[name] = combo.currentText
            self._setters[name] = lambda v, c=combo: c.setCurrentText(str(v))
            return combo
        if isinstance(value, bool):
            box = QCheckBox(self)
            box.setChecked(value)
            self._editors[name] = box.isChecked
            self._setters[name] = lambda v, b=box: b.setChecked(bool(v))
            return box
        if isinstance(value, int):
            spin = QSpinBox(self)
            spin.setRange(0, 1_000_000)
            spin.setValue(value)
            self._editors[name] = spin.value
            self._setters[name] = lambda v, s=spin: s.setValue(int(v))
            return spin
        if isinstance(value, float) or (value is None and hint is not None and float in typing.get_args(hint)):
            spin = QDoubleSpinBox(self)
            spin.setDecimals(5 if (value or 0) < 0.01 else 3)
            spin.setRange(0.0, 1e7)
            spin.setSingleStep(abs(value or 1.0) / 10 or 0.1)
            optional = value is None or type(None) in typing.get_args(hint)
            if optional:
                spin.setSpecialValueText("none")  # 0 means None for optional floats
            spin.setValue(float(value or 0.0))
            self._editors[name] = (lambda s=spin, o=optional: None if (o and s.value() == 0.0) else s.value())
            self._setters[name] = lambda v, s=spin: s.setValue(float(v or 0.0))
            return spin
        edit = QLineEdit(str(value) if value is not None else "", self)
        self._editors[name] = lambda e=edit: e.text().strip() or None
        self._setters[name] = lambda v, e=edit: e.setText("" if v is None else str(v))
        return edit

    def values(self) -> dict[str, Any]:
        return {name: getter() for name, getter in self._editors.items()}

    def set_values(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            setter = self._setters.get(name)
            if setter is not None:
                setter(value)

    def config(self, **overrides: Any) -> Any:
        # Built anew, not replaced on the defaults: a setting the form does not show then takes the default
        # that goes with the chosen values (the classifier's per-backbone defaults).
        return self.config_type(**{**self.values(), **overrides})


class JobRow(QWidget):
    """Progress bar + ETA + Cancel for one runner."""

    def __init__(self, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.bar = QProgressBar(self)
        self.bar.setRange(0, 1000)
        self.bar.setValue(0)
        self.bar.setFormat("")
        self.eta_label = QLabel("", self)
        self.eta_label.setMinimumWidth(90)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setObjectName("cancelButton")
        self.cancel_button.setToolTip("Stop the job; the previous results stay as they were")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(runner.cancel)
        layout.addWidget(self.bar, 1)
        layout.addWidget(self.eta_label)
        layout.addWidget(self.cancel_button)
        runner.started.connect(self._started)
        runner.progress.connect(self._progress)
        runner.finished.connect(self._finished)

    def _started(self, title: str) -> None:
        self.bar.setRange(0, 0)
        self.bar.setFormat(title)
        self.eta_label.setText("")
        self.cancel_button.setEnabled(True)

    def _progress(self, event: Progress) -> None:
        if event.total:
            self.bar.setRange(0, 1000)
            self.bar.setValue(int(1000 * (event.fraction or 0.0)))
            self.bar.setFormat(f"{event.stage} {event.step}/{event.total}")
        else:
            self.bar.setFormat(event.message or event.stage)
        self.eta_label.setText(f"{format_eta(event.eta_s)} left" if event.eta_s is not None else "")

    def _finished(self, outcome: str) -> None:
        self.bar.setRange(0, 1000)
        self.bar.setValue(1000 if outcome == "succeeded" else self.bar.value())
        self.bar.setFormat({"succeeded": "done", "cancelled": "cancelled", "failed": "failed"}.get(outcome, outcome))
        self.eta_label.setText("")
        self.cancel_button.setEnabled(False)
