from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from defect_studio.cli import main
from defect_studio.project import Project
from tests.conftest import MT_DATASET, requires_mt
from tests.image_files import gradient, write_cv2

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "defect_studio", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_then_status(tmp_path: Path, demo_dataset: Path):
    result = cli("import", str(tmp_path / "p"), "--images", str(demo_dataset / "images"), "--labels", str(demo_dataset / "labels.csv"))
    assert result.returncode == 0, result.stderr
    assert "80 added" in result.stdout and "Traceback" not in result.stderr
    status = cli("status", str(tmp_path / "p"), "--json")
    summary = json.loads(status.stdout)
    assert summary["images"] == 80 and summary["tags"]["untagged"] == 0 and summary["tags"]["defect"] > 0


def test_json_progress_lines(tmp_path: Path, demo_dataset: Path):
    result = cli("import", str(tmp_path / "p"), "--images", str(demo_dataset / "images"), "--json")
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["stage"] == "import" and events[-1]["step"] == events[-1]["total"] == 80


def test_errors_are_messages_with_exit_codes_not_tracebacks(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a defect-studio project" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["import", str(tmp_path / "p"), "--images", str(empty)]) == 2
    assert "no images found" in capsys.readouterr().err


def test_skipped_files_give_exit_code_4(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = tmp_path / "images"
    write_cv2(root / "ok.png", gradient())
    (root / "broken.png").write_bytes(b"\x89PNG\r\n")
    assert main(["import", str(tmp_path / "p"), "--images", str(root)]) == 4
    assert "skipped: broken.png" in capsys.readouterr().out


def test_locked_project_gives_exit_code_3(tmp_path: Path, demo_project: Path):
    with Project.open(demo_project):
        result = cli("status", str(demo_project))
    assert result.returncode == 3 and "is open in another defect-studio" in result.stderr
    assert "Traceback" not in result.stderr


def test_tag_command(demo_project: Path, capsys: pytest.CaptureFixture):
    with Project.open(demo_project) as project:
        stem = project.images("good")[0].stem
    assert main(["tag", str(demo_project), "defect", stem]) == 0
    assert main(["tag", str(demo_project), "good", "no-such-image"]) == 2
    assert "no such image" in capsys.readouterr().err


def test_demo_without_gui_prepares_a_tagged_project(tmp_path: Path):
    result = cli("demo", "--out", str(tmp_path / "x"), "--no-gui", "--count", "40")
    assert result.returncode == 0, result.stderr
    with Project.open(tmp_path / "x" / "project") as project:
        counts = project.tag_counts()
    assert counts["good"] > 0 and counts["defect"] > 0 and counts["untagged"] == 0
    assert cli("demo", "--out", str(tmp_path / "x"), "--no-gui", "--count", "40").returncode == 0  # idempotent


@requires_mt
def test_magnetic_tile_imports_with_its_labels(tmp_path: Path):
    result = cli("import", str(tmp_path / "mt"), "--images", str(MT_DATASET / "images"), "--labels", str(MT_DATASET / "labels.csv"))
    assert result.returncode == 0, result.stderr
    assert "tags: 952 good, 388 defect, 0 untagged" in result.stdout
