"""The models dialog (Rounds tab ▸ Models…): every trained model with what it was trained on; make an
earlier round's segmenter the current one, or export it, without losing later work."""

from __future__ import annotations

from typing import Callable

from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from defect_studio.errors import DefectStudioError
from defect_studio.gui.dialogs import report_error
from defect_studio.gui.session import Session
from defect_studio.project.provenance import (
    describe_run_lines,
    model_rows,
    run_details,
    use_newest_segmenter,
    use_segmenter,
)

COLUMNS = ("", "Run", "Kind", "Round", "Trained on", "Trained", "Checkpoint")


class ModelsDialog(QDialog):
    def __init__(self, session: Session, parent: QWidget | None = None, on_change: Callable[[], None] | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("modelsDialog")
        self.setWindowTitle("Models and what they were trained on")
        self.session = session
        self._on_change = on_change
        self.rows: list[dict] = []
        layout = QVBoxLayout(self)
        intro = QLabel("★ marks the current segmenter: export, evaluation and the next round's proposals use it. "
                       "Making an earlier one current deletes nothing.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        self.table = QTableWidget(0, len(COLUMNS), self)
        self.table.setObjectName("modelsTable")
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.currentCellChanged.connect(lambda *_: self._show_selected())
        layout.addWidget(self.table, 1)
        self.details = QPlainTextEdit(self)
        self.details.setObjectName("modelDetails")
        self.details.setReadOnly(True)
        self.details.setMinimumHeight(160)
        layout.addWidget(self.details, 1)
        buttons = QHBoxLayout()
        self.use_button = QPushButton("&Make current", self)
        self.use_button.setObjectName("useSegmenter")
        self.use_button.setToolTip("Make the selected segmenter the current one (later rounds and models are kept)")
        self.use_button.clicked.connect(self.make_current)
        self.newest_button = QPushButton("Use &newest", self)
        self.newest_button.setObjectName("useNewestSegmenter")
        self.newest_button.setToolTip("The newest segmenter is current again, and each new one after it")
        self.newest_button.clicked.connect(self.use_newest)
        self.export_button = QPushButton("&Export this…", self)
        self.export_button.setObjectName("exportSelected")
        self.export_button.clicked.connect(self.export_selected)
        for button in (self.use_button, self.newest_button, self.export_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        close.rejected.connect(self.close)
        buttons.addWidget(close)
        layout.addLayout(buttons)
        self.resize(820, 520)
        self.refresh()

    def refresh(self) -> None:
        project = self.session.project
        selected = self.selected_row()
        self.rows = model_rows(project) if project is not None else []
        self.table.setRowCount(0)
        for row in self.rows:
            index = self.table.rowCount()
            self.table.insertRow(index)
            values = ("★" if row["current"] else "", row["run"], row["kind"], "–" if row["round"] is None else row["round"],
                      row["trained_on_text"], row["created_at"][:19].replace("T", " "),
                      row["checkpoint"] + ("" if row["file"] == "ok" else f" ({row['file']})"))
            for column, value in enumerate(values):
                self.table.setItem(index, column, QTableWidgetItem(str(value)))
        keep = next((i for i, r in enumerate(self.rows) if selected and r["run"] == selected["run"]), None)
        if keep is None:
            keep = next((i for i, r in enumerate(self.rows) if r["current"]), len(self.rows) - 1)
        if keep is not None and keep >= 0:
            self.table.setCurrentCell(keep, 1)
        self._show_selected()

    def selected_row(self) -> dict | None:
        index = self.table.currentRow()
        return self.rows[index] if 0 <= index < len(self.rows) else None

    def _show_selected(self) -> None:
        row = self.selected_row()
        project = self.session.project
        is_segmenter = row is not None and row["kind"] == "segmenter"
        self.use_button.setEnabled(is_segmenter and not row["current"])  # type: ignore[index]
        self.export_button.setEnabled(is_segmenter and row["file"] == "ok")  # type: ignore[index]
        self.newest_button.setEnabled(project is not None and project.chosen_segmenter() is not None)
        if row is None or project is None:
            self.details.setPlainText("")
            return
        self.details.setPlainText("\n".join(describe_run_lines(run_details(project, project.training_run(row["run"])), 200)))

    def _changed(self) -> None:
        self.refresh()
        if self._on_change is not None:
            self._on_change()

    def make_current(self) -> bool:
        row, project = self.selected_row(), self.session.project
        if row is None or project is None:
            return False
        try:
            use_segmenter(project, run_id=row["run"])
        except DefectStudioError as error:  # a checkpoint missing from disk: the message says what stays current
            report_error(self, "Cannot make this segmenter current", error)
            return False
        finally:
            self._changed()
        return True

    def use_newest(self) -> None:
        if self.session.project is not None:
            use_newest_segmenter(self.session.project)
            self._changed()

    def export_selected(self) -> None:
        from defect_studio.gui.panels.export_dialog import ExportDialog

        row = self.selected_row()
        if row is None or row["kind"] != "segmenter":
            return
        dialog = ExportDialog(self.session, self.parentWidget(), run_id=row["run"])
        dialog.open()
        self.export_dialog = dialog
