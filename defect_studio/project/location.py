"""Where a project lives: in a folder of its own, or by default in `.defect-studio/` inside its image folder
(the window's File ▸ Open folder… and `defect-studio import` agree on it)."""

from __future__ import annotations

from pathlib import Path

from defect_studio.project.store import DB_NAME

PROJECT_SUBFOLDER = ".defect-studio"


def default_project_dir(images_dir: str | Path) -> Path:
    """The project folder made for an image folder when none is named."""
    return Path(images_dir) / PROJECT_SUBFOLDER


def find_project_dir(folder: str | Path) -> Path | None:
    """The project at `folder`, or the one made in it for its images; None when neither exists."""
    folder = Path(folder)
    for candidate in (folder, default_project_dir(folder)):
        if (candidate / DB_NAME).is_file():
            return candidate
    return None
