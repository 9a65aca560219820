"""`bench scale --quick`: synthetic 1 and 4 MP images, each step (import, predict, cams, brush) measured in
its own process, a markdown table with seconds and peak RSS; benches that need a dataset still say so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defect_studio.bench.scale import COLUMNS, STEPS, image_side, per_mp_spread, synthetic_surface
from defect_studio.cli import main


def test_synthetic_surface_is_the_size_asked_with_small_defects():
    image = synthetic_surface(0.25, seed=3)
    assert image.shape == (500, 500) and image.dtype == np.uint8 and image_side(100) == 10_000
    assert (image <= 40).sum() > 0 and (image >= 190).sum() > 0  # dark pits and bright scratches
    assert (image <= 40).sum() < 100  # small: a 3 px pit is 5 to 9 pixels


def test_per_mp_spread_ignores_the_smallest_size():
    rows = [{"MP": 1.0, "predict s/MP": 9.0}, {"MP": 4.0, "predict s/MP": 1.0}, {"MP": 16.0, "predict s/MP": 1.5}]
    assert per_mp_spread(rows, "predict s/MP") == pytest.approx(0.2)


def test_bench_scale_quick_prints_a_table_for_1_and_4_mp(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["bench", "scale", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| " + " | ".join(COLUMNS) + " |" in printed
    saved = json.loads((tmp_path / "scale.json").read_text())
    results = saved["results"]
    assert [r["megapixels"] for r in results] == [1.0, 4.0]
    for result in results:
        for step in STEPS:
            measured = result[step]
            assert "error" not in measured, (step, measured)
            assert measured["seconds"] > 0 and measured["peak_rss"] >= measured["baseline_rss"] > 0
        assert result["brush"]["brush_events"] > 50 and result["brush"]["brush_median_ms"] > 0
    # auto tiling: 1 MP (1000²) fits in one tile and is predicted whole as before; 4 MP (2000²) by 3 × 3 tiles
    assert [result["predict"]["tiles"] for result in results] == [1, 9]
    # CAMs: 1 MP whole, 4 MP by tiles of the classifier's 256 px input
    assert results[0]["cams"]["tiles"] == 1 and results[1]["cams"]["tiles"] > 9
    assert (tmp_path / "scale.md").read_text().count("\n| 4") == 1


def test_bench_scale_runs_only_the_steps_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["bench", "scale", "--sizes", "1.1", "--scale-steps", "cams", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    (result,) = json.loads((tmp_path / "scale.json").read_text())["results"]
    assert set(result) & set(STEPS) == {"cams"} and "error" not in result["cams"], result
    assert result["cams"]["tiles"] > 1  # 1.1 MP is over one segmenter tile: by tiles, float16 map, banded labels
    assert "| cams s |" in printed and "predict" not in printed.split("## Notes")[0]
    assert "predict s/MP" not in printed and "brush:" not in printed  # no notes on the steps not run


def test_a_bench_that_needs_a_dataset_says_so(capsys: pytest.CaptureFixture[str]):
    assert main(["bench", "segmenter"]) == 2
    assert "bench segmenter needs --dataset DATASET" in capsys.readouterr().out
