"""The mask editor: brush, eraser and assist strokes, fill holes, clear, revert, with one undo step per stroke.

The assist tool: a click or a loose stroke inside a defect grows into the defect's region
(`defect_studio.ml.assist.grow_region`, with the round's proposal as a hint), merged into the mask on
release; with Shift held at the press, the grown region is removed instead.

Each image gets its own `QUndoStack` (gathered in a `QUndoGroup`, whose active stack follows the
image on screen). A stroke never copies the whole mask (100 MB for a 100 MP image): before it first
paints into a block of `STROKE_BLOCK` × `STROKE_BLOCK` pixels it saves that block's pixels, and its
undo command keeps only the saved blocks it changed; an assist step keeps its window, and fill /
clear / revert the bounding box of the pixels they changed. Undo and redo swap the stored pixels
with the mask's, so no second copy is stored.
Edits are written through `project.save_edited_mask` (atomic) shortly after each change and at
once when the user leaves the image, accepts, or closes the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication, QUndoCommand, QUndoGroup, QUndoStack

from defect_studio.errors import DefectStudioError
from defect_studio.gui.viewer import ImageViewer
from defect_studio.ml.assist import DEFAULT_ASSIST_METHOD, grow_region, merge_region
from defect_studio.project import Project


MIN_BRUSH, MAX_BRUSH = 1, 256
TOOLS = ("", "brush", "eraser", "assist")
AUTOSAVE_DELAY_MS = 400
STROKE_BLOCK = 64  # px: a stroke saves the mask block by block before painting into it

Box = tuple[int, int, int, int]  # x0, y0, x1, y1


class StrokeBackup:
    """The pixels a stroke painted over, as they were: each `STROKE_BLOCK` block saved before the
    stroke first paints into it, so memory follows the stroke's path, never the image's size."""

    def __init__(self, mask: np.ndarray, block: int = STROKE_BLOCK) -> None:
        self.mask = mask
        self.block = block
        self.blocks: dict[tuple[int, int], np.ndarray] = {}  # (block row, block column) -> original pixels

    def block_box(self, row: int, column: int) -> Box:
        height, width = self.mask.shape
        b = self.block
        return column * b, row * b, min(width, (column + 1) * b), min(height, (row + 1) * b)

    def save(self, x0: int, y0: int, x1: int, y1: int) -> None:
        """Keep the original pixels of every block the rectangle [x0, x1) × [y0, y1) touches."""
        b = self.block
        for row in range(y0 // b, (y1 - 1) // b + 1):
            for column in range(x0 // b, (x1 - 1) // b + 1):
                if (row, column) not in self.blocks:
                    bx0, by0, bx1, by1 = self.block_box(row, column)
                    self.blocks[(row, column)] = self.mask[by0:by1, bx0:bx1].copy()

    def changed_blocks(self) -> list[tuple[Box, np.ndarray]]:
        """(box, original pixels) of the saved blocks whose pixels the stroke changed."""
        changed = []
        for (row, column), original in self.blocks.items():
            x0, y0, x1, y1 = self.block_box(row, column)
            if not np.array_equal(original, self.mask[y0:y1, x0:x1]):
                changed.append(((x0, y0, x1, y1), original))
        return changed


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` (H×W, nonzero = defect) with every hole filled: background that no 4-connected path
    of background joins to the image's edge (as scipy.ndimage.binary_fill_holes does)."""
    height, width = mask.shape
    # A one-pixel background frame joins every edge-touching background region into one, so a
    # single flood fill from a corner reaches all of them; what it does not reach is a hole.
    outside = np.zeros((height + 2, width + 2), np.uint8)
    outside[1:-1, 1:-1] = mask > 0
    flood_mask = np.zeros((height + 4, width + 4), np.uint8)  # OpenCV wants it 2 px larger
    cv2.floodFill(outside, flood_mask, (0, 0), 2, flags=4)
    return outside[1:-1, 1:-1] != 2


def changed_box(old: np.ndarray, new: np.ndarray) -> Box | None:
    """The bounding box (x0, y0, x1, y1) of the pixels where `old` and `new` differ; None if none do."""
    differs = old != new
    rows = np.flatnonzero(differs.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(differs[rows[0] : rows[-1] + 1].any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


@dataclass
class MaskEditSession:
    """The editable mask of one image in one round (uint8 0/1 so OpenCV can draw on it)."""

    image_id: int
    round_index: int
    mask: np.ndarray
    stack: QUndoStack
    unsaved: bool = False
    stroke_count: int = field(default=0)
    scratch: bool = False  # never saved (benchmarks, previews)
    prior: np.ndarray | None = None  # the round's proposal, the assist tool's hint (read on first use)
    prior_loaded: bool = False


class RegionSwapCommand(QUndoCommand):
    """Undo/redo by swapping rectangles of the mask with the stored pixels (one rectangle, or the
    blocks a stroke changed).

    Created after the change was applied, holding the *old* pixels; the first redo (done by
    QUndoStack.push) is therefore skipped.
    """

    def __init__(self, editor: "MaskEditor", session: MaskEditSession, box: Box, old_pixels: np.ndarray, text: str,
                 parts: list[tuple[Box, np.ndarray]] | None = None) -> None:
        super().__init__(text)
        self._editor = editor
        self._session = session
        self._box = box  # what to repaint: the union of the parts
        self._parts = parts if parts is not None else [(box, old_pixels)]
        self._applied = True

    @classmethod
    def of_blocks(cls, editor: "MaskEditor", session: MaskEditSession, parts: list[tuple[Box, np.ndarray]],
                  text: str) -> "RegionSwapCommand":
        box = (min(p[0][0] for p in parts), min(p[0][1] for p in parts),
               max(p[0][2] for p in parts), max(p[0][3] for p in parts))
        return cls(editor, session, box, parts[0][1], text, parts)

    def _swap(self) -> None:
        swapped = []
        for (x0, y0, x1, y1), stored in self._parts:
            region = self._session.mask[y0:y1, x0:x1]
            current = region.copy()
            region[...] = stored
            swapped.append(((x0, y0, x1, y1), current))
        self._parts = swapped
        self._editor._changed(self._session, self._box)

    def redo(self) -> None:
        if self._applied:
            self._applied = False
            return
        self._swap()

    def undo(self) -> None:
        self._swap()

    @property
    def stored_bytes(self) -> int:
        return sum(int(stored.nbytes) for _, stored in self._parts)


class MaskEditor(QObject):
    """Edits the mask of the image shown in `viewer`; one session per (image, round)."""

    tool_changed = Signal(str)  # "brush", "eraser", "assist" or "" (pan)
    brush_size_changed = Signal(int)
    mask_saved = Signal(int, int, str)  # image id, round, state
    mask_changed = Signal()
    message = Signal(str)  # what the assist tool did, or why it did nothing (for the status bar)

    def __init__(self, viewer: ImageViewer, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.project: Project | None = None
        self.undo_group = QUndoGroup(self)
        self.session: MaskEditSession | None = None
        self._sessions: dict[tuple[int, int], MaskEditSession] = {}
        self.tool = ""
        self.brush_size = 15
        self._stroke_backup: StrokeBackup | None = None
        self._stroke_box: list[int] | None = None
        self._last_point: tuple[int, int] | None = None
        self._hover: tuple[float, float] | None = None
        self._assist_points: list[tuple[int, int]] | None = None
        self._assist_subtract = False
        self.assist_method = DEFAULT_ASSIST_METHOD
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave.timeout.connect(self.flush)
        layer = viewer.mask_layer
        layer.on_press = self._press
        layer.on_move = self._move
        layer.on_release = self._release
        layer.on_hover = self._hovered
        viewer.ctrl_wheel.connect(lambda steps: self.set_brush_size(self.brush_size + steps * max(1, self.brush_size // 8)))

    # --- sessions ------------------------------------------------------------------------------
    def set_project(self, project: Project | None) -> None:
        self.flush()
        self.close_session()
        for session in self._sessions.values():
            self.undo_group.removeStack(session.stack)
            session.stack.deleteLater()
        self._sessions.clear()
        self.project = project

    def open(self, image_id: int, round_index: int, mask: np.ndarray, scratch: bool = False) -> MaskEditSession:
        """Edit `mask` (the round's current mask) of an image; an earlier session keeps its undo history.

        A `scratch` session is never written to the project."""
        self.flush()
        key = (image_id, round_index)
        session = self._sessions.get(key)
        if session is None or session.mask.shape != mask.shape:
            stack = QUndoStack(self)
            self.undo_group.addStack(stack)
            # The comparison's own bool array seen as 0/1 bytes: one mask-sized array made, not two (100 MB each at 100 MP).
            session = MaskEditSession(image_id, round_index, (mask > 0).view(np.uint8), stack, scratch=scratch)
            self._sessions[key] = session
        self.session = session
        self.undo_group.setActiveStack(session.stack)
        self.viewer.mask_layer.set_mask(session.mask)
        self.viewer.mask_layer.set_tool_active(bool(self.tool))
        return session

    def close_session(self) -> None:
        self.flush()
        self._assist_points = None
        self.viewer.show_stroke(None)
        self.session = None
        self.undo_group.setActiveStack(None)
        self.viewer.mask_layer.set_mask(None)
        self.viewer.show_cursor(None, 0)

    def forget(self, image_id: int, round_index: int) -> None:
        """Drop the session (after an outside change such as revert); its undo history goes with it."""
        session = self._sessions.pop((image_id, round_index), None)
        if session is not None:
            if session is self.session:
                self.session = None
                self.undo_group.setActiveStack(None)
            self.undo_group.removeStack(session.stack)
            session.stack.deleteLater()

    def forget_all(self) -> None:
        """Save pending edits, then drop every session of a project mask and its undo history (after
        new proposals: the masks on disk are the truth now). Scratch canvases stay."""
        self.flush()
        for key in [key for key, session in self._sessions.items() if not session.scratch]:
            self.forget(*key)

    @property
    def undo_stack(self) -> QUndoStack | None:
        return self.session.stack if self.session is not None else None

    # --- tools -----------------------------------------------------------------------------------
    def set_tool(self, tool: str) -> None:
        if tool not in TOOLS:
            raise ValueError(tool)
        self.tool = tool
        self.viewer.mask_layer.set_tool_active(bool(tool) and self.session is not None)
        self.viewer.view_box.setMouseEnabled(x=True, y=True)
        self._update_cursor()
        self.tool_changed.emit(tool)

    def set_brush_size(self, size: int) -> None:
        self.brush_size = int(min(MAX_BRUSH, max(MIN_BRUSH, size)))
        self._update_cursor()
        self.brush_size_changed.emit(self.brush_size)

    def _update_cursor(self) -> None:
        position = self._hover if (self.tool and self.session is not None) else None
        self.viewer.show_cursor(position, self.brush_size)

    def _hovered(self, position: tuple[float, float] | None) -> None:
        self._hover = position
        self._update_cursor()

    # --- strokes ---------------------------------------------------------------------------------
    def _press(self, x: float, y: float) -> None:
        if self.session is None or not self.tool:
            return
        if self.tool == "assist":  # the stroke only marks seeds: nothing is painted until the release
            self._assist_points = [(int(round(x - 0.5)), int(round(y - 0.5)))]
            self._assist_subtract = bool(self.viewer.mask_layer.modifiers & Qt.KeyboardModifier.ShiftModifier)
            self.viewer.show_stroke(self._assist_points, self.brush_size, self._assist_subtract)
            return
        self._stroke_backup = StrokeBackup(self.session.mask)
        point = (int(round(x - 0.5)), int(round(y - 0.5)))
        self._stroke_box = [point[0], point[1], point[0] + 1, point[1] + 1]
        self._last_point = point
        self._paint_segment(point, point)

    def _move(self, x: float, y: float) -> None:
        if self._assist_points is not None:
            point = (int(round(x - 0.5)), int(round(y - 0.5)))
            if point != self._assist_points[-1]:
                self._assist_points.append(point)
                self.viewer.show_stroke(self._assist_points, self.brush_size, self._assist_subtract)
            return
        if self._last_point is None:
            return
        point = (int(round(x - 0.5)), int(round(y - 0.5)))
        if point != self._last_point:
            self._paint_segment(self._last_point, point)
            self._last_point = point

    def _release(self, x: float, y: float) -> None:
        if self._assist_points is not None:
            self._move(x, y)
            points, self._assist_points = self._assist_points, None
            self.viewer.show_stroke(None)
            self.assist_stroke(points, subtract=self._assist_subtract)
            return
        if self._last_point is None:
            return
        self._move(x, y)
        self.end_stroke()

    def _paint_segment(self, start: tuple[int, int], end: tuple[int, int]) -> None:
        """Draw a round-capped line of the brush's width from start to end; repaint only its box."""
        assert self.session is not None and self._stroke_box is not None
        mask = self.session.mask
        height, width = mask.shape
        value = 1 if self.tool == "brush" else 0
        radius = self.brush_size / 2.0
        reach = int(np.ceil(radius)) + 1
        x0 = max(0, min(start[0], end[0]) - reach)
        y0 = max(0, min(start[1], end[1]) - reach)
        x1 = min(width, max(start[0], end[0]) + reach + 1)
        y1 = min(height, max(start[1], end[1]) + reach + 1)
        if x1 <= x0 or y1 <= y0:
            return
        if self._stroke_backup is not None:
            self._stroke_backup.save(x0, y0, x1, y1)
        # Draw on the sub-array only: OpenCV then touches (and we recolour) just this rectangle.
        region = mask[y0:y1, x0:x1]
        local_start = (start[0] - x0, start[1] - y0)
        local_end = (end[0] - x0, end[1] - y0)
        if self.brush_size <= 1:
            cv2.line(region, local_start, local_end, value, 1, cv2.LINE_8)
        else:
            draw_radius = max(0, int(round(radius - 0.5)))
            cv2.circle(region, local_end, draw_radius, value, -1, cv2.LINE_8)
            if local_start != local_end:
                cv2.circle(region, local_start, draw_radius, value, -1, cv2.LINE_8)
                cv2.line(region, local_start, local_end, value, 2 * draw_radius + 1, cv2.LINE_8)
        box = self._stroke_box
        box[0], box[1], box[2], box[3] = min(box[0], x0), min(box[1], y0), max(box[2], x1), max(box[3], y1)
        self.viewer.mask_layer.refresh(x0, y0, x1, y1)

    def end_stroke(self) -> None:
        session, backup, box = self.session, self._stroke_backup, self._stroke_box
        self._stroke_backup = self._stroke_box = self._last_point = None
        if session is None or backup is None or box is None or backup.mask is not session.mask:
            return
        changed = backup.changed_blocks()
        if not changed:
            return  # nothing changed: no undo step, nothing to save
        session.stroke_count += 1
        label = "Brush stroke" if self.tool == "brush" else "Eraser stroke"
        command = RegionSwapCommand.of_blocks(self, session, changed, label)
        session.stack.push(command)
        self._changed(session, command._box, refresh=False)

    def assist_stroke(self, points: list[tuple[int, int]], subtract: bool = False) -> bool:
        """Grow the defect under `points` (image pixels; one point is a click) and add it to the mask, or
        remove it with `subtract`: one undo step holding the grown region's window only. False, with a
        `message`, when nothing changed."""
        session = self.session
        if session is None or not points:
            return False
        pixels = self.viewer.pixels
        if pixels is None or pixels.shape[:2] != session.mask.shape:
            self.message.emit("The image is still loading: try the assist stroke again in a moment.")
            return False
        radius = max(1, int(round(self.brush_size / 2.0 - 0.5)))
        # Milliseconds for a pit, up to a few hundred for a stroke across a large defect (the window is
        # bounded): done here, so the result is one ordinary undo step, with a busy cursor meanwhile.
        QGuiApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        try:
            prior = None if subtract else self._prior(session)  # the proposal hints at defect, not at what to remove
            grown = grow_region(pixels, [points], radius, prior=prior, method=self.assist_method)
        finally:
            QGuiApplication.restoreOverrideCursor()
        if grown.empty:
            self.message.emit(grown.message or "Nothing grew from the stroke; the mask is unchanged.")
            return False
        x0, y0, x1, y1 = grown.box
        old = session.mask[y0:y1, x0:x1].copy()
        if not merge_region(session.mask, grown, subtract):
            self.message.emit("The grown region is already background: nothing to remove." if subtract
                              else "The grown region is already in the mask: nothing to add.")
            return False
        session.stroke_count += 1
        session.stack.push(RegionSwapCommand(self, session, grown.box, old, "Assist (remove)" if subtract else "Assist"))
        self._changed(session, grown.box)
        changed = int(np.count_nonzero(old != session.mask[y0:y1, x0:x1]))
        self.message.emit(grown.message or f"Assist: {changed} px {'removed from' if subtract else 'added to'} the mask.")
        return True

    def _prior(self, session: MaskEditSession) -> np.ndarray | None:
        """The round's proposal for the image (the assist tool's hint), read once per session."""
        if not session.prior_loaded and self.project is not None and not session.scratch:
            try:
                proposal = self.project.load_proposal(session.image_id, session.round_index)
            except DefectStudioError:
                proposal = None  # a missing or unreadable proposal: grow from the stroke alone
            session.prior = proposal if proposal is not None and proposal.shape == session.mask.shape else None
            session.prior_loaded = True
        return session.prior

    # --- whole-mask operations ------------------------------------------------------------------
    def _replace_all(self, new_mask: np.ndarray, text: str) -> bool:
        session = self.session
        if session is None:
            return False
        new_mask = (new_mask > 0).astype(np.uint8)
        box = changed_box(session.mask, new_mask)
        if box is None:
            return False
        x0, y0, x1, y1 = box
        old = session.mask[y0:y1, x0:x1].copy()  # the changed rectangle only, not the whole mask
        session.mask[y0:y1, x0:x1] = new_mask[y0:y1, x0:x1]
        session.stack.push(RegionSwapCommand(self, session, box, old, text))
        self._changed(session, box)
        return True

    def fill_holes(self) -> bool:
        if self.session is None:
            return False
        return self._replace_all(fill_holes(self.session.mask), "Fill holes")

    def clear(self) -> bool:
        if self.session is None:
            return False
        return self._replace_all(np.zeros_like(self.session.mask), "Clear mask")

    def replace_with(self, mask: np.ndarray, text: str = "Revert to proposal") -> bool:
        return self._replace_all(mask, text)

    # --- saving --------------------------------------------------------------------------------
    def _changed(self, session: MaskEditSession, box: tuple[int, int, int, int], refresh: bool = True) -> None:
        session.unsaved = True
        if refresh and session is self.session:
            self.viewer.mask_layer.refresh(*box)
        self._autosave.start()
        self.mask_changed.emit()

    def flush(self) -> None:
        """Save every unsaved edit now (atomic PNG + database row through the project)."""
        self._autosave.stop()
        if self.project is None:
            return
        for session in self._sessions.values():
            if session.unsaved and not session.scratch:
                record = self.project.save_edited_mask(session.image_id, session.round_index, session.mask > 0)
                session.unsaved = False
                self.mask_saved.emit(session.image_id, session.round_index, record.state)

    def current_mask(self) -> np.ndarray | None:
        return None if self.session is None else self.session.mask > 0

    def undo_bytes(self) -> int:
        """Memory held by the current image's undo history (for tests and the status bar)."""
        if self.session is None:
            return 0
        stack = self.session.stack
        total = 0
        for i in range(stack.count()):
            command = stack.command(i)
            total += getattr(command, "stored_bytes", 0)
        return total
