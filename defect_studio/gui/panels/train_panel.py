"""Train stage: the classifier's settings, Train / Cancel, live loss and validation curves."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from defect_studio.gui.panels.common import ConfigForm, JobRow, training_threads
from defect_studio.gui.plotting import pg
from defect_studio.gui.session import Session, Stage
from defect_studio.jobs import Progress, ProgressKind
from defect_studio.ml.classifier_options import ARCH_DEFAULTS, ARCHITECTURES, TILING_SETTINGS, ClassifierConfig
from defect_studio.ml.tiling import TILING_MODES
from defect_studio.workflow_settings import load_workflow_settings, update_workflow_settings

CLASSIFIER_FIELDS = [
    ("arch", "Backbone", "efficientnet-lite0: ImageNet features fine-tuned on your tags (its CAMs outline defects); "
     "compact: a small network trained from scratch"),
    ("epochs", "Epochs", "Most epochs to train (early stopping may end sooner)"),
    ("batch_size", "Batch size", "Images per step"),
    ("learning_rate", "Learning rate", "Peak learning rate (one-cycle)"),
    ("input_size", "Input size (px)", "Images are letterboxed to this size"),
    ("width", "Width", "Channels of the first stage of the compact network"),
    ("patience", "Patience", "Epochs without better validation AUROC before stopping"),
    ("min_epochs", "Min epochs", "Never stop before this many epochs"),
    ("val_fraction", "Validation fraction", "Part of the tagged images held out for validation"),
    ("max_train_seconds", "Time budget (s)", "Stop after the epoch that exceeds this many seconds (none: no limit)"),
    ("seed", "Seed", "Same seed and data give the same model"),
    ("augment", "Augment", "Random flips/rotations/brightness during training"),
    ("tiling", "Tiling", "tiles: learn from tiles of each image at its own resolution (an image is defect when some "
     "tile is), for small defects on large images; whole: letterbox every image into the input; auto: tiles for "
     "images over 1024 x 1024 pixels"),
]

CURVE_STYLE = {
    "loss": ("#58a6ff", "train loss"),
    "val_loss": ("#a371f7", "val loss"),
    "val_auroc": ("#3fb950", "val AUROC"),
    "val_f1": ("#d29922", "val F1"),
}


def make_plot(title: str, y_range: tuple[float, float] | None = None) -> pg.PlotWidget:
    plot = pg.PlotWidget(background="#0d1117")
    plot.setTitle(title, color="#c9d1d9", size="9pt")
    plot.showGrid(x=True, y=True, alpha=0.2)
    plot.setLabel("bottom", "epoch", color="#8b949e")
    legend = plot.addLegend(offset=(-5, -5) if y_range is not None else (-5, 5), labelTextColor="#c9d1d9",
                            brush=pg.mkBrush(13, 17, 23, 225), pen=pg.mkPen("#30363d"))
    legend.setZValue(20)
    plot.setMinimumHeight(150)
    plot.setMouseEnabled(x=False, y=False)
    plot.hideButtons()
    if y_range is not None:
        plot.setYRange(*y_range, padding=0.02)
    return plot


def _format_metric(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.3f}"


class TrainPanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("trainPanel")
        self.session = session
        self.runner = session.make_runner("Train classifier")
        self.history: dict[str, list[tuple[float, float]]] = {key: [] for key in CURVE_STYLE}
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 10, 10, 10)
        layout.setSpacing(8)

        settings_box = QGroupBox("Classifier settings", self)
        settings_layout = QVBoxLayout(settings_box)
        self.form = ConfigForm(ClassifierConfig, CLASSIFIER_FIELDS, self, choices={"arch": ARCHITECTURES, "tiling": TILING_MODES})
        self.form.combos["arch"].currentTextChanged.connect(self._show_backbone_defaults)
        settings_layout.addWidget(self.form)
        layout.addWidget(settings_box)

        buttons = QHBoxLayout()
        self.train_button = QPushButton("Train classifier", self)
        self.train_button.setObjectName("trainButton")
        self.train_button.setToolTip("Train on the tagged images in the background; the window stays usable")
        self.train_button.clicked.connect(self.start_training)
        buttons.addWidget(self.train_button)
        buttons.addStretch(1)
        layout.addLayout(buttons)
        self.job_row = JobRow(self.runner, self)
        layout.addWidget(self.job_row)

        self.loss_plot = make_plot("Loss")
        self.metric_plot = make_plot("Validation", (0.0, 1.02))
        self.curves: dict[str, pg.PlotDataItem] = {}
        for key, (colour, label) in CURVE_STYLE.items():
            plot = self.loss_plot if key in ("loss", "val_loss") else self.metric_plot
            self.curves[key] = plot.plot([], [], pen=pg.mkPen(colour, width=2), symbol="o", symbolSize=5,
                                         symbolBrush=colour, symbolPen=None, name=label)
        layout.addWidget(self.loss_plot, 1)
        layout.addWidget(self.metric_plot, 1)
        self.result_label = QLabel(self)
        self.result_label.setObjectName("trainResult")
        self.result_label.setWordWrap(True)
        layout.addWidget(self.result_label)

        self.runner.progress.connect(self._on_progress)
        self.runner.succeeded.connect(self._on_succeeded)
        self.runner.finished.connect(lambda _: self._update_enabled())
        session.project_changed.connect(self.refresh)
        session.tags_changed.connect(self._update_enabled)
        session.stage_changed.connect(lambda stage: self.stage_activated() if stage == Stage.TRAIN else None)
        self.refresh()

    def stage_activated(self) -> None:
        self.refresh()

    def _show_backbone_defaults(self, arch: str) -> None:
        """A new backbone brings its own input size, learning rate and epochs into the form."""
        defaults = ClassifierConfig(arch=arch)
        self.form.set_values({name: getattr(defaults, name) for name in ARCH_DEFAULTS[arch]})

    def refresh(self) -> None:
        project = self.session.project
        if project is not None:
            self.form.set_values(load_workflow_settings(project).classifier)
        self._show_latest_run()
        self._update_enabled()

    def _update_enabled(self) -> None:
        self.train_button.setEnabled(self.session.project is not None and not self.runner.busy)

    def _show_latest_run(self) -> None:
        project = self.session.project
        run = project.latest_run("classifier") if project is not None else None
        if run is None:
            self.result_label.setText("No classifier trained yet." if project is not None else "")
            return
        metrics = run.metrics
        parts = [f"{name.replace('_', ' ')} {_format_metric(value)}" for name, value in metrics.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool) and name.startswith(("val", "test", "best"))]
        self.result_label.setText(f"<b>Latest classifier</b> (run {run.id}, {run.created_at[:19].replace('T', ' ')}): "
                                  + (", ".join(parts[:6]) or "no metrics recorded"))
        history = metrics.get("history") if isinstance(metrics, dict) else None
        if isinstance(history, list) and not self.runner.busy:
            self._clear_curves()
            for epoch, row in enumerate(history, start=1):
                if isinstance(row, dict):
                    self._add_point(float(row.get("epoch", epoch)), row)

    # --- training ----------------------------------------------------------------------------------
    def start_training(self) -> bool:
        project = self.session.project
        if project is None:
            return False
        from defect_studio.ml.classifier import train_project_classifier_job  # on use: with a broken torch the app still opens, tags and reviews

        stored = update_workflow_settings(project, classifier=self.form.values()).classifier  # what `defect-studio train` uses too
        # The tile size and overlap have no field here: those `train --tile-size/--overlap` kept count.
        tiling = {name: stored[name] for name in TILING_SETTINGS if name in stored}
        # One torch thread fewer than the cores, so the GUI thread always has a core to paint on.
        config = self.form.config(threads=training_threads(), **tiling)
        self._clear_curves()
        self.result_label.setText("Training…")
        started = self.runner.start(lambda cancel: train_project_classifier_job(project, config, cancel),
                                    "Train classifier")
        self._update_enabled()
        return started

    def _clear_curves(self) -> None:
        for key in self.history:
            self.history[key].clear()
            self.curves[key].setData([], [])

    def _add_point(self, epoch: float, metrics: dict[str, Any]) -> None:
        for key in CURVE_STYLE:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and value == value:
                points = self.history[key]
                if points and points[-1][0] >= epoch:  # a repeated epoch replaces its point
                    points.pop()
                points.append((epoch, float(value)))
                xs, ys = zip(*self.history[key])
                self.curves[key].setData(list(xs), list(ys))

    def _on_progress(self, event: Progress) -> None:
        # Epoch events carry the curves' metrics (the closing result repeats the best ones: not a point).
        if event.kind == ProgressKind.EPOCH and any(key in event.metrics for key in CURVE_STYLE):
            epoch = float(event.metrics.get("epoch", event.step))
            self._add_point(epoch, event.metrics)

    def _on_succeeded(self, result: object) -> None:
        self._show_latest_run()
        self.session.notify_classifier_changed()

    def point_count(self, key: str) -> int:
        return len(self.history[key])
