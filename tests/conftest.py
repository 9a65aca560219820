"""Shared fixtures: the real Magnetic Tile dataset (skipped where absent) and the synthetic demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO_ROOT = Path(__file__).resolve().parents[1]
MT_DATASET = REPO_ROOT.parent / "shared" / "datasets" / "magnetic-tile"
requires_mt = pytest.mark.skipif(not (MT_DATASET / "labels.csv").is_file(), reason="Magnetic Tile dataset not present")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny networks gain nothing from a second thread, and on a shared CPU two OpenMP threads can be
    ten times slower than one; results that depend on the thread count compare like with like."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the README layout, made once per test session (read-only use)."""
    from defect_studio.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "dataset", count=80, size=96, seed=0)


@pytest.fixture()
def demo_project(tmp_path: Path, demo_dataset: Path) -> Path:
    """A fresh project (closed) with the demo images imported and tagged from labels.csv."""
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.project import Project
    from defect_studio.project.importer import import_job

    project_dir = tmp_path / "project"
    with Project.create(project_dir, demo_dataset / "images") as project:
        run_job(import_job(project, demo_dataset / "images", demo_dataset / "labels.csv", CancelToken()))
    return project_dir


@pytest.fixture()
def reviewed_round(demo_project: Path) -> Path:
    """Round 0 with a simple proposal for every tagged image (no CAMs needed for reviewing)."""
    import numpy as np

    from defect_studio.project import Project

    with Project.open(demo_project) as project:
        project.create_round({})
        for image in project.images():
            if image.tag == "untagged":
                continue
            mask = np.zeros((image.height, image.width), bool)
            if image.tag == "defect":
                mask[:4, :4] = True
            project.save_mask_proposal(image.id, 0, mask, "test", {})
    return demo_project
