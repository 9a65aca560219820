"""Rounds stage: the refinement rounds as a table and a small plot; train segmenter / next round;
the export dialog."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import (
    QAbstractItemView,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from defect_studio.gui.mask_editor import MaskEditor
from defect_studio.gui.panels.common import ConfigForm, JobRow, training_threads
from defect_studio.gui.panels.train_panel import make_plot
from defect_studio.gui.plotting import pg
from defect_studio.gui.session import Session, Stage
from defect_studio.jobs import Progress, ProgressKind
from defect_studio.ml.segmenter_options import ENCODER_WEIGHTS, SegmenterConfig
from defect_studio.workflow_settings import load_workflow_settings, update_workflow_settings

COLUMNS = ("Round", "Status", "Acc.", "Edit.", "Rej.", "Open", "Edited px", "Δ mask", "Seg IoU", "GT IoU")
COLUMN_TIPS = ("Round index", "proposing → proposed → training → trained (or converged)", "Masks accepted as proposed",
               "Masks edited by hand", "Masks rejected (left out of training)", "Masks still to review",
               "Share of the defect images' pixels the user changed by hand",
               "Share of defect pixels that changed since the previous round (1 − IoU)",
               "Segmenter's defect IoU on its held-out masks", "The round's masks against ground-truth masks (when given)")


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1):
        return str(int(value))
    if isinstance(value, float):
        return "–" if value != value else f"{value:.{digits}f}"
    return str(value)


def _nested(metrics: dict, *path: str) -> Any:
    value: Any = metrics
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


SEGMENTER_FIELDS = [
    ("architecture", "Network", "efficientnet-lite0-unet: a decoder trained over a fixed pretrained encoder (each image "
     "encoded once); unet: a small U-Net trained from scratch"),
    ("encoder_weights", "Encoder", "classifier: the project's fine-tuned classifier's features (ImageNet's when the "
     "classifier is the compact network); imagenet: ImageNet's"),
    ("epochs", "Epochs", "Epochs of segmenter training from scratch (round 0)"),
    ("warm_start_epochs", "Epochs, later rounds", "Later rounds continue from the previous round's segmenter for this many epochs"),
    ("steps_per_epoch", "Steps per epoch", "Batches of random crops per epoch"),
    ("crop_size", "Crop size (px)", "Training crops; the segmenter runs on whole images"),
    ("batch_size", "Batch size", "Crops per step"),
    ("learning_rate", "Learning rate", "Peak learning rate (one-cycle)"),
    ("time_budget_s", "Time budget (s)", "Stop after the epoch that crosses it (none: no limit)"),
    ("seed", "Seed", "Same seed and masks give the same segmenter"),
]


class RoundsPanel(QWidget):
    """The rounds stage; `editor` is flushed before a round trains, so the last stroke counts."""

    def __init__(self, session: Session, editor: MaskEditor, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("roundsPanel")
        self.session = session
        self.editor = editor
        self.runner = session.make_runner("Refinement round")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 10, 10, 10)
        layout.setSpacing(8)
        intro = QLabel("Each round trains a segmenter on the reviewed masks and proposes better masks for the next round.")
        intro.setWordWrap(True)
        intro.setObjectName("panelIntro")
        layout.addWidget(intro)

        self.table = QTableWidget(0, len(COLUMNS), self)
        self.table.setObjectName("roundsTable")
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        for column, tip in enumerate(COLUMN_TIPS):
            self.table.horizontalHeaderItem(column).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setMinimumHeight(120)
        layout.addWidget(self.table, 1)

        self.plot = make_plot("Per round")
        self.plot.setLabel("bottom", "round", color="#8b949e")
        self.plot.setMinimumHeight(170)
        self.plot.setMaximumHeight(230)
        self.plot.getAxis("bottom").setTickSpacing(1, 1)
        self.curve_seg = self.plot.plot([], [], pen=pg.mkPen("#3fb950", width=2), symbol="o", symbolBrush="#3fb950", symbolPen=None, name="segmenter IoU")
        self.curve_gt = self.plot.plot([], [], pen=pg.mkPen("#58a6ff", width=2), symbol="s", symbolBrush="#58a6ff", symbolPen=None, name="IoU vs ground truth")
        self.curve_changed = self.plot.plot([], [], pen=pg.mkPen("#d29922", width=2, style=pg.QtCore.Qt.PenStyle.DashLine), symbol="t", symbolBrush="#d29922", symbolPen=None, name="mask change vs previous")
        layout.addWidget(self.plot)
        self.training_plot = make_plot("Segmenter training (live)")
        self.training_plot.setMaximumHeight(200)
        self.live_loss = self.training_plot.plot([], [], pen=pg.mkPen("#58a6ff", width=2), symbol="o", symbolSize=5,
                                                 symbolBrush="#58a6ff", symbolPen=None, name="loss")
        self.live_iou = self.training_plot.plot([], [], pen=pg.mkPen("#3fb950", width=2), symbol="o", symbolSize=5,
                                                symbolBrush="#3fb950", symbolPen=None, name="val defect IoU")
        self.live_points: dict[str, list[tuple[float, float]]] = {"loss": [], "val_defect_iou": []}
        layout.addWidget(self.training_plot)

        box = QGroupBox("Next step", self)
        box_layout = QVBoxLayout(box)
        self.form = ConfigForm(SegmenterConfig, SEGMENTER_FIELDS, self,
                               choices={"architecture": ("efficientnet-lite0-unet", "unet"),
                                        "encoder_weights": ENCODER_WEIGHTS})
        box_layout.addWidget(self.form)
        buttons = QHBoxLayout()
        self.round_button = QPushButton("Train segmenter → next round", box)
        self.round_button.setObjectName("roundButton")
        self.round_button.setToolTip("Train the segmenter on this round's accepted and edited masks, then propose the next round's masks")
        self.round_button.clicked.connect(self.run_round)
        self.export_button = QPushButton("Export…", box)
        self.export_button.setObjectName("exportButton")
        self.export_button.setToolTip("Export the latest segmenter as ONNX + TorchScript with a model card (Ctrl+E)")
        self.export_button.clicked.connect(self.open_export_dialog)
        self.models_button = QPushButton("Models…", box)
        self.models_button.setObjectName("modelsButton")
        self.models_button.setToolTip("Every trained model with the masks and settings it was trained on; "
                                      "make an earlier round's segmenter current, or export it")
        self.models_button.clicked.connect(self.open_models_dialog)
        box_layout.addWidget(self.round_button)  # a row of its own: beside the others it widened the dock
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.models_button)
        box_layout.addLayout(buttons)
        box_layout.addWidget(JobRow(self.runner, box))
        self.summary_label = QLabel(box)
        self.summary_label.setObjectName("roundSummary")
        self.summary_label.setWordWrap(True)
        box_layout.addWidget(self.summary_label)
        layout.addWidget(box)

        self.runner.succeeded.connect(self._round_done)
        self.runner.started.connect(lambda _: self._clear_live())
        self.runner.progress.connect(self._on_progress)
        self.runner.finished.connect(lambda _: self.refresh())
        session.project_changed.connect(self.refresh)
        session.masks_changed.connect(self.refresh)
        session.stage_changed.connect(lambda stage: self.stage_activated() if stage == Stage.ROUNDS else None)
        self.refresh()

    def stage_activated(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        project = self.session.project
        round_index = self.session.round
        self.round_button.setEnabled(round_index is not None and not self.runner.busy)
        if project is not None and not self.runner.busy:
            self.form.set_values(load_workflow_settings(project).segmenter)
        has_segmenter = project is not None and project.latest_run("segmenter") is not None
        self.export_button.setEnabled(has_segmenter)
        self._fill_table()

    def _fill_table(self) -> None:
        project = self.session.project
        self.table.setRowCount(0)
        if project is None:
            self.plot.setXRange(-0.5, 2.5)
            self.curve_seg.setData([], [])
            self.curve_gt.setData([], [])
            self.curve_changed.setData([], [])
            self.summary_label.setText("")
            return
        seg_points, gt_points, changed_points = [], [], []
        defect_counts = project.mask_state_counts(tag="defect")  # a good image's empty mask needs no review
        for round_record in project.rounds():
            metrics = round_record.metrics or {}
            state_counts = defect_counts.get(round_record.index, {})
            seg_iou = _nested(metrics, "segmenter", "best_val_defect_iou")
            gt_iou = _nested(metrics, "ground_truth", "defect_iou")
            changed = metrics.get("mask_change")
            edited_pixels = _nested(metrics, "review", "edited_pixel_fraction")
            row = self.table.rowCount()
            self.table.insertRow(row)
            values = (round_record.index, round_record.status, state_counts.get("accepted", 0), state_counts.get("edited", 0),
                      state_counts.get("rejected", 0), state_counts.get("proposed", 0),
                      f"{edited_pixels:.2%}" if isinstance(edited_pixels, float) else None, changed, seg_iou, gt_iou)
            for column, value in enumerate(values):
                self.table.setItem(row, column, QTableWidgetItem(_number(value)))
            if isinstance(seg_iou, (int, float)):
                seg_points.append((round_record.index, float(seg_iou)))
            if isinstance(gt_iou, (int, float)):
                gt_points.append((round_record.index, float(gt_iou)))
            if isinstance(changed, (int, float)):
                changed_points.append((round_record.index, float(changed)))
        for curve, points in ((self.curve_seg, seg_points), (self.curve_gt, gt_points), (self.curve_changed, changed_points)):
            curve.setData([p[0] for p in points], [p[1] for p in points])
        rounds_count = len(project.rounds())
        self.plot.setXRange(-0.5, max(1, rounds_count) - 0.5, padding=0.05)
        self.plot.setYRange(0.0, 1.0, padding=0.02)
        run = project.latest_run("segmenter")
        self.summary_label.setText(
            "No segmenter trained yet." if run is None else
            f"Latest segmenter: run {run.id} (round {run.round_index}), "
            + ", ".join(f"{k.replace('_', ' ')} {_number(v)}" for k, v in run.metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and ("iou" in k or "epoch" in k))
        )

    # --- actions -------------------------------------------------------------------------------------
    def run_round(self) -> bool:
        """Train the segmenter on the current round's reviewed masks, then make the next round's
        proposals from segmenter + CAM: the core's next-round job, in the background."""
        project = self.session.project
        round_index = self.session.round
        if project is None or round_index is None or self.runner.busy:
            return False
        from defect_studio.ml.refine import ground_truth_dir, next_round_job  # on use: with a broken torch the app still opens, tags and reviews

        self.editor.flush()
        update_workflow_settings(project, segmenter=self.form.values())  # what `defect-studio refine` uses too
        gt_dir = ground_truth_dir(project)
        threads = {"threads": training_threads()}
        return self.runner.start(lambda cancel: next_round_job(project, round_index, cancel, threads, gt_dir),
                                 f"Round {round_index}: train segmenter, propose round {round_index + 1}")

    def _clear_live(self) -> None:
        for points in self.live_points.values():
            points.clear()
        self.live_loss.setData([], [])
        self.live_iou.setData([], [])

    def _on_progress(self, event: Progress) -> None:
        if event.kind != ProgressKind.EPOCH:  # the round's only training is the segmenter's
            return
        for key, curve in (("loss", self.live_loss), ("val_defect_iou", self.live_iou)):
            value = event.metrics.get(key)
            if isinstance(value, (int, float)) and value == value:
                self.live_points[key].append((float(event.step), float(value)))
                curve.setData([p[0] for p in self.live_points[key]], [p[1] for p in self.live_points[key]])

    def _round_done(self, result: object) -> None:
        self.session.notify_masks_changed()

    def open_models_dialog(self) -> None:
        from defect_studio.gui.panels.models_dialog import ModelsDialog

        if self.session.project is None:
            return
        dialog = ModelsDialog(self.session, self, on_change=self.refresh)
        dialog.open()
        self.models_dialog = dialog

    def open_export_dialog(self) -> None:
        from defect_studio.gui.panels.export_dialog import ExportDialog

        if self.session.project is None:
            return
        dialog = ExportDialog(self.session, self)
        dialog.open()
        self.export_dialog = dialog
