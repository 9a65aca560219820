from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defect_studio.errors import DataError
from defect_studio.jobs import CancelToken, JobCancelled, run_job
from defect_studio.project import Project
from defect_studio.project.importer import import_job
from tests.image_files import gradient, write_cv2, write_palette_png


def run_import(project: Project, root: Path, labels: Path | None = None):
    return run_job(import_job(project, root, labels, CancelToken()))


def distinct(seed: int, channels: int = 1, dtype=np.uint8) -> np.ndarray:
    image = gradient(channels=channels, dtype=dtype)
    image.flat[seed] = 7  # a different hash per file
    return image


def test_every_format_imports_with_its_properties(tmp_path: Path):
    root = tmp_path / "images"
    write_cv2(root / "a.jpg", distinct(1))
    write_cv2(root / "b.png", distinct(2, channels=3))
    write_cv2(root / "c.bmp", distinct(3))
    write_cv2(root / "deep" / "d.tif", distinct(4, dtype=np.uint16))
    write_cv2(root / "deep" / "e.tiff", distinct(5))
    write_cv2(root / "f.png", distinct(6, channels=4))
    write_palette_png(root / "g.png")
    with Project.create(tmp_path / "p", root) as project:
        report = run_import(project, root)
        assert report.added == 7 and not report.skipped
        by_stem = {i.stem: i for i in project.images()}
        assert by_stem["d"].bit_depth == 16 and by_stem["d"].rel_path == "deep/d.tif"
        assert by_stem["b"].channels == 3 and by_stem["f"].channels == 4 and by_stem["a"].channels == 1
        assert all(i.width == 32 and i.height == 24 and i.tag == "untagged" for i in by_stem.values())


def test_tags_from_folder_names_case_insensitive(tmp_path: Path):
    root = tmp_path / "images"
    for index, folder in enumerate(["OK", "Normal/batch1", "good", "NG", "Defect/x/y", "bad", "misc"]):
        write_cv2(root / folder / f"i{index}.png", distinct(index))
    with Project.create(tmp_path / "p", root) as project:
        run_import(project, root)
        tags = {i.stem: i.tag for i in project.images()}
    assert tags == {"i0": "good", "i1": "good", "i2": "good", "i3": "defect", "i4": "defect", "i5": "defect", "i6": "untagged"}


def test_tags_from_csv_and_csv_problems_refused_up_front(tmp_path: Path):
    root = tmp_path / "images"
    for index in range(3):
        write_cv2(root / f"s{index}.png", distinct(index))
    labels = tmp_path / "labels.csv"
    labels.write_text("stem,label\ns0,good\ns1.png,NG\n")
    with Project.create(tmp_path / "p", root) as project:
        run_import(project, root, labels)
        assert {i.stem: i.tag for i in project.images()} == {"s0": "good", "s1": "defect", "s2": "untagged"}
        assert [s for _, s, _ in project.tag_history(project.images()[0].id)] == ["csv"]
    bad = tmp_path / "bad.csv"
    bad.write_text("s0,maybe\nghost,good\n")
    with Project.create(tmp_path / "q", root) as project:
        with pytest.raises(DataError, match=r"unknown label 'maybe'.*1 stems match no image.*Nothing was imported"):
            run_import(project, root, bad)
        assert project.images() == []


def test_reimport_adds_new_files_and_keeps_tags(tmp_path: Path):
    root = tmp_path / "images"
    write_cv2(root / "good" / "a.png", distinct(1))
    write_cv2(root / "b.png", distinct(2))
    with Project.create(tmp_path / "p", root) as project:
        run_import(project, root)
        a = project.find_images(["a"])[0]
        project.set_tags([a.id], "defect")  # the user overrides the folder's tag
        write_cv2(root / "c.png", distinct(3))
        report = run_import(project, root)
        assert (report.added, report.already_known) == (1, 2)
        assert {i.stem: i.tag for i in project.images()} == {"a": "defect", "b": "untagged", "c": "untagged"}


def test_duplicates_counted_once_and_bad_files_listed(tmp_path: Path):
    root = tmp_path / "images"
    write_cv2(root / "a.png", distinct(1))
    write_cv2(root / "copy" / "a_again.png", distinct(1))
    (root / "zero.png").write_bytes(b"")
    (root / "readme.jpg").write_text("not an image")
    with Project.create(tmp_path / "p", root) as project:
        report = run_import(project, root)
        assert report.added == 1 and report.duplicates == [("copy/a_again.png", "a.png")]
        assert sorted(path for path, _ in report.skipped) == ["readme.jpg", "zero.png"]
        assert any("empty" in reason for _, reason in report.skipped)
        assert any("skipped: zero.png" in line for line in report.lines())


def test_empty_folder_and_symlink_loop(tmp_path: Path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    with Project.create(tmp_path / "p", root) as project:
        with pytest.raises(DataError, match="no images found"):
            run_import(project, root)
        write_cv2(root / "sub" / "x.png", distinct(0))
        assert run_import(project, root).added == 1


def test_project_folder_inside_the_image_folder_is_not_imported(tmp_path: Path):
    root = tmp_path / "images"
    write_cv2(root / "a.png", distinct(1))
    with Project.create(root / "proj", root) as project:
        assert run_import(project, root).added == 1
        project.create_round({})
        project.save_mask_proposal(1, 0, np.zeros((24, 32), bool), "cam", {})  # PNGs inside the project
        assert run_import(project, root).found == 1


def test_cancel_raises_job_cancelled(tmp_path: Path):
    root = tmp_path / "images"
    for index in range(100):
        write_cv2(root / f"{index:03d}.png", distinct(index))
    cancel = CancelToken()
    with Project.create(tmp_path / "p", root) as project:
        with pytest.raises(JobCancelled):
            for event in import_job(project, root, None, cancel):
                if event.stage == "import" and event.step >= 80:
                    cancel.cancel()
        assert len(project.images()) == 64  # the first committed batch stays; a re-import finishes the rest
        assert run_import(project, root).added == 36
