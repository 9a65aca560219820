"""Every keyboard shortcut in one table: the actions, the Help sheet and the README are made from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shortcut:
    action: str  # the name the window uses to find the QAction
    keys: tuple[str, ...]  # Qt key sequences, first one is shown in menus
    description: str
    group: str


SHORTCUTS: tuple[Shortcut, ...] = (
    Shortcut("open_project", ("Ctrl+O",), "Open a project or create one from an image folder", "Project"),
    Shortcut("export", ("Ctrl+E",), "Export the segmenter (ONNX + TorchScript + model card)", "Project"),
    Shortcut("quit", ("Ctrl+Q",), "Quit", "Project"),
    Shortcut("next_image", ("Right", "J"), "Next image", "Navigate"),
    Shortcut("previous_image", ("Left", "K"), "Previous image", "Navigate"),
    Shortcut("fit_view", ("F",), "Fit the image in the viewer", "Navigate"),
    Shortcut("tag_good", ("G",), "Tag the selected images good", "Tag"),
    Shortcut("tag_defect", ("D",), "Tag the selected images defect", "Tag"),
    Shortcut("untag", ("U",), "Remove the tag of the selected images", "Tag"),
    Shortcut("confirm_tag", ("C",), "Confirm the tag of the selected images (they leave the suspect-tags filter)", "Tag"),
    Shortcut("undo", ("Ctrl+Z",), "Undo: the last mask edit in the Review tab, else the last tag change", "Edit"),
    Shortcut("redo", ("Ctrl+Shift+Z", "Ctrl+Y"), "Redo", "Edit"),
    Shortcut("accept_mask", ("A",), "Accept the proposed mask and go to the next one", "Review"),
    Shortcut("reject_mask", ("R",), "Reject the proposed mask and go to the next one", "Review"),
    Shortcut("reject_rest", ("Shift+R",), "Reject every mask still to review (train on your edits and accepts)", "Review"),
    Shortcut("rank_queue", ("Ctrl+K",), "Order the review queue edit-first: the masks worth editing first at the top, each with its reason", "Review"),
    Shortcut("queue_order", ("Ctrl+Shift+K",), "Switch the review queue between edit-first and image order", "Review"),
    Shortcut("brush", ("B",), "Brush tool (paint defect)", "Review"),
    Shortcut("eraser", ("E",), "Eraser tool (paint background)", "Review"),
    Shortcut("assist", ("W",), "Assist tool: a click or loose stroke inside a defect grows its mask (Shift+drag removes)", "Review"),
    Shortcut("pan_tool", ("Escape",), "Leave the brush/eraser/assist (pan and zoom with the mouse)", "Review"),
    Shortcut("brush_smaller", ("[",), "Smaller brush (also Ctrl+wheel)", "Review"),
    Shortcut("brush_larger", ("]",), "Larger brush (also Ctrl+wheel)", "Review"),
    Shortcut("fill_holes", ("Ctrl+F",), "Fill holes in the mask", "Review"),
    Shortcut("toggle_overlay", ("O",), "Show or hide the mask / CAM overlay", "Review"),
    Shortcut("shortcut_sheet", ("F1",), "Show the keyboard shortcut sheet (Help menu)", "Help"),
)


def markdown_table() -> str:
    """The README's table of keys."""
    lines = ["| Keys | Action |", "|---|---|"]
    for entry in SHORTCUTS:
        keys = " / ".join(f"`{key}`" for key in entry.keys)
        lines.append(f"| {keys} | {entry.description} |")
    lines.append("| Mouse wheel / right-drag | Zoom the viewer; left-drag pans (outside the brush tools) |")
    return "\n".join(lines)


def html_sheet() -> str:
    """The Help ▸ Keyboard shortcuts sheet."""
    rows: list[str] = []
    current_group = None
    for entry in SHORTCUTS:
        if entry.group != current_group:
            current_group = entry.group
            rows.append(f"<tr><th colspan='2' align='left' style='padding-top:10px'>{entry.group}</th></tr>")
        keys = " &nbsp;or&nbsp; ".join(f"<code>{key}</code>" for key in entry.keys)
        rows.append(f"<tr><td style='padding-right:18px'>{keys}</td><td>{entry.description}</td></tr>")
    rows.append(
        "<tr><th colspan='2' align='left' style='padding-top:10px'>Mouse</th></tr>"
        "<tr><td>wheel / right-drag</td><td>zoom; left-drag pans when no brush is active</td></tr>"
        "<tr><td>Ctrl+wheel</td><td>brush size</td></tr>"
        "<tr><td>Shift+drag</td><td>assist tool: remove the grown region instead of adding it</td></tr>"
        "<tr><td>Ctrl/Shift+click</td><td>select several images in the gallery for bulk tagging</td></tr>"
    )
    return "<table cellspacing='2'>" + "".join(rows) + "</table>"


if __name__ == "__main__":
    print(markdown_table())
