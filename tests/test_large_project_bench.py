"""`bench large-project` on a few hundred images: synthetic tiny images, the import, the opens and the
window's stalls (offscreen, in a child process) end up in a markdown table and a JSON file with the
expected rows and sane values. No timing is asserted: performance is measured by the benchmark."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import pytest

from defect_studio.bench.large_project import (
    IMPORT_COLUMNS,
    OPEN_COLUMNS,
    STALL_COLUMNS,
    STALL_CONDITIONS,
    folder_of,
    write_tiny_images,
)
from defect_studio.cli import main
from defect_studio.project import Project

IMAGES = 300


def test_tiny_images_are_distinct_and_split_by_tag_folder(tmp_path: Path):
    written = write_tiny_images(tmp_path, 200, seed=1)
    assert written == {"good": 90, "defect": 10, "unsorted": 100}
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 200 and len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 200
    image = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (32, 32)
    assert [folder_of(i, 200) for i in (0, 89, 90, 99, 100, 199)] == ["good", "good", "defect", "defect", "unsorted", "unsorted"]
    defects = [cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in sorted((tmp_path / "defect").rglob("*.png"))]
    assert all(((d[1:] <= 40) | (d[1:] >= 190)).any() for d in defects)  # a dark pit or a bright scratch each


def test_stems_stay_unique_across_import_batches(tmp_path: Path):
    """The import asks for each new stem through the index (not a set of every stem per batch): a stem
    already stored, and one taken earlier in the same batch, both still get a qualified name."""
    entry = {"sha256": "", "width": 4, "height": 4, "channels": 1, "bit_depth": 8}
    with Project.create(tmp_path / "p", tmp_path) as project:
        project.add_images([{**entry, "rel_path": "a/x.png", "sha256": "1"}])
        project.add_images([{**entry, "rel_path": "b/x.png", "sha256": "2"}, {**entry, "rel_path": "c/x.png", "sha256": "3"},
                            {**entry, "rel_path": "b__x.png", "sha256": "4"}])
        assert sorted(image.stem for image in project.images()) == ["b__x", "b__x__2", "c__x", "x"]


def test_bench_large_project_writes_its_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    assert main(["bench", "large-project", "--images", str(IMAGES), "--opens", "2", "--scroll-steps", "40",
                 "--out", str(out), "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for columns in (IMPORT_COLUMNS, OPEN_COLUMNS, STALL_COLUMNS):
        assert "| " + " | ".join(columns) + " |" in printed
    assert (out / "large-project.md").read_text() in printed

    saved = json.loads((out / "large-project.json").read_text())
    imported = saved["import"]
    assert (imported["found"], imported["added"], imported["duplicates"], imported["skipped"]) == (IMAGES, IMAGES, 0, 0)
    assert imported["images_per_s"] > 0
    assert imported["tags"] == {"good": 135, "defect": 15, "untagged": 150}  # from the folder names

    tables = saved["tables"]
    opens = {row["measurement"]: row for row in tables["Open"]}
    assert len(opens) == 3 and all(row["runs"] == 2 for row in opens.values())
    assert all(0 < row["min_s"] <= row["median_s"] <= row["max_s"] for row in opens.values())
    window_open = next(row for name, row in opens.items() if name.startswith("window"))
    assert window_open["target_s"] == "< 2" and window_open["verdict"] in ("met", "NOT met")

    stalls = tables["Event-loop stalls"]
    assert len(stalls) == len(STALL_CONDITIONS)
    assert all(row["condition"].startswith(label) for row, (_, label) in zip(stalls, STALL_CONDITIONS))
    for row in stalls:
        assert row["ticks"] > 0 and 0 <= row["median_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["verdict"] == ("met" if row["max_ms"] <= 50 else "NOT met")

    window = saved["window"]
    assert len(window["open_s"]) == 2 and window["columns"] >= 1
    assert len(window["filter_ms_each"]) == 10 and len(window["tag_ms_each"]) == 20
    assert 0 < window["thumbnails"] <= IMAGES  # the scroll painted cards, and each made at most one thumbnail
    assert f"{IMAGES} images in 40 steps" in stalls[1]["condition"]
    assert not list(tmp_path.glob("bench-large-project-*"))  # the images and the project were removed
