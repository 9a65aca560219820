"""The importer's size limit is a project setting (300 megapixels by default), checked from the file
header before any pixel is decoded; an image over it is listed with a clear reason, never a traceback."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from defect_studio.cli import main
from defect_studio.errors import DataError
from defect_studio.jobs import CancelToken, run_job
from defect_studio.project import Project
from defect_studio.project.importer import (
    DEFAULT_IMPORT_MEGAPIXELS,
    import_job,
    import_pixel_limit,
    set_import_megapixels,
)
from tests.image_files import gradient, write_cv2, write_png_header_only

EXIT_PARTIAL = 4


def test_the_default_limit_is_300_megapixels_and_admits_what_64_refused(tmp_path: Path):
    root = tmp_path / "images"
    # 8200 × 8000 = 65.6 MP: over the old 64 MP limit, a real file that must import.
    write_cv2(root / "large.png", np.zeros((8000, 8200), np.uint8))
    write_png_header_only(root / "over.png", 18_000, 18_000)  # 324 MP
    with Project.create(tmp_path / "p", root) as project:
        assert DEFAULT_IMPORT_MEGAPIXELS == 300
        assert import_pixel_limit(project) == 300_000_000
        report = run_job(import_job(project, root, None, CancelToken()))
        assert report.added == 1
        assert [(name, reason) for name, reason in report.skipped] == [
            ("over.png", "18000 × 18000 pixels is more than the 300 megapixel limit; "
                         "split it into smaller images before importing.")]
        large = project.images()[0]
        assert (large.width, large.height) == (8200, 8000)


def test_a_lowered_limit_refuses_from_the_header_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "images"
    write_cv2(root / "small.png", gradient(24, 32))  # 768 px
    big = gradient(40, 32)
    big.flat[0] = 9
    write_cv2(root / "big.png", big)  # 1280 px
    decoded: list[int] = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: decoded.append(1) or real_imdecode(*a, **k))
    with Project.create(tmp_path / "p", root) as project:
        set_import_megapixels(project, 0.001)  # 1000 pixels
        assert import_pixel_limit(project) == 1000
        report = run_job(import_job(project, root, None, CancelToken()))
        assert [image.stem for image in project.images()] == ["small"]
    assert report.skipped == [("big.png", "32 × 40 pixels is more than the 0.001 megapixel limit; "
                                          "split it into smaller images before importing.")]
    assert len(decoded) == 1  # the small image only: the big one was refused from its header


@pytest.mark.parametrize("value", [0, -5, 301, float("nan"), float("inf"), "many", None])
def test_a_bad_limit_is_refused_with_what_a_limit_may_be(tmp_path: Path, value: object):
    root = tmp_path / "images"
    write_cv2(root / "a.png", gradient())
    with Project.create(tmp_path / "p", root) as project:
        with pytest.raises(DataError, match="import limit must be"):
            set_import_megapixels(project, value)
        assert import_pixel_limit(project) == 300_000_000  # unchanged


def test_the_cli_lists_an_image_over_the_projects_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "images"
    write_cv2(root / "a.png", gradient())
    project_dir = tmp_path / "p"
    assert main(["import", str(project_dir), "--images", str(root)]) == 0
    with Project.open(project_dir) as project:
        set_import_megapixels(project, 0.0005)  # 500 px: a 24 × 32 image is over it
    write_cv2(root / "b.png", gradient(30, 30))
    capsys.readouterr()
    assert main(["import", str(project_dir), "--images", str(root)]) == EXIT_PARTIAL
    output = capsys.readouterr()
    assert "Traceback" not in output.out + output.err
    assert "skipped: b.png: 30 × 30 pixels is more than the 0.0005 megapixel limit" in output.out


def test_the_import_command_sets_the_limit_and_refuses_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "images"
    write_cv2(root / "a.png", gradient(20, 20))
    write_cv2(root / "b.png", gradient(30, 30))
    project_dir = tmp_path / "p"
    assert main(["import", str(project_dir), "--images", str(root), "--max-megapixels", "0.0005"]) == EXIT_PARTIAL
    assert "skipped: b.png: 30 × 30 pixels is more than the 0.0005 megapixel limit" in capsys.readouterr().out
    with Project.open(project_dir) as project:
        assert import_pixel_limit(project) == 500  # remembered for the next import
    assert main(["import", str(project_dir), "--images", str(root), "--max-megapixels", "-3"]) != 0
    output = capsys.readouterr()
    assert "Traceback" not in output.out + output.err and "more than 0" in output.out + output.err
    with Project.open(project_dir) as project:
        assert import_pixel_limit(project) == 500
