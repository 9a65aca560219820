"""`defect-studio bench assist --quick` on the demo data: the scripted users run and the tables are written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from defect_studio.cli import main as cli_main


def test_quick_assist_bench_writes_its_tables(demo_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli_main(["bench", "assist", "--dataset", str(demo_dataset), "--quick", "--out", str(out)]) == 0
    report = json.loads((out / f"assist-{demo_dataset.name}-quick.json").read_text())
    rows = report["tables"]["Actions per mask"]
    overall = {row["tool"]: row for row in rows if row["defect type"] == "all"}
    assert {"brush", "assist (grabcut)", "assist (watershed)", "brush, aim ±0.25", "assist (grabcut), aim ±0.25"} == set(overall)
    for row in overall.values():
        assert row["masks"] > 0
        assert 1 <= row["median actions"] <= 20 and 0.0 <= row["reach IoU 0.8"] <= 1.0
    assert overall["assist (grabcut)"]["assist actions"] > 0
    assert overall["brush"]["assist actions"] == 0
    masks = report["per_mask"]
    assert all(entry["brush"]["final_iou"] >= 0.8 or entry["brush"]["actions"] == 20 for entry in masks)
    timings = report["tables"]["ms per assist action on a large image"]
    assert {row["method"] for row in timings} == {"grabcut", "watershed"} and all(row["ms"] > 0 for row in timings)
    assert "| all | brush |" in (out / f"assist-{demo_dataset.name}-quick.md").read_text()


def test_assist_bench_without_ground_truth_says_so(demo_dataset: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    no_masks = tmp_path / "no-masks"
    shutil.copytree(demo_dataset, no_masks, ignore=shutil.ignore_patterns("masks"))
    assert cli_main(["bench", "assist", "--dataset", str(no_masks), "--quick", "--out", str(tmp_path / "out")]) == 2
    assert "no masks/ folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
