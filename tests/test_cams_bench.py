"""`defect-studio bench cams` end to end on a tiny demo dataset with an untrained classifier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_studio.dataset_layout import load_dataset
from defect_studio.imageio import read_mask



def test_bench_cams_writes_every_variant_and_the_trivial_baseline(tmp_path: Path) -> None:
    from defect_studio import demo
    from defect_studio.bench import cams as bench
    from defect_studio.ml.classifier import checkpoint_bytes
    from defect_studio.ml.good_prior import GoodImagePrior
    from defect_studio.ml.models import ClassifierConfig, build_classifier
    from defect_studio.ml.preprocess import Preprocessing

    dataset = demo.make_demo_dataset(tmp_path / "data", count=12, size=40)
    config = ClassifierConfig(arch="compact", width=8, input_size=64, channels=1)
    torch.manual_seed(0)
    checkpoint = tmp_path / "classifier.pt"
    prior = GoodImagePrior(stage=3, bank=torch.randn(64, 32))  # stage 3 of a width-8 compact network: 32 channels
    checkpoint.write_bytes(checkpoint_bytes(build_classifier(config).eval(), config, Preprocessing(input_size=64), 0.5, {}, [], 0, prior))
    args = argparse.Namespace(dataset=dataset, quick=True, out=tmp_path / "out", seed=0, json=False, classifier=checkpoint)
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "out" / f"cams-{dataset.name}-quick.json").read_text())
    rows = {row["variant"]: row for row in report["tables"]["Methods and ablations"]}
    assert set(rows) == {"mark every pixel", bench.REFERENCE_NAME} | {name for name, *_ in bench.variants(ablations=True)}
    # the trivial map's IoU is the defect share of the pixels
    defects = [s for s in load_dataset(dataset) if s.split == "train" and s.label == "defect"]
    masks = [read_mask(s.mask_path) for s in defects]
    share = sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)
    assert rows["mark every pixel"]["defect_iou"] == pytest.approx(share)
    for row in rows.values():
        assert 0.0 <= row["defect_iou"] <= 1.0 and row["defect_iou"] >= share - 1e-9  # t = 0 is always available
    assert rows["region-aware"]["ms_per_image"] > 0 and np.isfinite(rows["region-aware"]["time_vs_reference"])
    assert (tmp_path / "out" / f"cams-{dataset.name}-quick.md").read_text().count("| region-aware") >= 3
