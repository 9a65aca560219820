"""Review stage: make the round's proposals, then accept (A), reject (R) or edit each mask.

The queue lists the current round's masks still to review. Editing uses `MaskEditor` on the
main viewer: brush (B), eraser (E), size `[`/`]` or Ctrl+wheel, fill holes, clear, revert to
the proposal, undo/redo per stroke. Every change is saved through the project store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from defect_studio.errors import DefectStudioError
from defect_studio.gui.dialogs import confirm, report_error
from defect_studio.gui.mask_editor import MaskEditor
from defect_studio.gui.panels.common import JobRow
from defect_studio.gui.session import Session, Stage
from defect_studio.ml.cams.registry import CAM_METHODS, method_label
from defect_studio.ml.pseudo import PseudoLabelSettings, create_checked_round, pseudo_job
from defect_studio.ml.review_order import edit_first_queue, rank_for_review_job
from defect_studio.project import review
from defect_studio.workflow_settings import load_workflow_settings, update_workflow_settings


class ReviewPanel(QWidget):
    """The review stage; it edits masks with `editor` on the window's image viewer."""

    def __init__(self, session: Session, editor: MaskEditor, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("reviewPanel")
        self.session = session
        self.editor = editor
        self.runner = session.make_runner("Pseudo-labels")
        self.active = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 10, 10, 10)
        layout.setSpacing(8)

        layout.addWidget(self._build_proposals())
        layout.addWidget(self._build_queue())
        layout.addWidget(self._build_editing())
        layout.addStretch(1)

        self.editor.brush_size_changed.connect(self._brush_size_changed)
        self.editor.tool_changed.connect(self._tool_changed)
        self.editor.mask_changed.connect(self._update_buttons)
        self.editor.mask_saved.connect(lambda *_: self.refresh())  # an edited mask leaves the queue
        self.editor.undo_group.canUndoChanged.connect(lambda _: self._update_buttons())
        self.editor.undo_group.canRedoChanged.connect(lambda _: self._update_buttons())
        self.runner.succeeded.connect(lambda _: session.notify_masks_changed())
        self.runner.finished.connect(lambda _: self.refresh())
        self.order_runner.finished.connect(lambda _: self.refresh())
        session.image_changed.connect(self._image_changed)
        session.project_changed.connect(self._show_project_thresholds)
        session.project_changed.connect(self.refresh)
        session.masks_changed.connect(self._masks_changed)
        session.tags_changed.connect(self.refresh)
        session.stage_changed.connect(lambda stage: self.stage_activated() if stage == Stage.REVIEW else self.stage_deactivated())
        self.refresh()

    def _build_proposals(self) -> QGroupBox:
        """The CAM method, the thresholds and the button that makes the round's proposals."""
        propose_box = QGroupBox("Proposals", self)
        propose_form = QFormLayout(propose_box)
        self.round_label = QLabel(propose_box)
        self.round_label.setObjectName("roundLabel")
        self.round_label.setWordWrap(True)
        propose_form.addRow(self.round_label)
        self.method_combo = QComboBox(propose_box)
        self.method_combo.setObjectName("proposalMethod")
        self.method_combo.setToolTip("The CAM the round-0 proposals come from")
        for method in CAM_METHODS:
            self.method_combo.addItem(method_label(method), method)
        propose_form.addRow("CAM method", self.method_combo)
        self.high_spin = QDoubleSpinBox(propose_box)
        self.high_spin.setRange(0.0, 1.0)
        self.high_spin.setSingleStep(0.05)
        self.high_spin.setToolTip("Defect where the map is at least this high")
        self.low_spin = QDoubleSpinBox(propose_box)
        self.low_spin.setRange(0.0, 1.0)
        self.low_spin.setSingleStep(0.05)
        self.low_spin.setToolTip("Background where the map is at most this; in between is ignored in training")
        defaults = PseudoLabelSettings()
        self.high_spin.setValue(defaults.high)
        self.low_spin.setValue(defaults.low)
        thresholds = QHBoxLayout()
        thresholds.addWidget(QLabel("high"))
        thresholds.addWidget(self.high_spin)
        thresholds.addWidget(QLabel("low"))
        thresholds.addWidget(self.low_spin)
        propose_form.addRow("Thresholds", thresholds)
        self.propose_button = QPushButton("Make proposals", propose_box)
        self.propose_button.setObjectName("proposeButton")
        self.propose_button.setToolTip("Turn the CAMs into mask proposals for the current round (in the background)")
        self.propose_button.clicked.connect(self.make_proposals)
        propose_form.addRow(self.propose_button)
        propose_form.addRow(JobRow(self.runner, propose_box))
        return propose_box

    def _build_queue(self) -> QGroupBox:
        """The masks still to review, in the edit-first order with each one's reason, and the decisions."""
        queue_box = QGroupBox("To review", self)
        queue_layout = QVBoxLayout(queue_box)
        self.order_runner = self.session.make_runner("Review order")
        order_row = QHBoxLayout()
        order_label = QLabel("Order", queue_box)
        self.order_combo = QComboBox(queue_box)
        self.order_combo.setObjectName("queueOrder")
        self.order_combo.setToolTip("Edit first: the masks whose editing is expected to help the segmenter most at the "
                                    "top, each with its reason. Image order: by image (Ctrl+Shift+K switches).")
        self.order_combo.addItem("Edit first", "edit-first")
        self.order_combo.addItem("Image order", "image")
        self.order_combo.currentIndexChanged.connect(lambda _: self._fill_queue())
        self.rank_button = QPushButton("Rank  (Ctrl+K)", queue_box)
        self.rank_button.setObjectName("rankQueueButton")
        self.rank_button.setToolTip("Order the masks still to review by the expected gain from editing them, from the "
                                    "classifier and the last segmenter, in the background (Ctrl+K)")
        self.rank_button.clicked.connect(self.rank_queue)
        order_row.addWidget(order_label)
        order_row.addWidget(self.order_combo, 1)
        order_row.addWidget(self.rank_button)
        queue_layout.addLayout(order_row)
        queue_layout.addWidget(JobRow(self.order_runner, queue_box))
        self.queue = QListWidget(queue_box)
        self.queue.setObjectName("reviewQueue")
        self.queue.setMaximumHeight(150)
        self.queue.itemActivated.connect(self._queue_clicked)
        self.queue.itemClicked.connect(self._queue_clicked)
        self.queue.currentItemChanged.connect(lambda *_: self._show_reason())
        queue_layout.addWidget(self.queue)
        self.reason_label = QLabel(queue_box)
        self.reason_label.setObjectName("queueReason")
        self.reason_label.setWordWrap(True)
        queue_layout.addWidget(self.reason_label)
        decide = QHBoxLayout()
        self.accept_button = QPushButton("Accept  (A)", queue_box)
        self.accept_button.setObjectName("acceptButton")
        self.accept_button.setToolTip("The mask is right: keep it as the label and go to the next (A)")
        self.accept_button.clicked.connect(self.accept_current)
        self.reject_button = QPushButton("Reject  (R)", queue_box)
        self.reject_button.setObjectName("rejectButton")
        self.reject_button.setToolTip("The mask is wrong: leave this image out of the round's training (R)")
        self.reject_button.clicked.connect(self.reject_current)
        decide.addWidget(self.accept_button)
        decide.addWidget(self.reject_button)
        queue_layout.addLayout(decide)
        # On a row of its own: beside Accept and Reject it made the panel wider than the dock.
        self.reject_rest_button = QPushButton("Reject the rest  (Shift+R)", queue_box)
        self.reject_rest_button.setObjectName("rejectRestButton")
        self.reject_rest_button.setToolTip("Reject every mask still to review: this round trains on your edits and accepts only. "
                                           "On Magnetic Tile that beat using unreviewed CAM proposals threefold.")
        self.reject_rest_button.clicked.connect(self.reject_rest)
        queue_layout.addWidget(self.reject_rest_button)
        self.state_label = QLabel(queue_box)
        self.state_label.setObjectName("maskState")
        queue_layout.addWidget(self.state_label)
        return queue_box

    def _build_editing(self) -> QGroupBox:
        """The mask tools: pan, brush, eraser, assist, the brush size, undo and redo."""
        edit_box = QGroupBox("Edit the mask", self)
        grid = QGridLayout(edit_box)
        self.tool_group = QButtonGroup(self)
        self.tool_group.setExclusive(True)
        self.tool_buttons: dict[str, QPushButton] = {}
        for column, (tool, text, tip) in enumerate((
            ("", "Pan  (Esc)", "Pan and zoom with the mouse"),
            ("brush", "Brush  (B)", "Paint defect pixels"),
            ("eraser", "Eraser  (E)", "Paint background pixels"),
            ("assist", "Assist  (W)", "Click or stroke loosely inside a defect: its region grows into the mask "
                                     "(Shift+drag removes the grown region)"),
        )):
            button = QPushButton(text, edit_box)
            button.setCheckable(True)
            button.setToolTip(tip)
            button.setObjectName(f"tool_{tool or 'pan'}")
            button.clicked.connect(lambda _=False, t=tool: self.choose_tool(t))
            self.tool_group.addButton(button)
            self.tool_buttons[tool] = button
            grid.addWidget(button, *divmod(column, 3))  # Assist starts the second row: four in a row widen the dock
        self.tool_buttons[""].setChecked(True)
        size_row = QHBoxLayout()
        self.size_slider = QSlider(Qt.Orientation.Horizontal, edit_box)
        self.size_slider.setObjectName("brushSize")
        self.size_slider.setRange(1, 128)
        self.size_slider.setValue(self.editor.brush_size)
        self.size_slider.setToolTip("Brush size in image pixels ([ and ], or Ctrl+wheel)")
        self.size_slider.valueChanged.connect(self.editor.set_brush_size)
        self.size_label = QLabel(f"{self.editor.brush_size} px", edit_box)
        self.size_label.setMinimumWidth(48)
        size_row.addWidget(QLabel("Size"))
        size_row.addWidget(self.size_slider, 1)
        size_row.addWidget(self.size_label)
        grid.addLayout(size_row, 1, 1, 1, 2)
        self.undo_button = QPushButton("Undo", edit_box)
        self.undo_button.setToolTip("Undo the last stroke (Ctrl+Z)")
        self.undo_button.clicked.connect(self.undo)
        self.redo_button = QPushButton("Redo", edit_box)
        self.redo_button.setToolTip("Redo (Ctrl+Shift+Z)")
        self.redo_button.clicked.connect(self.redo)
        self.fill_button = QPushButton("Fill holes", edit_box)
        self.fill_button.setToolTip("Fill the holes inside the defect regions (Ctrl+F)")
        self.fill_button.clicked.connect(self.fill_holes)
        self.clear_button = QPushButton("Clear", edit_box)
        self.clear_button.setToolTip("Erase the whole mask (undoable)")
        self.clear_button.clicked.connect(self.editor.clear)
        self.revert_button = QPushButton("Revert to proposal", edit_box)
        self.revert_button.setToolTip("Throw away the edits of this image and go back to the proposal")
        self.revert_button.clicked.connect(self.revert_current)
        grid.addWidget(self.undo_button, 2, 0)
        grid.addWidget(self.redo_button, 2, 1)
        grid.addWidget(self.fill_button, 2, 2)
        grid.addWidget(self.clear_button, 3, 0)
        grid.addWidget(self.revert_button, 3, 1, 1, 2)
        return edit_box

    # --- state ---------------------------------------------------------------------------------------
    def refresh(self) -> None:
        project = self.session.project
        if project is not None:
            index = self.method_combo.findData(load_workflow_settings(project).cam_method)
            if index >= 0:
                self.method_combo.setCurrentIndex(index)
        has_classifier = project is not None and project.latest_run("classifier") is not None
        round_index = self.session.round
        if project is None:
            self.round_label.setText("No project open.")
        elif round_index is None:
            self.round_label.setText("No round yet. " + ("Make the round-0 proposals from the CAMs." if has_classifier
                                                         else "Train a classifier first (Train tab)."))
        else:
            counts = project.mask_state_counts(tag="defect").get(round_index, {})  # good images need no review
            self.round_label.setText(
                f"<b>Round {round_index}</b>: {counts.get('proposed', 0)} to review, {counts.get('accepted', 0)} accepted, "
                f"{counts.get('edited', 0)} edited, {counts.get('rejected', 0)} rejected, {counts.get('flagged', 0)} flagged empty."
            )
        proposals_exist = project is not None and round_index in project.mask_state_counts()
        self.propose_button.setEnabled(has_classifier and not self.runner.busy)
        self.propose_button.setText("Make round-0 proposals" if round_index is None else
                                    ("Make the proposals again" if proposals_exist else f"Make round-{round_index} proposals"))
        self._fill_queue()
        self._update_buttons()

    def _fill_queue(self) -> None:
        self.queue.clear()
        project = self.session.project
        round_index = self.session.round
        if project is None or round_index is None:
            return
        entries = edit_first_queue(project, round_index)  # the stored edit-first order, unordered ones last
        edit_first = self.order_combo.currentData() == "edit-first"
        if not edit_first:
            entries.sort(key=lambda entry: entry.image_id)
        for entry in entries:
            place = f"{entry.rank:>3}.  " if edit_first and entry.rank is not None else ""
            item = QListWidgetItem(f"{place}{entry.stem}{'   ⚑ empty' if entry.flagged else ''}")
            item.setData(Qt.ItemDataRole.UserRole, entry.image_id)
            item.setData(Qt.ItemDataRole.UserRole + 1, entry.reason)
            if entry.reason:
                item.setToolTip(entry.reason)
            self.queue.addItem(item)
            if entry.image_id == self.session.image_id:
                self.queue.setCurrentItem(item)
        self._show_reason()

    def _show_reason(self) -> None:
        """Why the current mask sits where it does in the edit-first order (or how to get the order)."""
        project, round_index = self.session.project, self.session.round
        item = self.queue.currentItem()
        if project is None or round_index is None or self.queue.count() == 0:
            self.reason_label.setText("")
        elif self.order_combo.currentData() != "edit-first":
            self.reason_label.setText("In image order. Ctrl+Shift+K shows the masks worth editing first at the top.")
        elif not project.review_order(round_index):
            self.reason_label.setText(f"Round {round_index} has no edit-first order yet: Rank (Ctrl+K) computes it.")
        elif item is None:
            self.reason_label.setText("Edit first: the top of the list is expected to help the segmenter most.")
        else:
            reason = item.data(Qt.ItemDataRole.UserRole + 1)
            self.reason_label.setText(f"<b>Why here:</b> {reason}" if reason else
                                      "Not in the edit-first order (proposed since it was computed): Rank (Ctrl+K) again.")

    def _update_buttons(self) -> None:
        has_session = self.editor.session is not None
        record = self._current_record()
        for button in (self.accept_button, self.reject_button):
            button.setEnabled(record is not None)
        self.reject_rest_button.setEnabled(self.queue.count() > 0)
        self.rank_button.setEnabled(self.queue.count() > 0 and not self.order_runner.busy)
        for button in (self.fill_button, self.clear_button, *self.tool_buttons.values()):
            button.setEnabled(has_session)
        self.revert_button.setEnabled(record is not None and record.state != "proposed")
        stack = self.editor.undo_stack
        self.undo_button.setEnabled(stack is not None and stack.canUndo())
        self.redo_button.setEnabled(stack is not None and stack.canRedo())
        if record is None:
            self.state_label.setText("This image has no mask in this round." if self.session.round is not None else "")
        else:
            source = record.source
            self.state_label.setText(f"Mask: <b>{record.state}</b> · source {source}{' · flagged empty' if record.flagged else ''}")

    def _current_record(self) -> Any:
        project, image_id, round_index = self.session.project, self.session.image_id, self.session.round
        if project is None or image_id is None or round_index is None:
            return None
        return project.mask_record(image_id, round_index)

    # --- image and round changes -------------------------------------------------------------------
    def _image_changed(self, image_id: Any) -> None:
        self.open_current_mask()
        for row in range(self.queue.count()):
            if self.queue.item(row).data(Qt.ItemDataRole.UserRole) == image_id:
                self.queue.setCurrentRow(row)
                break
        self._update_buttons()

    def open_current_mask(self) -> None:
        """Put the current image's mask of the current round in the editor (empty for an untouched defect image)."""
        project, image_id, round_index = self.session.project, self.session.image_id, self.session.round
        if project is None or image_id is None or round_index is None:
            self.editor.close_session()
            return
        record = project.mask_record(image_id, round_index)
        image = project.image(image_id)
        if record is not None:
            try:
                mask = project.load_mask(record)
            except DefectStudioError as error:
                report_error(self, "Cannot read the mask", error)
                self.editor.close_session()
                return
        elif image.tag == "defect":
            mask = np.zeros((image.height, image.width), bool)  # hand-label from scratch
        else:
            self.editor.close_session()
            return
        self.editor.open(image_id, round_index, mask)
        self.editor.viewer.mask_layer.setVisible(self.session.current_stage != Stage.CAMS)  # the CAMs show alone

    def _masks_changed(self) -> None:
        # Proposals were (re)made: the masks on disk are the truth now; old undo histories would lie.
        self.editor.forget_all()
        self.open_current_mask()
        self.refresh()

    def stage_activated(self) -> None:
        self.active = True
        self.editor.viewer.mask_layer.setVisible(True)
        self.refresh()

    def stage_deactivated(self) -> None:
        if self.active:
            self.active = False
            self.choose_tool("")
        self.editor.viewer.mask_layer.setVisible(self.session.current_stage != Stage.CAMS)

    def _show_project_thresholds(self) -> None:
        """The thresholds the project's proposals were last made with (here or by `defect-studio pseudo`)."""
        project = self.session.project
        chosen = load_workflow_settings(project).pseudo if project is not None else {}
        settings = PseudoLabelSettings(**{k: v for k, v in chosen.items() if k in ("high", "low")})
        self.high_spin.setValue(settings.high)
        self.low_spin.setValue(settings.low)

    # --- actions -------------------------------------------------------------------------------------
    def make_proposals(self) -> bool:
        project = self.session.project
        method = self.method_combo.currentData()
        if project is None or method is None or self.runner.busy:
            return False
        thresholds = {"high": self.high_spin.value(), "low": min(self.low_spin.value(), self.high_spin.value())}
        # The project's settings, with this tab's choices, are what the command line's `pseudo` uses too.
        record = update_workflow_settings(project, cam_method=method, pseudo=thresholds)
        settings = PseudoLabelSettings.from_dict(record.pseudo).to_dict()
        cam_spec = record.cam_spec()  # the same maps the CAM viewer shows
        round_index = self.session.round
        if round_index is None:
            try:  # refused before an empty round is created
                round_index = create_checked_round(project, {**cam_spec.to_record(), "pseudo": settings})
            except DefectStudioError as error:
                report_error(self, "Cannot make proposals", error)
                return False
            self.session.notify_masks_changed()
        self.editor.flush()
        index = round_index
        return self.runner.start(lambda cancel: pseudo_job(project, index, cam_spec, settings, cancel),
                                 f"Round-{index} proposals")

    def choose_tool(self, tool: str) -> None:
        if tool and self.session.current_stage != Stage.REVIEW:
            self.session.request_stage(Stage.REVIEW)  # B/E jump to the review stage
        self.editor.set_tool(tool)

    def _tool_changed(self, tool: str) -> None:
        self.tool_buttons[tool].setChecked(True)

    def _brush_size_changed(self, size: int) -> None:
        self.size_label.setText(f"{size} px")
        if self.size_slider.value() != size:
            self.size_slider.blockSignals(True)
            self.size_slider.setValue(min(size, self.size_slider.maximum()))
            self.size_slider.blockSignals(False)

    def fill_holes(self) -> None:
        self.editor.fill_holes()

    def undo(self) -> None:
        stack = self.editor.undo_stack
        if stack is not None and stack.canUndo():
            stack.undo()

    def redo(self) -> None:
        stack = self.editor.undo_stack
        if stack is not None and stack.canRedo():
            stack.redo()

    def _decide(self, state: str) -> None:
        project, image_id, round_index = self.session.project, self.session.image_id, self.session.round
        if project is None or image_id is None or round_index is None:
            return
        try:
            self.editor.flush()
            record = project.mask_record(image_id, round_index)
            if record is None:
                return
            record = review.decide(project, image_id, state, round_index)  # the CLI's rule: an edit stays edited
        except DefectStudioError as error:
            report_error(self, "Cannot save the review", error)
            return
        queue_before = self._queue_ids()
        self.session.notify_mask_state(image_id, round_index, record.state)
        self.refresh()
        self._go_to_next_in_queue(image_id, queue_before)

    def accept_current(self) -> None:
        self._decide("accepted")

    def reject_current(self) -> None:
        self._decide("rejected")

    def reject_rest(self) -> int:
        """Reject every defect image's mask still to review in the current round (asks first); returns how many."""
        project, round_index = self.session.project, self.session.round
        remaining = self.queue.count()
        if project is None or round_index is None or remaining == 0:
            return 0
        if not confirm(self, "Reject the rest",
                       f"Reject the {remaining} mask(s) still to review in round {round_index}? Those images sit "
                       "this round out; the segmenter trains on your edited and accepted masks and the good images."):
            return 0
        try:
            self.editor.flush()
            result = review.reject_rest(project, round_index)
        except DefectStudioError as error:
            report_error(self, "Cannot save the review", error)
            return 0
        self.session.notify_mask_states_changed()  # not notify_masks_changed: no mask changed, undo histories stay
        self.refresh()
        return len(result.changed)

    def _queue_ids(self) -> list[int]:
        return [self.queue.item(row).data(Qt.ItemDataRole.UserRole) for row in range(self.queue.count())]

    def _go_to_next_in_queue(self, after_image_id: int, queue_before: list[int] | None = None) -> None:
        """The next image still to review after the one just decided, in the queue's order (wrapping round)."""
        ids = self._queue_ids()
        if not ids:
            return
        if queue_before and after_image_id in queue_before:
            still = set(ids)
            later = [i for i in queue_before[queue_before.index(after_image_id) + 1:] if i in still]
        else:
            later = [image_id for image_id in ids if image_id > after_image_id]
        self.session.request_image(later[0] if later else ids[0])

    def toggle_queue_order(self) -> None:
        """Edit-first order <-> image order (Ctrl+Shift+K)."""
        self.order_combo.setCurrentIndex(1 - self.order_combo.currentIndex())

    def rank_queue(self) -> bool:
        """Compute the current round's edit-first order in the background (stored in the project)."""
        project, round_index = self.session.project, self.session.round
        if project is None or round_index is None or self.order_runner.busy or self.queue.count() == 0:
            return False
        self.editor.flush()
        index = round_index
        started = self.order_runner.start(lambda cancel: rank_for_review_job(project, index, cancel),
                                          f"Edit-first order of round {index}")
        if started:
            self.order_combo.setCurrentIndex(self.order_combo.findData("edit-first"))
        self._update_buttons()
        return started

    def _queue_clicked(self, item: QListWidgetItem) -> None:
        self.session.request_image(item.data(Qt.ItemDataRole.UserRole))

    def revert_current(self) -> None:
        project, image_id, round_index = self.session.project, self.session.image_id, self.session.round
        if project is None or image_id is None or round_index is None:
            return
        self.editor.flush()
        try:
            record = project.revert_to_proposal(image_id, round_index)
        except DefectStudioError as error:
            report_error(self, "Cannot revert", error)
            return
        self.editor.forget(image_id, round_index)
        self.open_current_mask()
        self.session.notify_mask_state(image_id, round_index, record.state)
        self.refresh()
