"""`defect-studio bench segmenter --quick` on the demo data: a real sweep that writes its tables."""

from __future__ import annotations

import json
from pathlib import Path

from defect_studio.cli import main as cli_main


def test_quick_segmenter_bench_writes_its_tables(demo_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli_main(["bench", "segmenter", "--dataset", str(demo_dataset), "--quick", "--out", str(out)]) == 0
    report = json.loads((out / f"segmenter-{demo_dataset.name}-quick.json").read_text())
    rows = report["tables"]["Candidates"]
    assert [row["candidate"] for row in rows] == ["default", "unet"]
    for row in rows:
        assert 0.0 <= row["test defect IoU"] <= 1.0 and row["cpu s/step"] > 0 and row["steps"] == 16
    assert "| default |" in (out / f"segmenter-{demo_dataset.name}-quick.md").read_text()
