"""Where a project lives: the window's File ▸ Open folder… and `defect-studio import` agree."""

from __future__ import annotations

from pathlib import Path

from defect_studio.cli import main
from defect_studio.project.location import default_project_dir, find_project_dir


def test_a_project_is_found_in_its_folder_or_in_its_image_folder(demo_dataset: Path, tmp_path: Path) -> None:
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((demo_dataset / "images").glob("*.png"))[:4]:
        shutil.copy(path, images / path.name)
    assert find_project_dir(images) is None
    assert main(["import", "--images", str(images)]) == 0  # the project goes where the window looks for it
    assert find_project_dir(images) == default_project_dir(images) == images / ".defect-studio"
    assert find_project_dir(images / ".defect-studio") == images / ".defect-studio"
