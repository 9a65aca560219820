"""CAM stage: the selected method's heatmap over the image, opacity, live threshold outline, and a
side-by-side comparison of all methods with linked zoom/pan. Maps come from the CAM cache, or
are computed for the shown image in the background (then cached by the core's `cam_job`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QLineEdit,
    QSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from defect_studio.gui.panels.common import JobRow, cam_settings_for, proposal_method
from defect_studio.gui.session import Session, Stage
from defect_studio.gui.viewer import HEATMAP_COLORMAPS, ImageViewer
from defect_studio.ml.cam_cache import CamCache, cam_job
from defect_studio.ml.cams.registry import CAM_METHODS, CamSpec, cam_method, method_label
from defect_studio.ml.cams.settings import STAGE_COUNT, CamSettingsError
from defect_studio.workflow_settings import load_workflow_settings, save_workflow_settings


def best_columns(count: int, width: float, height: float, image_width: float, image_height: float) -> int:
    """How many columns show `count` images of that shape largest in a width × height area."""

    def scale(columns: int) -> float:
        rows = -(-count // columns)
        return min(width / columns / image_width, height / rows / image_height)

    return max(range(1, count + 1), key=lambda columns: (scale(columns), -columns))


class CompareView(QWidget):
    """One viewer per method, zoom and pan linked to the first. The tiles take the image's shape and
    the largest size that fits the pane in the best grid, packed together and centred: no bands
    between rows, whatever the pane's shape."""

    SPACING = 2

    def __init__(self, methods: list[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("compareView")
        self.tiles = QWidget(self)
        self.tiles.setObjectName("compareTiles")
        self.grid = QGridLayout(self.tiles)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setSpacing(self.SPACING)
        self.columns = 0
        self.viewers: dict[str, ImageViewer] = {}
        for method in methods:
            viewer = ImageViewer(self.tiles, title=f" {method_label(method)} ")
            viewer.setObjectName(f"compare_{method}")
            viewer.setMinimumSize(1, 1)  # the tile size is set from the pane, not from the viewer
            if self.viewers:
                viewer.link_to(next(iter(self.viewers.values())))
            self.viewers[method] = viewer
        self.relayout()

    def relayout(self) -> None:
        """Re-grid and resize the tiles for the pane's size and the image's shape (a wide image in a
        tall pane: one column), then fit the image in them."""
        first = next(iter(self.viewers.values()), None)
        if first is None:
            return
        image_height, image_width = first.image_shape or (3, 4)
        count, spacing = len(self.viewers), self.SPACING
        width, height = max(1, self.width()), max(1, self.height())
        columns = best_columns(count, width, height, image_width, image_height)
        rows = -(-count // columns)
        scale = min((width - spacing * (columns - 1)) / columns / image_width,
                    (height - spacing * (rows - 1)) / rows / image_height)
        tile_width, tile_height = max(1, int(image_width * scale)), max(1, int(image_height * scale))
        if columns != self.columns:
            self.columns = columns
            for position, viewer in enumerate(self.viewers.values()):
                self.grid.removeWidget(viewer)
                self.grid.addWidget(viewer, position // columns, position % columns)
        for viewer in self.viewers.values():
            viewer.setFixedSize(tile_width, tile_height)
        grid_width = columns * tile_width + spacing * (columns - 1)
        grid_height = rows * tile_height + spacing * (rows - 1)
        self.tiles.setGeometry((width - grid_width) // 2, (height - grid_height) // 2, grid_width, grid_height)
        if first.image_shape:
            first.fit(padding=0)  # the tile has the image's shape: no margin needed

    def resizeEvent(self, event: Any) -> None:  # noqa: N802
        super().resizeEvent(event)
        self.relayout()


class CamSettingsForm(QWidget):
    """The chosen method's settings (names, defaults and help from the core's CAM registry)."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.layout_ = QFormLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self._getters: dict[str, Any] = {}

    def show_method(self, specs: Any, values: dict[str, Any]) -> None:
        while self.layout_.rowCount():
            self.layout_.removeRow(0)
        self._getters.clear()
        for spec in specs:
            value = values.get(spec.name, spec.default)
            label = spec.name.replace("_", " ")
            if isinstance(spec.default, bool):
                widget: QWidget = QCheckBox(self)
                widget.setChecked(bool(value))
                widget.toggled.connect(lambda _=False: self.changed.emit())
                self._getters[spec.name] = widget.isChecked
            elif isinstance(spec.default, int):
                widget = QSpinBox(self)
                widget.setRange(1, STAGE_COUNT if spec.name == "stage" else 10_000)
                widget.setValue(int(value))
                widget.editingFinished.connect(self.changed.emit)
                self._getters[spec.name] = widget.value
            elif isinstance(spec.default, float):
                widget = QDoubleSpinBox(self)
                widget.setDecimals(3)
                widget.setRange(0.0, 100.0)
                widget.setSingleStep(0.05)
                widget.setValue(float(value))
                widget.editingFinished.connect(self.changed.emit)
                self._getters[spec.name] = widget.value
            else:  # a list of stages, typed as "1, 2, 3": the core parses and checks it
                widget = QLineEdit(", ".join(str(v) for v in value) if isinstance(value, list) else str(value), self)
                widget.editingFinished.connect(self.changed.emit)
                self._getters[spec.name] = widget.text
            widget.setToolTip(spec.description)
            widget.setObjectName(f"cam_{spec.name}")
            self.layout_.addRow(label, widget)

    def values(self) -> dict[str, Any]:
        """Every setting as its widget holds it (list settings as the typed text), for `CamSpec.resolve`."""
        return {name: getter() for name, getter in self._getters.items()}


class CamPanel(QWidget):
    """The CAM stage; it draws on `viewer`, the window's image viewer, and shows the comparison of
    all methods in the window's centre (through the session)."""

    def __init__(self, session: Session, viewer: ImageViewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("camPanel")
        self.session = session
        self.viewer = viewer
        self.runner = session.make_runner("Compute CAMs")
        self.active = False
        self._followed_proposal_method: str | None = None  # see follow_proposal_method
        self._checkpoint_hash: dict[str, str] = {}  # checkpoint path -> the hash the cache is keyed by
        self._pending: list[tuple[int, str]] = []  # (image id, method) still to compute for the screen
        self._current_map: np.ndarray | None = None
        self.compare_view: CompareView | None = None

        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 10, 10, 10)
        layout.setSpacing(8)
        box = QGroupBox("Heatmap", self)
        form = QFormLayout(box)
        self.method_combo = QComboBox(box)
        self.method_combo.setObjectName("camMethod")
        self.method_combo.setToolTip("Which class activation map to show")
        self.methods = list(CAM_METHODS)  # whatever the core offers: the GUI has no list of its own
        for method in self.methods:
            self.method_combo.addItem(method_label(method), method)
        self.method_combo.currentIndexChanged.connect(lambda _: self._method_changed())
        form.addRow("Method", self.method_combo)
        self.colormap_combo = QComboBox(box)
        for name in HEATMAP_COLORMAPS:
            self.colormap_combo.addItem(name, name)
        self.colormap_combo.currentIndexChanged.connect(self._colormap_changed)
        form.addRow("Colormap", self.colormap_combo)
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal, box)
        self.opacity_slider.setObjectName("camOpacity")
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(55)
        self.opacity_slider.setToolTip("Opacity of the heatmap over the image")
        self.opacity_slider.valueChanged.connect(self._opacity_changed)
        form.addRow("Opacity", self.opacity_slider)
        threshold_row = QHBoxLayout()
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal, box)
        self.threshold_slider.setObjectName("camThreshold")
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setValue(50)
        self.threshold_slider.setToolTip("The outline shows where the map is at least this high: the mask this threshold would give")
        self.threshold_slider.valueChanged.connect(self._threshold_changed)
        self.threshold_label = QLabel("0.50", box)
        self.threshold_label.setMinimumWidth(34)
        threshold_row.addWidget(self.threshold_slider, 1)
        threshold_row.addWidget(self.threshold_label)
        form.addRow("Threshold", threshold_row)
        self.outline_check = QCheckBox("Show the thresholded outline", box)
        self.outline_check.setChecked(True)
        self.outline_check.toggled.connect(lambda _: self._update_outline())
        form.addRow(self.outline_check)
        self.compare_check = QCheckBox("Compare all methods side by side", box)
        self.compare_check.setObjectName("camCompare")
        self.compare_check.setToolTip("One view per method on the same image; zoom and pan move together")
        self.compare_check.toggled.connect(self.set_compare)
        form.addRow(self.compare_check)
        layout.addWidget(box)

        settings_box = QGroupBox("Method settings", self)
        settings_layout = QVBoxLayout(settings_box)
        self.settings_form = CamSettingsForm(settings_box)
        self.settings_form.changed.connect(self._settings_changed)
        settings_layout.addWidget(self.settings_form)
        self.settings_error = QLabel(settings_box)
        self.settings_error.setWordWrap(True)
        self.settings_error.setStyleSheet("color:#f85149")
        self.settings_error.setVisible(False)
        settings_layout.addWidget(self.settings_error)
        layout.addWidget(settings_box)

        actions = QHBoxLayout()
        self.all_button = QPushButton("Compute for all images", self)
        self.all_button.setToolTip("Fill the CAM cache for every image with the selected method, in the background")
        self.all_button.clicked.connect(self.compute_all)
        actions.addWidget(self.all_button)
        actions.addStretch(1)
        layout.addLayout(actions)
        layout.addWidget(JobRow(self.runner, self))
        self.status_label = QLabel(self)
        self.status_label.setObjectName("camStatus")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self.runner.succeeded.connect(self._on_job_done)
        self.runner.finished.connect(lambda _: self._next_pending())
        session.image_changed.connect(lambda _: self.update_overlay() if self.active else None)
        session.image_loaded.connect(lambda _: self.update_overlay(request=False) if self.active and self.compare_check.isChecked() else None)
        session.project_changed.connect(self._project_changed)
        session.masks_changed.connect(self.follow_proposal_method)
        session.classifier_changed.connect(self.classifier_changed)
        session.stage_changed.connect(lambda stage: self.stage_activated() if stage == Stage.CAMS else self.stage_deactivated())
        self._method_changed()
        self.refresh()

    def _project_changed(self) -> None:
        self._followed_proposal_method = None
        self.refresh()
        if not self.follow_proposal_method():
            self._method_changed()  # the same method, but this project's settings of it

    def follow_proposal_method(self) -> bool:
        """Show the method the project's proposals come from, when that is new (a project opened,
        a round made with another method); otherwise leave the user's choice alone. True if it switched."""
        project = self.session.project
        method = proposal_method(project) if project is not None else None
        if method is None or method == self._followed_proposal_method or method not in self.methods:
            return False
        self._followed_proposal_method = method
        if method == self.method:
            return False
        self.set_method(method)
        return True

    def refresh(self) -> None:
        run = self._classifier_run()
        enabled = run is not None
        for widget in (self.method_combo, self.all_button, self.compare_check):
            widget.setEnabled(enabled)
        if self.session.project is None:
            self.status_label.setText("")
        elif run is None:
            self.status_label.setText("Train a classifier first (Train tab); its CAMs show here.")
        if self.active:
            self.update_overlay()

    def classifier_changed(self) -> None:
        self.refresh()

    def _classifier_run(self) -> Any:
        project = self.session.project
        return project.latest_run("classifier") if project is not None else None

    @property
    def method(self) -> str | None:
        return self.method_combo.currentData()

    def settings_for(self, method: str) -> dict[str, Any]:
        """The user's settings of `method` (only those changed from the defaults), kept in the project."""
        return cam_settings_for(self.session.project, method)

    def _method_changed(self) -> None:
        method = self.method
        if method is not None:
            spec = CamSpec.resolve(method, self.settings_for(method))
            self.settings_form.show_method(cam_method(method).settings, spec.settings)
        self.settings_error.setVisible(False)
        self.update_overlay()

    def _settings_changed(self) -> None:
        project, method = self.session.project, self.method
        if project is None or method is None:
            return
        try:  # every bad value, whatever the field, is said next to the form
            spec = CamSpec.resolve(method, self.settings_form.values())
        except CamSettingsError as error:
            self.settings_error.setText(str(error))
            self.settings_error.setVisible(True)
            return
        self.settings_error.setVisible(False)
        record = load_workflow_settings(project)
        changed = record.with_cam_spec(spec)
        if changed == record:  # nothing new: no write, no recomputation
            return
        save_workflow_settings(project, changed)
        self._pending.clear()
        self.update_overlay()

    def cam_spec(self, method: str) -> CamSpec:
        """`method` with the project's settings of it, as the maps are computed and cached."""
        return CamSpec.resolve(method, self.settings_for(method))

    def set_method(self, method: str) -> None:
        self.method_combo.setCurrentIndex(self.methods.index(method))

    # --- stage switching ---------------------------------------------------------------------------
    def stage_activated(self) -> None:
        self.active = True
        self.refresh()

    def stage_deactivated(self) -> None:
        if not self.active:
            return
        self.active = False
        self._pending.clear()
        self.viewer.set_heatmap(None)
        self.viewer.set_outline(None)
        if self.compare_check.isChecked():
            self.compare_check.setChecked(False)

    def shutdown(self) -> None:
        self._pending.clear()
        self.runner.shutdown()

    # --- maps --------------------------------------------------------------------------------------
    def cached_map(self, image_id: int, method: str) -> np.ndarray | None:
        run = self._classifier_run()
        project = self.session.project
        if run is None or project is None:
            return None
        image = project.image(image_id)
        checkpoint_hash = self._checkpoint_hash.get(str(run.checkpoint_path), run.checkpoint_sha256)
        spec = self.cam_spec(method)
        return CamCache(project.cache_dir).get(image.sha256, checkpoint_hash, spec.method, spec.settings,
                                               (image.height, image.width))

    def _request(self, image_id: int, method: str) -> None:
        if (image_id, method) not in self._pending:
            self._pending.append((image_id, method))
        self._next_pending()

    def _next_pending(self) -> None:
        if self.runner.busy or not self._pending:
            return
        project = self.session.project
        if project is None:
            self._pending.clear()
            return
        image_id, method = self._pending.pop(0)
        if self.cached_map(image_id, method) is not None:
            self._show_map(image_id, method)
            self._next_pending()
            return
        self.status_label.setText(f"Computing {method_label(method)} for {project.image(image_id).stem}…")
        spec = self.cam_spec(method)
        self.runner.start(lambda cancel: cam_job(project, spec, None, cancel, image_ids=[image_id]),
                          f"CAM {spec.label}")

    def _on_job_done(self, result: object) -> None:
        if isinstance(result, dict) and result.get("checkpoint_sha256") and result.get("classifier"):
            self._checkpoint_hash[str(result["classifier"])] = str(result["checkpoint_sha256"])
            from pathlib import Path

            self._checkpoint_hash[str(Path(result["classifier"]).absolute())] = str(result["checkpoint_sha256"])
        if self.active:
            self.update_overlay(request=False)
        if not self._pending and isinstance(result, dict):
            self.status_label.setText(f"{result.get('computed', 0)} map(s) computed, {result.get('cached', 0)} from the cache.")

    def compute_all(self) -> None:
        project = self.session.project
        method = self.method
        if project is None or method is None or self.runner.busy:
            return
        self._pending.clear()
        spec = self.cam_spec(method)
        self.runner.start(lambda cancel: cam_job(project, spec, None, cancel), f"CAMs ({spec.label}) for all images")

    # --- drawing -----------------------------------------------------------------------------------
    def update_overlay(self, request: bool = True) -> None:
        """Show the current image's map for the chosen method (or ask for it in the background)."""
        viewer = self.viewer
        image_id = self.session.image_id
        method = self.method
        if not self.active or image_id is None or method is None or self._classifier_run() is None:
            viewer.set_heatmap(None)
            viewer.set_outline(None)
            self._current_map = None
            return
        if self.compare_check.isChecked():
            self._update_compare(request)
            return
        cam_map = self.cached_map(image_id, method)
        self._current_map = cam_map
        viewer.set_heatmap(cam_map)
        viewer.set_heat_opacity(self.opacity_slider.value() / 100)
        self._update_outline()
        if cam_map is None:
            viewer.set_outline(None)
            if request:
                self._request(image_id, method)
        else:
            self.status_label.setText(f"{method_label(method)}: map from the cache.")

    def _show_map(self, image_id: int, method: str) -> None:
        if self.active and image_id == self.session.image_id:
            self.update_overlay(request=False)

    def _update_outline(self) -> None:
        viewer = self.viewer
        threshold = self.threshold_slider.value() / 100
        if self.compare_check.isChecked() and self.compare_view is not None:
            for compare_viewer in self.compare_view.viewers.values():
                heat = compare_viewer.heatmap
                compare_viewer.set_outline(heat >= threshold if heat is not None and self.outline_check.isChecked() else None)
            return
        if self._current_map is None or not self.outline_check.isChecked():
            viewer.set_outline(None)
        else:
            viewer.set_outline(self._current_map >= threshold)

    def _threshold_changed(self, value: int) -> None:
        self.threshold_label.setText(f"{value / 100:.2f}")
        self._update_outline()

    def _opacity_changed(self, value: int) -> None:
        self.viewer.set_heat_opacity(value / 100)
        if self.compare_view is not None:
            for viewer in self.compare_view.viewers.values():
                viewer.set_heat_opacity(value / 100)

    def _colormap_changed(self) -> None:
        name = self.colormap_combo.currentData()
        self.viewer.set_colormap(name)
        if self.compare_view is not None:
            for viewer in self.compare_view.viewers.values():
                viewer.set_colormap(name)

    # --- comparison --------------------------------------------------------------------------------
    def set_compare(self, on: bool) -> None:
        if on and self.methods:
            if self.compare_view is None:
                self.compare_view = CompareView(self.methods, self)  # the window moves it into its centre
                for viewer in self.compare_view.viewers.values():
                    viewer.set_colormap(self.colormap_combo.currentData())
            self.session.request_central_widget(self.compare_view)
            self.update_overlay()
        else:
            self.session.request_central_widget(None)
            if self.active:
                self.update_overlay()

    def _update_compare(self, request: bool) -> None:
        assert self.compare_view is not None
        image_id = self.session.image_id
        pixels = self.session.pixels
        first = True
        for method, viewer in self.compare_view.viewers.items():
            shape_changed = pixels is not None and viewer.image_shape != pixels.shape[:2]
            viewer.set_image(pixels, fit=first and shape_changed)
            if first and shape_changed:
                self.compare_view.relayout()
            first = False
            cam_map = self.cached_map(image_id, method) if image_id is not None else None
            viewer.set_heatmap(cam_map)
            viewer.set_heat_opacity(self.opacity_slider.value() / 100)
            if cam_map is None and request and image_id is not None:
                self._request(image_id, method)
        self._update_outline()
