"""The export dialog: choose a folder, run the export job (with its parity check), show the model
card and whether the exported models reproduce the in-app model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from defect_studio.gui.panels.common import JobRow
from defect_studio.gui.session import Session
from defect_studio.gui.workers import JobRunner


class ExportDialog(QDialog):
    def __init__(self, session: Session, parent: QWidget | None = None, run_id: int | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("exportDialog")
        self.run_id = run_id  # a segmenter training run (the Models dialog); None: the current segmenter
        self.setWindowTitle("Export the segmenter" if run_id is None else f"Export segmenter run {run_id}")
        self.session = session
        self.runner: JobRunner = session.shared_runner("export", "Export")  # one export at a time, from any dialog
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Writes <code>model.onnx</code>, <code>model.torchscript.pt</code> and "
                                "<code>model-card.json</code>, after checking that both give the same masks as the app."))
        row = QHBoxLayout()
        project = session.project
        default = project.path / "exports" / "latest" if project is not None else Path.home() / "defect-studio-export"
        saved = project.get_setting("gui.export_dir") if project is not None and run_id is None else None
        if project is not None and run_id is not None:
            default = project.path / "exports" / f"run-{run_id}"
        self.folder_edit = QLineEdit(str(saved or default), self)
        self.folder_edit.setObjectName("exportFolder")
        browse = QPushButton("Browse…", self)
        browse.clicked.connect(self._browse)
        row.addWidget(QLabel("Folder"))
        row.addWidget(self.folder_edit, 1)
        row.addWidget(browse)
        layout.addLayout(row)
        self.export_button = QPushButton("Export", self)
        self.export_button.setObjectName("runExport")
        self.export_button.clicked.connect(self.start_export)
        layout.addWidget(self.export_button)
        layout.addWidget(JobRow(self.runner, self))
        self.result = QTextBrowser(self)
        self.result.setObjectName("exportResult")
        self.result.setMinimumSize(560, 300)
        layout.addWidget(self.result, 1)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.close)
        layout.addWidget(buttons)
        self.last_result: Any = None
        self.runner.succeeded.connect(self._done)
        self.runner.finished.connect(lambda _: self.export_button.setEnabled(True))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)

    def start_export(self) -> bool:
        project = self.session.project
        if project is None or self.runner.busy:
            return False
        from defect_studio.ml.export import export_project_job  # loads torch and onnx: only when exporting

        out_dir = Path(self.folder_edit.text()).expanduser()
        if self.run_id is None:
            project.set_setting("gui.export_dir", str(out_dir))
        self.export_button.setEnabled(False)
        self.result.setHtml("Exporting…")
        run_id = self.run_id
        return self.runner.start(lambda cancel: export_project_job(project, out_dir, cancel, run_id=run_id), "Export")

    def _done(self, result: object) -> None:
        self.last_result = result
        self.result.setHtml(describe_export(result, Path(self.folder_edit.text())))


def describe_export(result: object, out_dir: Path) -> str:
    """HTML: parity verdict first, then the model card."""
    card: dict[str, Any] = {}
    parity: Any = None
    if isinstance(result, dict):
        card = result.get("card") or {}
        parity = result.get("parity")
        out_dir = Path(result.get("out_dir", out_dir))
    elif isinstance(result, tuple) and len(result) == 2:
        out_dir, parity = Path(result[0]), result[1]
    card_path = out_dir / "model-card.json"
    if not card and card_path.is_file():
        card = json.loads(card_path.read_text(encoding="utf-8"))
    if parity is None:
        parity = card.get("parity")
    if hasattr(parity, "as_dict"):
        parity = parity.as_dict()
    parity = parity or {}
    passed = bool(parity.get("passed"))
    verdict = ("<h3 style='color:#3fb950'>✔ Parity check passed</h3>" if passed
               else "<h3 style='color:#f85149'>✘ Parity check failed</h3>")
    rows = "".join(f"<tr><td>{k.replace('_', ' ')}</td><td align='right'>{v:.4g}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{k.replace('_', ' ')}</td><td align='right'>{v}</td></tr>" for k, v in parity.items())
    card_text = json.dumps({k: v for k, v in card.items() if k != "parity"}, indent=2, default=str)
    return (f"{verdict}<p>Exported to <code>{out_dir}</code></p><table cellspacing='3'>{rows}</table>"
            f"<h4>Model card</h4><pre>{card_text}</pre>")
