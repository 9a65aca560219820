"""Tag stage: good / defect / untag for the selected images, counts, and the keyboard flow."""

from __future__ import annotations

from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QGridLayout, QGroupBox, QLabel, QPushButton, QVBoxLayout, QWidget

from defect_studio.errors import DefectStudioError
from defect_studio.gui.dialogs import report_error
from defect_studio.gui.session import Session
from defect_studio.imageio import MAX_PIXELS
from defect_studio.project.importer import import_pixel_limit, set_import_megapixels


class TagPanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("tagPanel")
        self.session = session
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 10, 10, 10)
        layout.setSpacing(10)

        intro = QLabel(
            "Tag each image <b>good</b> or <b>defect</b>. Keys: <code>G</code> good, <code>D</code> defect, "
            "<code>U</code> untag, <code>→</code>/<code>J</code> next, <code>←</code>/<code>K</code> previous. "
            "Select several images (Ctrl/Shift+click) to tag them at once; <code>Ctrl+Z</code> undoes."
        )
        intro.setWordWrap(True)
        intro.setObjectName("panelIntro")
        layout.addWidget(intro)

        buttons = QGroupBox("Tag the selection", self)
        grid = QGridLayout(buttons)
        self.good_button = QPushButton("Good  (G)", buttons)
        self.good_button.setObjectName("goodButton")
        self.defect_button = QPushButton("Defect  (D)", buttons)
        self.defect_button.setObjectName("defectButton")
        self.untag_button = QPushButton("Untag  (U)", buttons)
        self.previous_button = QPushButton("◀  Previous", buttons)
        self.next_button = QPushButton("Next  ▶", buttons)
        self.good_button.clicked.connect(lambda: session.request_tag("good"))
        self.defect_button.clicked.connect(lambda: session.request_tag("defect"))
        self.untag_button.clicked.connect(lambda: session.request_tag("untagged"))
        self.previous_button.clicked.connect(lambda: session.request_step(-1))
        self.next_button.clicked.connect(lambda: session.request_step(+1))
        for button, tip in ((self.good_button, "Tag the selected images good (G)"),
                            (self.defect_button, "Tag the selected images defect (D)"),
                            (self.untag_button, "Remove the tag (U)")):
            button.setToolTip(tip)
        grid.addWidget(self.good_button, 0, 0)
        grid.addWidget(self.defect_button, 0, 1)
        grid.addWidget(self.untag_button, 0, 2)
        grid.addWidget(self.previous_button, 1, 0)
        grid.addWidget(self.next_button, 1, 2)
        layout.addWidget(buttons)

        counts_box = QGroupBox("Project", self)
        counts_layout = QVBoxLayout(counts_box)
        self.counts_label = QLabel(counts_box)
        self.counts_label.setObjectName("tagCounts")
        self.counts_label.setWordWrap(True)
        counts_layout.addWidget(self.counts_label)
        self.rescan_button = QPushButton("Import new images from the folder", counts_box)
        self.rescan_button.setToolTip("Look for images added to the project's image folder since the last import")
        self.rescan_button.clicked.connect(session.request_rescan)
        # Images over the limit are skipped (from their header, before decoding) and listed in the import report;
        # raising it and importing again brings them in.
        self.import_limit = QDoubleSpinBox(counts_box)
        self.import_limit.setObjectName("importLimit")
        self.import_limit.setRange(0.1, MAX_PIXELS / 1e6)
        self.import_limit.setDecimals(1)
        self.import_limit.setSuffix(" MP")
        self.import_limit.setKeyboardTracking(False)  # commit the typed number, not every digit of it
        self.import_limit.setToolTip("Images larger than this are not imported (they are listed in the import report). "
                                     "Remembered by the project; the command line's import --max-megapixels sets it too.")
        self.import_limit.valueChanged.connect(self._set_import_limit)
        limit_form = QFormLayout()
        limit_form.addRow("Largest image to import", self.import_limit)
        counts_layout.addLayout(limit_form)
        counts_layout.addWidget(self.rescan_button)
        layout.addWidget(counts_box)
        layout.addStretch(1)

        # Rescan starts an import: it waits, disabled, while one runs (the project flow's runner).
        self.import_runner = session.shared_runner("import", "Import")
        self.import_runner.started.connect(lambda _: self._update_rescan_enabled())
        self.import_runner.finished.connect(lambda _: self._update_rescan_enabled())
        session.project_changed.connect(self.refresh)
        session.counts_changed.connect(lambda _: self.refresh())
        self.refresh()

    def refresh(self) -> None:
        project = self.session.project
        enabled = project is not None
        for button in (self.good_button, self.defect_button, self.untag_button, self.previous_button,
                       self.next_button):
            button.setEnabled(enabled)
        self._update_rescan_enabled()
        self.import_limit.setEnabled(enabled)
        if project is None:
            self.counts_label.setText("No project open.")
            return
        self.import_limit.blockSignals(True)  # showing the project's value is not a change of it
        self.import_limit.setValue(import_pixel_limit(project) / 1e6)
        self.import_limit.blockSignals(False)
        counts = self.session.counts
        ready = counts.get("good", 0) >= 2 and counts.get("defect", 0) >= 2
        self.counts_label.setText(
            f"<table cellspacing='4'>"
            f"<tr><td>Images</td><td align='right'><b>{counts.get('images', 0)}</b></td></tr>"
            f"<tr><td><span style='color:#3fb950'>●</span> Good</td><td align='right'><b>{counts.get('good', 0)}</b></td></tr>"
            f"<tr><td><span style='color:#f85149'>●</span> Defect</td><td align='right'><b>{counts.get('defect', 0)}</b></td></tr>"
            f"<tr><td><span style='color:#8b949e'>●</span> Untagged</td><td align='right'><b>{counts.get('untagged', 0)}</b></td></tr>"
            f"</table><p>{'Ready to train the classifier (Train tab).' if ready else 'Tag at least a few images of each class to train.'}</p>"
        )

    def _update_rescan_enabled(self) -> None:
        self.rescan_button.setEnabled(self.session.project is not None and not self.import_runner.busy)

    def _set_import_limit(self, megapixels: float) -> None:
        project = self.session.project
        if project is None:
            return
        try:
            set_import_megapixels(project, megapixels)
        except DefectStudioError as error:
            report_error(self, "Cannot set the import limit", error)
